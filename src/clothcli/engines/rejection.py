"""Which images are "unknown": the rejection rule `predict --min-confidence` applies, for any backend.

A number is a floor on the calibrated top-1 probability (the `msp` score). `auto` is what
`clothcli calibrate --ood` stored with the model: the score it chose (`msp`, `energy`, `knn` or
`mahalanobis`) and the threshold that keeps the requested share of the validation images. The feature
scores read the model's `features` output and the bank stored beside the model
(`Classifier.bank_path`), whose SHA-256 the model's metadata names; they need no temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clothcli.backends import Classifier
from clothcli.errors import UserError
from clothcli.feature_scores import FEATURE_SCORES, FeatureBank, load_bank
from clothcli.io_utils import file_sha256
from clothcli.metrics import ood_scores
from clothcli.predictions import parse_min_confidence

LOGIT_SCORES = ("msp", "energy")
ALL_SCORES = (*LOGIT_SCORES, *FEATURE_SCORES)


def stored_bank(classifier: Classifier, dim: int | None = None) -> FeatureBank | None:
    """The feature bank `calibrate --ood` stored with the model, checked against the digest in the model's
    metadata; None when the model has none."""
    expected = classifier.meta.get("ood_bank_sha256")
    if not expected:
        return None
    path = classifier.bank_path
    if not path.is_file():
        raise UserError(f"{path}: the out-of-distribution bank stored with {classifier.source} is missing")
    if file_sha256(path) != expected:
        raise UserError(f"{path}: not the bank calibrate stored with {classifier.source} (the SHA-256 differs)")
    return load_bank(path, dim=dim, classes=len(classifier.classes))


def all_scores(
    logits: np.ndarray, features: np.ndarray | None, temperature: float, bank: FeatureBank | None
) -> dict[str, np.ndarray]:
    """Every score that can be computed: the logit scores, and the feature scores with a bank."""
    found = ood_scores(logits, temperature)
    if bank is not None and features is not None:
        found.update(bank.scores(features))
    return found


@dataclass
class Rejector:
    """Rejects an image whose `method` score is below `threshold`."""

    method: str
    threshold: float
    temperature: float = 1.0
    bank: FeatureBank | None = None

    @property
    def needs_features(self) -> bool:
        return self.method in FEATURE_SCORES

    def score(self, logits: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        if self.method == "knn":
            return self.bank.knn(features)
        if self.method == "mahalanobis":
            return self.bank.mahalanobis(features)
        return ood_scores(logits, self.temperature)[self.method]

    def rejected(self, logits: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        """One bool per row: below the threshold."""
        if self.threshold <= 0.0 and self.method == "msp":
            return np.zeros(len(logits), dtype=bool)
        return self.score(logits, features) < self.threshold


def rejector_for(classifier: Classifier, min_confidence: float | str, bank: FeatureBank | None = None) -> Rejector:
    """The rule `--min-confidence` names: a number (a floor on the calibrated top-1 probability) or `auto`
    (the stored method and threshold; a calibrated probability for the logit scores). `bank`: the model's
    stored bank when the caller has already read it."""
    value = parse_min_confidence(min_confidence)
    if value != "auto":
        return Rejector("msp", float(value), classifier.temperature)
    if classifier.ood_threshold is None:
        raise UserError(
            f"{classifier.source}: no stored rejection threshold for --min-confidence auto; "
            "run clothcli calibrate RUN --ood FOLDER first"
        )
    method = str(classifier.meta.get("ood_method") or "msp")
    if method not in ALL_SCORES:
        raise UserError(f"{classifier.source}: unknown stored rejection method '{method}'")
    if method in LOGIT_SCORES and classifier.temperature != classifier.stored_temperature:
        raise UserError(f"--min-confidence auto uses {method} on calibrated logits: drop --no-calibration")
    if method in FEATURE_SCORES and bank is None:
        bank = stored_bank(classifier)
    if method in FEATURE_SCORES and not getattr(classifier, "has_features", True):
        raise UserError(f"{classifier.source}: no features output for the stored {method} score; export it again")
    return Rejector(method, float(classifier.ood_threshold), classifier.stored_temperature, bank)
