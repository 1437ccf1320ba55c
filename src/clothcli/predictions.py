"""What a prediction is, whatever backend made it, and how `--min-confidence` is read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clothcli.errors import UserError


@dataclass
class Prediction:
    """One image's top-k labels and probabilities, or why it could not be read."""

    path: Path
    labels: list[str]
    probs: list[float]
    error: str = ""
    rejected_by: str = ""  # the score that made the label "unknown" (msp, energy, knn, mahalanobis), or ""

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
