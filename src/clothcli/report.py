"""`clothcli report`: one self-contained HTML page that shows how a trained model does.

The page is built from a Jinja2 template (`templates/report.html.j2`); every picture is inlined as a
data URI (matplotlib figures as PNG, photos as small JPEG thumbnails), so the file opens from disk
with no network and can be mailed as it is. It holds the run (architecture, cost, training time,
device, config), the training curves, the results on one split (accuracy, averages, per class, the
confusion matrix), sample predictions per class, the most confident mistakes and, when a dataset is
given, its audit (counts, imbalance, duplicate and leak groups, unreadable files).
"""

from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clothcli import __version__
from clothcli.errors import UserError
from clothcli.io_utils import atomic_write_text
from clothcli.run_folder import read_history, training_seconds

REPORT_EXTRA = "pip install 'clothcli[report]'"
THUMBNAIL_SIDE = 160


@dataclass
class ReportResult:
    """What `build_report` wrote, and a few numbers to show on the terminal."""

    path: Path
    bytes: int
    split: str
    accuracy: float
    images: int  # thumbnails inlined
    audited: bool
    sections: list[str] = field(default_factory=list)


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def thumbnail(path: str | Path) -> str | None:
    """A JPEG data URI of the image at `path`, at most THUMBNAIL_SIDE px a side; None if it is unreadable."""
    from clothcli.data.images import ImageReadError, load_rgb

    try:
        image = load_rgb(path, min_size=THUMBNAIL_SIDE)
    except (ImageReadError, OSError):
        return None
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def curves_figure(history: list[dict[str, Any]]) -> str | None:
    """Losses, accuracies and the learning rate per epoch, side by side."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    panels = [
        ("loss", [("train_loss", "train"), ("val_loss", "validation")]),
        ("accuracy", [("train_acc", "train"), ("val_acc", "validation"), ("val_f1", "validation macro-F1")]),
        ("learning rate (end of epoch)", [("lr", "lr")]),
    ]
    for ax, (title, series) in zip(axes, panels):
        for key, label in series:
            values = [r.get(key) for r in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, marker="o", markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def confusion_figure(report: Any) -> str:
    from clothcli.evaluation_report import plot_confusion

    buffer = io.BytesIO()
    plot_confusion(report, buffer)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _check_data_classes(data: Path, classes: list[str]) -> None:
    from clothcli.data.layout import class_difference, index_dataset

    found = index_dataset(data).classes
    if set(found) != set(classes):
        raise UserError(f"{data} has other classes than the checkpoint: it {class_difference(classes, found)}")


def _samples(files: list[dict[str, Any]], classes: list[str], per_class: int, seed: int = 0) -> list[dict[str, Any]]:
    """Per true class, a fixed random handful of its images with their prediction."""
    rng = random.Random(seed)
    groups = []
    for name in classes:
        members = [f for f in files if f["true"] == name]
        chosen = sorted(rng.sample(members, min(per_class, len(members))), key=lambda f: f["path"])
        groups.append({"name": name, "items": [_item(f) for f in chosen]})
    return groups


def _item(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "src": thumbnail(row["path"]),
        "name": Path(row["path"]).name,
        "true": row["true"],
        "predicted": row["predicted"],
        "confidence": row["confidence"],
        "wrong": row["true"] != row["predicted"],
    }


def _run_section(run: Path, checkpoint: Path, meta: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    from clothcli.analysis.flops import count
    from clothcli.inference import load_for_inference

    plain = load_for_inference(checkpoint, "cpu", fold=False, calibrated=False)
    size = plain.preprocess.input_size
    counted = count(plain.model, (3, size, size), depth=0)
    seconds = training_seconds(history)
    config_file = run / "config.yaml"
    return {
        "name": run.name,
        "arch": plain.arch,
        "input_size": size,
        "macs": counted.macs,
        "params": counted.params,
        "epochs": len(history),
        "best_epoch": meta.get("epoch"),
        "train_minutes": seconds / 60 if history else None,
        "device": meta.get("trained_on", "not recorded"),
        "temperature": meta.get("temperature"),
        "config": config_file.read_text(encoding="utf-8") if config_file.is_file() else "",
    }


def build_report(
    run: str | Path,
    data: str | Path | None = None,
    output: str | Path = "report.html",
    split: str = "test",
    per_class: int = 6,
    mistakes: int = 12,
    batch_size: int = 64,
    workers: int = 2,
) -> ReportResult:
    """Evaluate the run's best checkpoint on `split` of `data` (default: the dataset it was trained on)
    and write the report to `output`; with `data` given, the dataset's audit is included."""
    output, run = Path(output), Path(run)
    if output.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"the report is HTML: -o must end in .html, got '{output.name}'")
    if not output.parent.is_dir():
        raise UserError(f"output folder not found: {output.parent}")
    try:
        import jinja2
    except ImportError:
        raise UserError(f"report needs Jinja2: {REPORT_EXTRA}") from None
    from clothcli.checkpoint import META_FILE, WEIGHTS_FILE, read_meta
    from clothcli.io_utils import readable_dir

    if not run.is_dir():
        raise UserError(f"run folder not found: {run}")
    checkpoint = readable_dir(run / "best")
    if not (checkpoint / META_FILE).is_file() or not (checkpoint / WEIGHTS_FILE).is_file():
        raise UserError(f"{run}: no best/ checkpoint (a run folder written by clothcli train)")
    meta = read_meta(checkpoint)
    audit_data = Path(data) if data is not None else None
    if audit_data is not None:
        if not audit_data.is_dir():
            raise UserError(f"data folder not found: {audit_data}")
        _check_data_classes(audit_data, list(meta["classes"]))
    eval_data = audit_data or Path(meta.get("config", {}).get("data", {}).get("root") or "")
    if not str(eval_data) or not eval_data.is_dir():
        raise UserError(f"the run's dataset is not at {eval_data or '(unrecorded)'}: give DATA")

    from clothcli.evaluation import evaluate_checkpoint
    from clothcli.evaluation_report import errors_rows

    evaluation = evaluate_checkpoint(checkpoint, eval_data, split, batch_size, workers)
    history = read_history(run)
    audit = None
    if audit_data is not None:
        from clothcli.data.analysis import analyze_dataset

        audit = analyze_dataset(audit_data, deep=True).to_dict()
    samples = _samples(evaluation.files, evaluation.classes, per_class)
    worst = [_item(row) for row in errors_rows(evaluation)[:mistakes]]
    context = {
        "version": __version__,
        "run": _run_section(run, checkpoint, meta, history),
        "curves": curves_figure(history),
        "history": history,
        "evaluation": evaluation,
        "confusion": confusion_figure(evaluation),
        "samples": samples,
        "mistakes": worst,
        "audit": audit,
    }
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("clothcli", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
    )
    html = environment.get_template("report.html.j2").render(**context)
    atomic_write_text(output, html)
    sections = ["run", "training curves" if history else "", "results", "samples", "mistakes", "audit" if audit else ""]
    return ReportResult(
        path=output,
        bytes=output.stat().st_size,
        split=split,
        accuracy=evaluation.accuracy,
        images=sum(len(g["items"]) for g in samples) + len(worst),
        audited=audit is not None,
        sections=[s for s in sections if s],
    )
