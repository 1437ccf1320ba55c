"""`calibrate`: temperature scaling fitted on validation, for any backend, stored with the model.

Label smoothing and EMA move a network's confidences away from its accuracy. Calibration is measured
with the expected calibration error (15 equal-width bins), the negative log-likelihood and the Brier
score (`metrics.calibration`), and repaired with one scalar: logits divided by a temperature fitted
on validation by minimising the NLL (Guo et al. 2017, "On Calibration of Modern Neural Networks").
Dividing by a positive scalar never changes the predicted class, so accuracy stays.

What is fitted goes into the model's own metadata (`Classifier.store`): checkpoint.json for a
checkpoint, the file's metadata for an exported model (the file is written anew, atomically), so the
model file alone carries it wherever it is copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar

from clothcli.backends import load_classifier
from clothcli.data.inputs import images_under
from clothcli.data.sources import available_splits
from clothcli.engines.evaluate import labelled_outputs, model_outputs, own_split
from clothcli.errors import UserError
from clothcli.formats import is_exported
from clothcli.metrics import Calibration, calibration, log_softmax, ood_scores, separation

# T is searched in [1e-3, 1e6]: a network worse than chance wants T far above 100 (near-uniform probabilities)
LOG_T_BOUNDS = (float(np.log(1e-3)), float(np.log(1e6)))


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature T > 0 that minimises the NLL of softmax(logits / T) (bounded search over log T,
    in float64)."""
    logits = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(targets))

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t))[rows, targets].mean())

    found = minimize_scalar(nll, bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-10})
    return float(np.exp(found.x))


@dataclass
class CalibrationReport:
    """What `clothcli calibrate` fitted and how much it changed, on validation (fitted there) and test."""

    checkpoint: str  # the model's source: a checkpoint folder or an exported file
    temperature: float
    previous_temperature: float | None
    # split -> {"before": Calibration, "after": Calibration}, on the raw and on the scaled logits
    splits: dict[str, dict[str, Calibration]]
    accuracy: dict[str, float]
    # with an out-of-distribution folder: the stored rejection threshold and what it does, per score
    # the AUROC on the fit split, and the share of each split's images the threshold keeps
    rejection: dict | None = None

    def to_dict(self) -> dict:
        return {
            "checkpoint": self.checkpoint,
            "temperature": self.temperature,
            "previous_temperature": self.previous_temperature,
            "splits": {k: {w: c.to_dict() for w, c in v.items()} for k, v in self.splits.items()},
            "accuracy": self.accuracy,
            "rejection": self.rejection,
        }


def _rejection(
    fit: np.ndarray, outputs: dict[str, tuple[np.ndarray, np.ndarray]], outside: np.ndarray, t: float, recall: float
) -> dict:
    """The calibrated top-1 probability that keeps `recall` of the fit split, and what it keeps of each split."""
    found = separation(fit, outside, t, recall)
    threshold = next(r.threshold for r in found if r.score == "msp")
    kept = {split: float((ood_scores(z, t)["msp"] >= threshold).mean()) for split, (z, _) in outputs.items()}
    kept["ood"] = float((ood_scores(outside, t)["msp"] >= threshold).mean())
    return {"threshold": threshold, "recall": recall, "kept": kept, "ood_images": len(outside),
            "separation": [r.to_dict() for r in found]}  # fmt: skip


def default_data(model: str | Path) -> str:
    """The dataset a checkpoint was trained on (its config's data.root), for `calibrate` without --data."""
    if not is_exported(model):
        from clothcli.models.checkpoint import read_meta

        root = (read_meta(model).get("config") or {}).get("data", {}).get("root")
        if root:
            return str(root)
    raise UserError("no dataset given: pass --data PATH")


def calibrate(
    *,
    model: str | Path,
    data: str | Path | None = None,
    fit_split: str = "validation",
    report_splits: tuple[str, ...] = ("test",),
    batch_size: int = 64,
    workers: int = 2,
    device: str | None = None,
    write: bool = True,
    ood: str | Path | None = None,
    recall: float = 0.95,
) -> CalibrationReport:
    """Fit the temperature on `fit_split`, report calibration before and after on it and on
    `report_splits` that the dataset has, and store the temperature with the model (`write`).

    With `ood` (a folder of images that belong to none of the classes), also choose on `fit_split` the
    calibrated top-1 probability that keeps `recall` of its images, store it as the rejection
    threshold that `predict --min-confidence auto` uses, and report what it keeps and rejects."""
    data = Path(data if data is not None else default_data(model))
    classifier = load_classifier(model, device=device, calibrated=False, in_workers=False)
    splits = available_splits(data, own_split(classifier, data))
    if fit_split not in splits:
        raise UserError(f"{data}: no {fit_split}/ split to fit the temperature on")
    previous = classifier.meta.get("temperature")
    outputs = {}
    for split in (fit_split, *report_splits):
        if split in splits:
            found = labelled_outputs(classifier, data, split, batch_size=batch_size, workers=workers)
            outputs[split] = (found.logits, found.targets)
    outside = None
    if ood is not None:
        outside = model_outputs(classifier, images_under(ood), batch_size=batch_size, workers=workers).logits
    logits, targets = outputs[fit_split]
    temperature = fit_temperature(logits, targets)
    rejection = _rejection(logits, outputs, outside, temperature, recall) if outside is not None else None
    splits = {
        split: {"before": calibration(z, t), "after": calibration(z, t, temperature)}
        for split, (z, t) in outputs.items()
    }
    accuracy = {split: float((z.argmax(1) == t).mean()) for split, (z, t) in outputs.items()}
    if write:
        stored = {"temperature": temperature, "temperature_fitted_on": fit_split}
        if rejection is not None:
            stored.update(ood_threshold=rejection["threshold"], ood_recall=recall)
        classifier.store(**stored)
    return CalibrationReport(str(classifier.source), temperature, previous, splits, accuracy, rejection)
