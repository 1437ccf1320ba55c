"""What `evaluate` reports and how it is written out: no PyTorch here, so the ONNX Runtime path
(`onnx_inference`) fills and renders the same report without importing it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clothcli.data.layout import find_split_dir
from clothcli.errors import UserError


@dataclass
class ClassificationReport:
    """Accuracy with counts, P/R/F1 (weighted, micro, macro, per class) and the confusion matrix."""

    n: int
    correct: int
    accuracy: float
    error_rate: float
    classes: list[str]
    averages: dict[str, dict[str, float]] = field(default_factory=dict)
    per_class: list[dict[str, Any]] = field(default_factory=list)
    confusion_matrix: list[list[int]] = field(default_factory=list)
    balanced_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalReport(ClassificationReport):
    """The classification report of one checkpoint on one folder, with every file's prediction."""

    checkpoint: str = ""
    arch: str = ""
    folder: str = ""
    split: str = ""
    tta_flip: bool = False
    preprocess: dict[str, Any] = field(default_factory=dict)
    # the temperature the probabilities were divided by (1.0: uncalibrated), and their ece, nll, brier
    temperature: float = 1.0
    calibration: dict[str, float] = field(default_factory=dict)
    # with an out-of-distribution folder: per score, auroc, threshold, recall and fpr
    ood: list[dict[str, Any]] = field(default_factory=list)
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
