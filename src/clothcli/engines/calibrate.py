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
from clothcli.engines.evaluate import fold_run, labelled_outputs, model_outputs, own_split
from clothcli.engines.rejection import ALL_SCORES, Rejector
from clothcli.errors import UserError
from clothcli.feature_scores import K_CHOICES, FeatureBank, fit_bank
from clothcli.formats import is_exported
from clothcli.io_utils import file_sha256
from clothcli.metrics import Calibration, calibration, log_softmax, ood_scores, separate

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


def _candidates(
    logits: np.ndarray, features: np.ndarray | None, temperature: float, bank: FeatureBank | None
) -> dict[str, np.ndarray]:
    """Every rejection score `calibrate --ood` chooses among: the logit scores, Mahalanobis, and kNN at each
    k of `K_CHOICES` (named knn@k)."""
    found = ood_scores(logits, temperature)
    if bank is not None and features is not None:
        found["mahalanobis"] = bank.mahalanobis(features)
        for k in K_CHOICES:
            if k <= len(bank.features):
                found[f"knn@{k}"] = bank.knn(features, k)
    return found


def _rejection(
    fit: tuple[np.ndarray, np.ndarray | None],
    outputs: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    outside: tuple[np.ndarray, np.ndarray | None],
    t: float,
    recall: float,
    bank: FeatureBank | None,
) -> tuple[dict, FeatureBank | None]:
    """The score that separates the fit split from the out-of-distribution images best (the lowest share of
    those accepted at the threshold that keeps `recall` of the fit split; then the highest AUROC), its
    threshold, and what it keeps of each split and of the outside images; the bank with the chosen k."""
    found = separate(_candidates(*fit, t, bank), _candidates(*outside, t, bank), recall)
    best = min(found, key=lambda r: (r.fpr, -r.auroc, ALL_SCORES.index(r.score.partition("@")[0])))
    method, _, k = best.score.partition("@")
    if k:
        bank = bank.with_k(int(k))

    def kept(logits: np.ndarray, features: np.ndarray | None) -> float:
        rejector = Rejector(method, best.threshold, t, bank)
        return float((~rejector.rejected(logits, features)).mean())

    shares = {split: kept(z, f) for split, (z, _, f) in outputs.items()}
    shares["ood"] = kept(*outside)
    rejection = {"method": method, "k": bank.k if method == "knn" else None, "threshold": best.threshold,
                 "recall": recall, "kept": shares, "ood_images": len(outside[0]),
                 "separation": [r.to_dict() for r in found]}  # fmt: skip
    return rejection, bank


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
    bank_size: int | None = None,
) -> CalibrationReport:
    """Fit the temperature on `fit_split`, report calibration before and after on it and on
    `report_splits` that the dataset has, and store the temperature with the model (`write`).

    With `ood` (a folder of images that belong to none of the classes), also build the feature bank of
    the train split (`bank_size` of its images, all by default), choose the rejection score that tells
    `fit_split` from the folder best and its threshold that keeps `recall` of `fit_split`, store them
    (the bank beside the model, `Classifier.bank_path`) for `predict --min-confidence auto`, and report
    what each score keeps and rejects."""
    data = Path(data if data is not None else default_data(model))
    classifier = load_classifier(model, device=device, calibrated=False, in_workers=False)
    splits = available_splits(data, own_split(classifier, data), own_first=fold_run(classifier))
    if fit_split not in splits:
        raise UserError(f"{data}: no {fit_split}/ split to fit the temperature on")
    previous = classifier.meta.get("temperature")
    if bank_size is not None and bank_size < 1:
        raise UserError(f"--bank-size must be at least 1, got {bank_size}")
    features = ood is not None and getattr(classifier, "has_features", True)
    options = {"batch_size": batch_size, "workers": workers, "features": features}
    outputs = {}
    for split in (fit_split, *report_splits):
        if split in splits:
            found = labelled_outputs(classifier, data, split, **options)
            outputs[split] = (found.logits, found.targets, found.outputs.features)
    outside, bank = None, None
    if ood is not None:
        found = model_outputs(classifier, images_under(ood), **options)
        outside = (found.logits, found.features)
        if features and "train" in splits:
            train = labelled_outputs(classifier, data, "train", **options)
            bank = fit_bank(train.outputs.features, train.targets, len(classifier.classes), size=bank_size)
    logits, targets, fit_features = outputs[fit_split]
    temperature = fit_temperature(logits, targets)
    rejection = None
    if outside is not None:
        rejection, bank = _rejection((logits, fit_features), outputs, outside, temperature, recall, bank)
    splits = {
        split: {"before": calibration(z, t), "after": calibration(z, t, temperature)}
        for split, (z, t, _) in outputs.items()
    }
    accuracy = {split: float((z.argmax(1) == t).mean()) for split, (z, t, _) in outputs.items()}
    if write:
        stored = {"temperature": temperature, "temperature_fitted_on": fit_split}
        if rejection is not None:
            stored.update(ood_threshold=rejection["threshold"], ood_recall=recall, ood_method=rejection["method"])
            if bank is not None:
                bank.save(classifier.bank_path)
                stored["ood_bank_sha256"] = file_sha256(classifier.bank_path)
        classifier.store(**stored)
    return CalibrationReport(str(classifier.source), temperature, previous, splits, accuracy, rejection)
