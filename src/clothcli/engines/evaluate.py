"""`evaluate`: any model over a split (or any class-laid-out folder), and the one report it makes.

The backend yields logits; the probabilities, the classification report, calibration and the
out-of-distribution separation are computed here, once, for every format (`metrics`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from clothcli.backends import Classifier, load_classifier
from clothcli.data.inputs import images_under
from clothcli.data.layout import SplitIndex
from clothcli.data.sources import run_split, split_samples
from clothcli.engines.rejection import all_scores, rejector_for, stored_bank
from clothcli.errors import UserError
from clothcli.formats import PYTORCH
from clothcli.metrics import (
    ClassificationReport,
    calibration,
    classification_report,
    confused_pairs,
    probabilities,
    reliability_bins,
    separate,
)
from clothcli.render import plots


@dataclass
class EvalReport(ClassificationReport):
    """The classification report of one model on one folder, with every file's prediction."""

    checkpoint: str = ""  # the model's source: a checkpoint folder or an exported file
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
    # the stored rejection rule on this split (and the --ood folder): what it keeps and their accuracy
    rejection: dict[str, Any] | None = None
    # pairs of classes taken for each other, both directions counted, most confused first
    confused_pairs: list[dict[str, Any]] = field(default_factory=list)
    # with --cam: the overlays written and the randomisation check of the maps (`engines.explain`)
    cams: dict[str, Any] | None = None
    # one row per evaluated file: path, true, predicted, confidence
    files: list[dict[str, Any]] = field(default_factory=list)
    unreadable: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    # penultimate features of the `files` rows, when asked for (the report's embedding map); not in to_dict
    features: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "features"}


@dataclass
class Outputs:
    """A model's logits over a list of files: rows for the readable ones, reasons for the others."""

    rows: list[int]  # positions in the file list of the rows below, in order
    logits: np.ndarray
    errors: dict[int, str]
    flipped_logits: np.ndarray | None = None
    features: np.ndarray | None = None


def model_outputs(
    classifier: Classifier,
    files: list[Path],
    *,
    batch_size: int = 64,
    workers: int = 2,
    flip: bool = False,
    features: bool = False,
) -> Outputs:
    """Every batch of `classifier.run` over `files`, gathered."""
    rows: list[int] = []
    logits, flipped, feats, errors = [], [], [], {}
    for batch in classifier.run(files, batch_size, workers, flip=flip, features=features):
        rows += batch.rows
        logits.append(batch.logits)
        errors.update(batch.errors)
        if flip:
            flipped.append(batch.flipped_logits)
        if features:
            feats.append(batch.features)
    k = len(classifier.classes)
    out = Outputs(rows, np.concatenate(logits) if logits else np.zeros((0, k), dtype=np.float32), errors)
    if flip:
        out.flipped_logits = np.concatenate(flipped) if flipped else np.zeros((0, k), dtype=np.float32)
    if features:
        out.features = np.concatenate(feats) if feats else None
    return out


@dataclass
class LabelledOutputs:
    """A model's logits over one folder laid out by class, with the true class of each row."""

    folder: Path
    index: Any  # the folder's SplitIndex (samples, skipped files)
    outputs: Outputs
    targets: np.ndarray

    @property
    def logits(self) -> np.ndarray:
        return self.outputs.logits


def own_split(classifier: Classifier, data: str | Path) -> Path | None:
    """The splits.csv of the run a checkpoint belongs to, when `data` is the dataset it trained on: its
    validation and test images are then the run's, wherever they sit."""
    if classifier.format != PYTORCH:
        return None
    recorded = ((classifier.meta.get("config") or {}).get("data") or {}).get("root")
    return run_split(classifier.source.parent, data, recorded)


def fold_run(classifier: Classifier) -> bool:
    """A run of `train --folds`: its split file, not the dataset's folders, says what its validation was."""
    return ((classifier.meta.get("config") or {}).get("data") or {}).get("folds") is not None


def split_of(classifier: Classifier, data: str | Path, split: str) -> SplitIndex:
    """The labelled images of `split` for this model (`data.sources.split_samples`)."""
    return split_samples(data, split, classifier.classes, own_split(classifier, data), own_first=fold_run(classifier))


def labelled_outputs(
    classifier: Classifier,
    data: str | Path,
    split: str,
    *,
    batch_size: int = 64,
    workers: int = 2,
    flip: bool = False,
    features: bool = False,
) -> LabelledOutputs:
    """`classifier` over the `split` of `data` (`split_of`); classes it does not know are an error."""
    index = split_of(classifier, data, split)
    folder = index.directory
    if not index.samples:
        raise UserError(f"{folder}: no images to evaluate")
    files = [path for path, _ in index.samples]
    outputs = model_outputs(classifier, files, batch_size=batch_size, workers=workers, flip=flip, features=features)
    targets = np.array([index.samples[i][1] for i in outputs.rows], dtype=np.int64)
    return LabelledOutputs(folder, index, outputs, targets)


