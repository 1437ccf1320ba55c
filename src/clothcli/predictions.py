"""What a prediction is, whatever backend made it: the labelled row and the rules for "unknown"."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clothcli.errors import UserError
from clothcli.names import UNKNOWN


@dataclass
class Prediction:
    """One image's top-k labels and probabilities, or why it could not be read."""

    path: Path
    labels: list[str]
    probs: list[float]
    error: str = ""

    @property
    def label(self) -> str:
        return self.labels[0] if self.labels else ""

    @property
    def confidence(self) -> float:
        return self.probs[0] if self.probs else 0.0


def parse_min_confidence(value: float | str) -> float | str:
    """A probability in [0, 1], or "auto"; anything else is a UserError (checked before any work)."""
    if value == "auto":
        return value
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"--min-confidence must be a probability between 0 and 1 or 'auto', got '{value}'") from None
    if not 0.0 <= number <= 1.0:
        raise UserError(f"--min-confidence must be between 0 and 1, got {value}")
    return number


def resolve_min_confidence(
    value: float | str, *, stored_threshold: float | None, temperature: float, stored_temperature: float, source: Path
) -> float:
    """The probability below which a label is 'unknown': `value`, or for "auto" the rejection threshold
    that `clothcli calibrate --ood` stored with the model (chosen on calibrated probabilities)."""
    value = parse_min_confidence(value)
    if value != "auto":
        return float(value)
    if stored_threshold is None:
        raise UserError(
            f"{source}: no stored rejection threshold for --min-confidence auto; "
            "run clothcli calibrate RUN --ood FOLDER first"
        )
    if temperature != stored_temperature:
        raise UserError("--min-confidence auto was chosen on calibrated probabilities: drop --no-calibration")
    return float(stored_threshold)


def label_row(probs: list[float], indices: list[int], classes: list[str], min_confidence: float) -> list[str]:
    """The top-k labels of one image, the first one 'unknown' when its probability is below `min_confidence`."""
    labels = [classes[i] for i in indices]
    if probs[0] < min_confidence:
        labels[0] = UNKNOWN
    return labels
