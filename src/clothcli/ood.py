"""Telling pictures that are not clothing apart from those that are: out-of-distribution scores.

Two scores from the logits, each higher for images like the training data: the maximum softmax
probability (Hendrycks and Gimpel 2017) of the calibrated probabilities, and the negative energy
T·logsumexp(logits / T) (Liu et al. 2020, "Energy-based Out-of-distribution Detection"). Each is
summarised by the AUROC of in-distribution against out-of-distribution images, and by the false-positive
rate at the threshold that keeps a target share (95%) of in-distribution images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchmetrics.functional.classification import binary_auroc

SCORES = ("msp", "energy")


def ood_scores(logits: torch.Tensor, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Per image, each score (higher: more like the training data)."""
    scaled = logits.float() / temperature
    return {
        "msp": scaled.softmax(1).max(1).values,
        "energy": temperature * torch.logsumexp(scaled, dim=1),
    }


def threshold_for_recall(in_scores: torch.Tensor, recall: float) -> float:
    """The score at or above which a share `recall` of the in-distribution images lies."""
    ordered = in_scores.sort().values
    position = int((1.0 - recall) * len(ordered))
    return float(ordered[min(max(position, 0), len(ordered) - 1)])


@dataclass
class Separation:
    """How one score separates in-distribution images from others."""

    score: str
    auroc: float
    threshold: float  # keeps `recall` of the in-distribution images
    recall: float
    fpr: float  # share of out-of-distribution images at or above the threshold

    def to_dict(self) -> dict[str, float | str]:
        return {"score": self.score, "auroc": self.auroc, "threshold": self.threshold, "recall": self.recall,
                "fpr": self.fpr}  # fmt: skip


def separation(
    in_logits: torch.Tensor, out_logits: torch.Tensor, temperature: float = 1.0, recall: float = 0.95
) -> list[Separation]:
    """AUROC, threshold at `recall` and the false-positive rate there, for each score."""
    inside, outside = ood_scores(in_logits, temperature), ood_scores(out_logits, temperature)
    results = []
    for name in SCORES:
        scores = torch.cat([inside[name], outside[name]])
        labels = torch.cat([torch.ones(len(inside[name])), torch.zeros(len(outside[name]))]).long()
        threshold = threshold_for_recall(inside[name], recall)
        results.append(
            Separation(
                score=name,
                auroc=float(binary_auroc(scores, labels)),
                threshold=threshold,
                recall=float((inside[name] >= threshold).float().mean()),
                fpr=float((outside[name] >= threshold).float().mean()),
            )
        )
    return results