def evaluate(
    *,
    model: str | Path,
    data: str | Path,
    split: str = "test",
    batch_size: int = 64,
    workers: int = 2,
    tta_flip: bool = False,
    input_size: int | None = None,
    crop_pct: float | None = None,
    device: str | None = None,
    calibrated: bool = True,
    reliability_png: str | Path | None = None,
    ood: str | Path | None = None,
    ood_recall: float = 0.95,
    precision: str | None = None,
    cam: str | Path | None = None,
    cam_method: str = "gradcam",
    cam_layer: str | None = None,
    cam_all: bool = False,
) -> EvalReport:
    """The full classification report, calibration, and per-file predictions (for the errors list).

    `input_size` / `crop_pct` override a checkpoint's preprocessing, as timm's validate.py
    `--img-size` / `--crop-pct` do: a network trained with random-resized crops often scores higher
    when tested a little larger than it was trained ("FixRes" effect). Choose them on validation.
    Probabilities use the model's fitted temperature (`clothcli calibrate`) unless `calibrated` is
    False. With `ood`, a folder of images that belong to none of the classes, the report says how well
    each out-of-distribution score (`rejection.all_scores`) tells the split's images from those.
    With `cam`, a folder, a class-activation map of every mistake (every image with `cam_all`) is
    written there (`engines.explain`); a checkpoint only, checked before anything is evaluated."""
    classifier = load_classifier(
        model, device=device, calibrated=calibrated, input_size=input_size, crop_pct=crop_pct, in_workers=False,
        precision=precision,
    )  # fmt: skip
    setup = None
    if cam is not None:
        from clothcli.engines.explain import prepare_cams

        setup = prepare_cams(classifier, cam_method, cam_layer)
    report = evaluate_classifier(
        classifier, data, split, batch_size=batch_size, workers=workers, tta_flip=tta_flip,
        reliability_png=reliability_png, ood=ood, ood_recall=ood_recall,
    )  # fmt: skip
    if setup is not None and cam is not None:
        from clothcli.engines.explain import draw_cams

        report.cams = draw_cams(setup, report.files, cam, every=cam_all).to_dict()
    return report


def evaluate_classifier(
    classifier: Classifier,
    data: str | Path,
    split: str = "test",
    *,
    batch_size: int = 64,
    workers: int = 2,
    tta_flip: bool = False,
    reliability_png: str | Path | None = None,
    ood: str | Path | None = None,
    ood_recall: float = 0.95,
    keep_features: bool = False,
) -> EvalReport:
    """`evaluate` of a model already loaded (compare and report load it once for several uses); with
    `keep_features`, the report holds the penultimate features of its rows."""
    temperature, classes = classifier.temperature, classifier.classes
    has_features = getattr(classifier, "has_features", True)
    with_bank = bool(classifier.meta.get("ood_bank_sha256")) and has_features
    bank = stored_bank(classifier) if with_bank else None
    options = {"batch_size": batch_size, "workers": workers, "features": with_bank or (keep_features and has_features)}
    found = labelled_outputs(classifier, data, split, flip=tta_flip, **options)
    out, targets = found.outputs, found.targets
    probs = probabilities(out.logits, temperature)
    if out.flipped_logits is not None:
        probs = (probs + probabilities(out.flipped_logits, temperature)) / 2
    preds, confidence = probs.argmax(1), probs.max(1)
    log_probs = np.log(np.clip(probs, 1e-12, None))  # softmax of these is `probs`: calibration of what is shown
    if reliability_png is not None and len(targets):
        plots.reliability(reliability_bins(log_probs, targets), reliability_png)
    separations, outside = [], None
    if ood is not None:
        outside = model_outputs(classifier, images_under(ood), **options)
        inside_scores = all_scores(out.logits, out.features, temperature, bank)
        outside_scores = all_scores(outside.logits, outside.features, temperature, bank)
        separations = [s.to_dict() for s in separate(inside_scores, outside_scores, ood_recall)]
    samples = found.index.samples
    report = classification_report(preds, targets, classes)
    return EvalReport(
        **report.to_dict(),
        confused_pairs=confused_pairs(report.confusion_matrix, classes),
        checkpoint=str(classifier.source),
        arch=classifier.arch,
        folder=str(found.folder),
        split=split,
        tta_flip=tta_flip,
        preprocess=classifier.preprocess.to_dict(),
        temperature=temperature,
        calibration=calibration(log_probs, targets).to_dict() if len(targets) else {},
        ood=separations,
        rejection=_stored_rejection(classifier, out, preds == targets, outside, bank),
        files=[
            {"path": str(samples[i][0]), "true": classes[t], "predicted": classes[p], "confidence": float(c)}
            for i, t, p, c in zip(out.rows, targets.tolist(), preds.tolist(), confidence.tolist())
        ],
        unreadable=[{"path": str(samples[i][0]), "reason": r} for i, r in sorted(out.errors.items())],
        skipped=[{"path": str(s.path), "reason": s.reason} for s in found.index.skipped],
        features=out.features if keep_features else None,
    )


def _stored_rejection(
    classifier: Classifier, out: Outputs, right: np.ndarray, outside: Outputs | None, bank: Any
) -> dict | None:
    """What the rejection rule `calibrate --ood` stored does on this split: the share it keeps, their
    accuracy, and the share of the out-of-distribution images it accepts. None without a usable rule."""
    if classifier.ood_threshold is None:
        return None
    try:
        rejector = rejector_for(classifier, "auto", bank)
    except UserError:  # --no-calibration with a logit score: the stored threshold does not apply
        return None
    kept = ~rejector.rejected(out.logits, out.features)
    found = {
        "method": rejector.method,
        "k": rejector.bank.k if rejector.method == "knn" else None,
        "threshold": rejector.threshold,
        "kept": float(kept.mean()) if len(kept) else 0.0,
        "accuracy_kept": float(right[kept].mean()) if kept.any() else 0.0,
    }
    if outside is not None and len(outside.logits):
        found["ood_accepted"] = float((~rejector.rejected(outside.logits, outside.features)).mean())
    return found


def errors_rows(report: EvalReport) -> list[dict[str, Any]]:
    """Misclassified files, most confident mistakes first."""
    wrong = [f for f in report.files if f["true"] != f["predicted"]]
    return sorted(wrong, key=lambda f: -f["confidence"])
