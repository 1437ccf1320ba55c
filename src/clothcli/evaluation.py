"""`evaluate`: run a checkpoint over a split (or any class-laid-out folder) and report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clothcli.data.batch_augment import TransformedBatches
from clothcli.data.layout import find_split_dir, index_folder
from clothcli.data.loading import IGNORE_INDEX, ImageFiles, decode_size, eval_transform, make_loader
from clothcli.errors import UserError
from clothcli.inference import load_for_inference
from clothcli.metrics import ClassificationReport, classification_report
from clothcli.runtime import make_accelerator, predict_batches, resolve_device


@dataclass
class EvalReport(ClassificationReport):
    """The classification report of one checkpoint on one folder, with every file's prediction."""

    checkpoint: str = ""
    arch: str = ""
    folder: str = ""
    split: str = ""
    tta_flip: bool = False
    preprocess: dict[str, Any] = field(default_factory=dict)
    # one row per evaluated file: path, true, predicted, confidence
    files: list[dict[str, Any]] = field(default_factory=list)
    unreadable: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_eval_folder(data: str | Path, split: str) -> Path:
    """`data/<split>` when `data` is a dataset folder, else `data` itself (laid out by class)."""
    data = Path(data)
    if not data.is_dir():
        raise UserError(f"data folder not found: {data}")
    return find_split_dir(data, split) or data


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    split: str = "test",
    batch_size: int = 64,
    workers: int = 2,
    tta_flip: bool = False,
    mixed_precision: str = "auto",
    input_size: int | None = None,
    crop_pct: float | None = None,
    device: str | None = None,
) -> EvalReport:
    """The full classification report plus per-file predictions (for the errors list).

    `input_size` / `crop_pct` override the checkpoint's preprocessing, as timm's validate.py
    `--img-size` / `--crop-pct` do: a network trained with random-resized crops often scores higher
    when tested a little larger than it was trained ("FixRes" effect). Choose them on validation.
    """
    accelerator = make_accelerator(mixed_precision, device=resolve_device(device))
    loaded = load_for_inference(checkpoint, accelerator.device, input_size=input_size, crop_pct=crop_pct)
    classes, pre = loaded.classes, loaded.preprocess
    folder = resolve_eval_folder(data, split)
    index = index_folder(folder, classes, name=split)
    if not index.samples:
        raise UserError(f"{folder}: no images to evaluate")
    dataset = ImageFiles(index.samples, eval_transform(pre), decode_size(pre))
    loader = accelerator.prepare(make_loader(dataset, batch_size, workers))
    logits, targets, indices, errors = predict_batches(loaded.model, loader, accelerator, channels_last=True)
    if tta_flip:
        flipped = TransformedBatches(loader, lambda images: images.flip(-1))
        logits_f, _, _, _ = predict_batches(loaded.model, flipped, accelerator, channels_last=True)
        probs = (logits.softmax(1) + logits_f.softmax(1)) / 2
    else:
        probs = logits.softmax(1)
    keep = targets != IGNORE_INDEX
    confidence, preds = probs.max(1)
    metrics = classification_report(preds[keep], targets[keep], classes)
    files = []
    for i, p, c, t, k in zip(indices.tolist(), preds.tolist(), confidence.tolist(), targets.tolist(), keep.tolist()):
        if k:
            files.append(
                {"path": str(index.samples[i][0]), "true": classes[t], "predicted": classes[p], "confidence": c}
            )
    accelerator.end_training()
    return EvalReport(
        **asdict(metrics),
        checkpoint=str(loaded.directory),
        arch=loaded.arch,
        folder=str(folder),
        split=split,
        tta_flip=tta_flip,
        preprocess=pre.to_dict(),
        files=files,
        unreadable=[{"path": str(index.samples[i][0]), "reason": r} for i, r in sorted(dict(errors).items())],
        skipped=[{"path": str(s.path), "reason": s.reason} for s in index.skipped],
    )


def errors_rows(report: EvalReport) -> list[dict[str, Any]]:
    """Misclassified files, most confident mistakes first."""
    wrong = [f for f in report.files if f["true"] != f["predicted"]]
    return sorted(wrong, key=lambda f: -f["confidence"])


def markdown_report(report: EvalReport) -> str:
    """The report as a Markdown document."""
    lines = [
        f"# Evaluation of `{report.arch}` on `{report.folder}`",
        "",
        f"Accuracy: **{report.accuracy:.2%}** [{report.correct}/{report.n}], error rate {report.error_rate:.2%}",
        "",
        "| average | precision | recall | F1 |",
        "|---|---|---|---|",
    ]
    for name, values in report.averages.items():
        lines.append(f"| {name} | {values['precision']:.4f} | {values['recall']:.4f} | {values['f1']:.4f} |")
    lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for row in report.per_class:
        lines.append(
            f"| {row['class']} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {row['support']} |"
        )
    classes = report.classes
    lines += [
        "",
        "Confusion matrix (rows: true, columns: predicted)",
        "",
        "| | " + " | ".join(classes) + " |",
        "|---" * (len(classes) + 1) + "|",
    ]
    for name, row in zip(classes, report.confusion_matrix):
        lines.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def plot_confusion(report: EvalReport, path: str | Path, normalize: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    matrix = np.array(report.confusion_matrix, dtype=float)
    if normalize:
        matrix = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    classes = report.classes
    fig, ax = plt.subplots(figsize=(1 + 0.7 * len(classes), 1 + 0.6 * len(classes)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            text = f"{matrix[i, j]:.2f}" if normalize else f"{int(matrix[i, j])}"
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=8,
                color="white" if matrix[i, j] > matrix.max() / 2 else "black",
            )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
