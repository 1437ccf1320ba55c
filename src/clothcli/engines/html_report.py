"""`clothcli report`: one self-contained HTML page that shows how a trained model does.

The page is built from a Jinja2 template (`templates/report.html.j2`); every picture is inlined as a
data URI (matplotlib figures as PNG, photos as small JPEG thumbnails), so the file opens from disk
with no network and can be mailed as it is. It holds the run (architecture, cost, training time,
device, config), the training curves, the results on one split (accuracy, averages, per class, the
confusion matrix, the most-confused pairs), sample predictions per class, the most confident mistakes
with where the model looked (class-activation maps, `engines.report_views`), the embedding map of the
split and, when a dataset is given, its audit (counts, imbalance, duplicate and leak groups, unreadable
files, image-quality issues).
"""

from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clothcli import __version__
from clothcli.backends import Classifier, load_classifier
from clothcli.engines.evaluate import errors_rows, evaluate_classifier
from clothcli.engines.report_views import cam_views, embedding_view, pair_examples
from clothcli.errors import UserError
from clothcli.formats import is_exported
from clothcli.io_utils import atomic_write_text
from clothcli.render import plots
from clothcli.training.run_folder import read_history, training_seconds

REPORT_EXTRA = "pip install 'clothcli[report]'"
EXPLAIN_EXTRA = "pip install 'clothcli[explain]'"
THUMBNAIL_SIDE = 160


@dataclass
class HtmlReport:
    """What `build_report` wrote, and a few numbers to show on the terminal."""

    path: Path
    bytes: int
    split: str
    accuracy: float
    images: int  # photos inlined: thumbnails and class-activation overlays
    audited: bool
    sections: list[str] = field(default_factory=list)
    figures: int = 0  # charts inlined: training curves, confusion matrix, embedding map


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


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
    """Losses, accuracies and the learning rate per epoch, as a PNG data URI."""
    if not history:
        return None
    buffer = io.BytesIO()
    plots.training_curves(history, buffer)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def confusion_figure(report: Any) -> str:
    buffer = io.BytesIO()
    plots.confusion(report.confusion_matrix, report.classes, buffer)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _check_data_classes(data: Path, classes: list[str]) -> None:
    from clothcli.data.layout import class_difference
    from clothcli.data.sources import open_dataset

    found = open_dataset(data).index.classes
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
        "overlay": row.get("overlay"),  # the class-activation picture, where the report draws one
    }


def _run_section(classifier: Classifier, run: Path | None, history: list[dict[str, Any]]) -> dict[str, Any]:
    from clothcli.analysis.flops import count
    from clothcli.models.checkpoint import architecture

    meta = classifier.meta
    size = classifier.preprocess.input_size
    counted = count(architecture(meta), (3, size, size), depth=0)
    seconds = training_seconds(history)
    config_file = run / "config.yaml" if run is not None else None
    return {
        "name": run.name if run is not None else classifier.source.name,
        "exported": run is None,
        "format": classifier.format + (f" ({classifier.quantization})" if classifier.quantization else ""),
        "arch": classifier.arch,
        "input_size": size,
        "macs": counted.macs,
        "params": counted.params,
        "epochs": len(history),
        "best_epoch": meta.get("epoch"),
        "train_minutes": seconds / 60 if history else None,
        "device": meta.get("trained_on", "not recorded"),
        "temperature": meta.get("temperature"),
        "config": config_file.read_text(encoding="utf-8") if config_file is not None and config_file.is_file() else "",
    }


def _open_model(model: Path) -> tuple[Classifier, Path | None]:
    """The model a report is about, and its run folder (None for an exported file): a run folder's best/."""
    if is_exported(model):
        return load_classifier(model, in_workers=False), None
    from clothcli.io_utils import readable_dir
    from clothcli.models.checkpoint import META_FILE, WEIGHTS_FILE

    if not model.is_dir():
        raise UserError(f"run folder not found: {model}")
    checkpoint = readable_dir(model / "best")
    if not (checkpoint / META_FILE).is_file() or not (checkpoint / WEIGHTS_FILE).is_file():
        raise UserError(f"{model}: no best/ checkpoint (a run folder written by clothcli train)")
    return load_classifier(checkpoint, in_workers=False), model


def build_report(
    *,
    model: str | Path,
    data: str | Path | None = None,
    output: str | Path = "report.html",
    split: str = "test",
    per_class: int = 6,
    mistakes: int = 12,
    batch_size: int = 64,
    workers: int = 2,
    explain: bool = True,
    cam_method: str = "gradcam",
) -> HtmlReport:
    """Evaluate a run's best checkpoint (or an exported file) on `split` of `data` (default: the dataset
    the run was trained on) and write the report to `output`; with `data` given, the dataset's audit is
    included. With `explain`, the maps (`cam_method`) and the embedding map where their extras are
    installed (the page says which extra adds what is missing)."""
    output = Path(output)
    if output.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"the report is HTML: -o must end in .html, got '{output.name}'")
    if not output.parent.is_dir():
        raise UserError(f"output folder not found: {output.parent}")
    try:
        import jinja2
    except ImportError:
        raise UserError(f"report needs Jinja2: {REPORT_EXTRA}") from None
    from clothcli.data.sources import is_dataset

    if explain:
        from clothcli.analysis.cam import check_method

        check_method(cam_method)
    classifier, run = _open_model(Path(model))
    audit_data = Path(data) if data is not None else None
    if audit_data is not None:
        if not is_dataset(audit_data):
            raise UserError(f"dataset not found: {audit_data} (a folder or a label file)")
        _check_data_classes(audit_data, list(classifier.classes))
    eval_data = audit_data or Path((classifier.meta.get("config") or {}).get("data", {}).get("root") or "")
    if not str(eval_data) or not is_dataset(eval_data):
        raise UserError(f"the model's dataset is not at {eval_data or '(unrecorded)'}: give DATA")
    evaluation = evaluate_classifier(
        classifier, eval_data, split, batch_size=batch_size, workers=workers, keep_features=explain
    )
    history = read_history(run) if run is not None else []
    audit = None
    if audit_data is not None:
        from clothcli.data.audit import audit_dataset

        audit = audit_dataset(audit_data, deep=True, image_issues=_has("cleanvision")).to_dict()
    samples = _samples(evaluation.files, evaluation.classes, per_class)
    worst_rows = errors_rows(evaluation)[:mistakes]
    worst = [_item(row) for row in worst_rows]
    cams = cam_views(classifier, evaluation.files, worst_rows, cam_method) if explain else None
    if cams and "overlays" in cams:
        for item, row in zip(worst, worst_rows):
            item["overlay"] = cams["overlays"].get(row["path"])
        for row in cams["correct"]:
            row.update(_item(row))
    pairs = pair_examples(evaluation.confused_pairs, evaluation.files)
    for pair in pairs:
        pair["example"] = _item(pair["example"]) if pair["example"] else None
    context = {
        "version": __version__,
        "run": _run_section(classifier, run, history),
        "curves": curves_figure(history),
        "history": history,
        "evaluation": evaluation,
        "confusion": confusion_figure(evaluation),
        "samples": samples,
        "mistakes": worst,
        "pairs": pairs,
        "cams": cams,
        "embedding": embedding_view(evaluation) if explain else None,
        "audit": audit,
    }
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("clothcli", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
    )
    html = environment.get_template("report.html.j2").render(**context)
    atomic_write_text(output, html)
    sections = [
        "run", "training curves" if history else "", "results", "most-confused pairs" if pairs else "", "samples",
        "mistakes", "maps" if cams and "overlays" in cams else "",
        "embedding map" if context["embedding"] and "png" in context["embedding"] else "", "audit" if audit else "",
    ]  # fmt: skip
    return HtmlReport(
        path=output,
        bytes=output.stat().st_size,
        split=split,
        accuracy=evaluation.accuracy,
        images=sum(len(g["items"]) for g in samples)
        + len(worst)
        + sum(1 for p in pairs if p["example"] and p["example"]["src"])
        + sum(1 for row in (cams or {}).get("correct", []) if row.get("overlay")),
        figures=sum(1 for f in (context["curves"], context["confusion"], (context["embedding"] or {}).get("png")) if f),
        audited=audit is not None,
        sections=[s for s in sections if s],
    )
