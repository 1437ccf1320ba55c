"""Every metric clothcli reports, computed once in NumPy whatever backend produced the logits.

The classification report (accuracy, P/R/F1 weighted, micro, macro and per class, the confusion
matrix), calibration (expected calibration error over 15 equal-width bins, NLL, Brier score) and
the out-of-distribution scores: the maximum softmax probability (Hendrycks and Gimpel 2017) and the
negative energy T·logsumexp(logits / T) (Liu et al. 2020), each summarised by its AUROC and by the
false-positive rate at the threshold that keeps a target share of in-distribution images.
Training-time validation keeps torchmetrics; the tests hold these functions equal to it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

N_BINS = 15
SCORES = ("msp", "energy")


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) in float64: the probabilities every command shows."""
    return softmax(np.asarray(logits, dtype=np.float64) / temperature)


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


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator with 0 where the denominator is 0 (torchmetrics' zero_division=0)."""
    return np.divide(numerator, denominator, out=np.zeros_like(numerator, dtype=float), where=denominator > 0)


def classification_report(preds: np.ndarray, targets: np.ndarray, classes: list[str]) -> ClassificationReport:
    """Accuracy, weighted/micro/macro and per-class P/R/F1 and the confusion matrix of class indices."""
    k = len(classes)
    preds, targets = np.asarray(preds, dtype=np.int64), np.asarray(targets, dtype=np.int64)
    n = int(targets.size)
    correct = int((preds == targets).sum())
    matrix = np.bincount(targets * k + preds, minlength=k * k).reshape(k, k) if n else np.zeros((k, k), int)
    report = ClassificationReport(
        n=n,
        correct=correct,
        accuracy=correct / n if n else 0.0,
        error_rate=1 - correct / n if n else 0.0,
        classes=list(classes),
        confusion_matrix=matrix.tolist(),
    )
    if n == 0:
        return report
    true_pos = np.diag(matrix).astype(float)
    predicted, support = matrix.sum(0).astype(float), matrix.sum(1).astype(float)
    precision, recall = _ratio(true_pos, predicted), _ratio(true_pos, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    # torchmetrics averages over the classes present in targets or predictions
    present = (support + predicted) > 0
    weights = support / support.sum()
    micro = correct / n
    scores = {"precision": precision, "recall": recall, "f1": f1}
    report.averages = {
        "weighted": {name: float((v * weights).sum()) for name, v in scores.items()},
        "micro": {name: micro for name in scores},
        "macro": {name: float(v[present].mean()) for name, v in scores.items()},
    }
    report.per_class = [
        {"class": c, "precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
         "support": int(support[i])}
        for i, c in enumerate(classes)
    ]  # fmt: skip
    report.balanced_accuracy = float(recall[present].mean())
    return report


def confused_pairs(matrix: list[list[int]], classes: list[str], top: int | None = None) -> list[dict[str, Any]]:
    """Pairs of classes by how often they were taken for each other, both directions counted (fastai's
    `most_confused` lists one direction at a time; a pair is what a practitioner looks into): class
    `a`, class `b`, `a_as_b` (true a, predicted b), `b_as_a` and their `total`, most confused first."""
    counts = np.asarray(matrix, dtype=np.int64).reshape(len(classes), len(classes))
    pairs = [
        {"a": classes[i], "b": classes[j], "a_as_b": int(counts[i, j]), "b_as_a": int(counts[j, i]),
         "total": int(counts[i, j] + counts[j, i])}
        for i in range(len(classes)) for j in range(i + 1, len(classes)) if counts[i, j] + counts[j, i]
    ]  # fmt: skip
    pairs.sort(key=lambda p: (-p["total"], -max(p["a_as_b"], p["b_as_a"]), p["a"], p["b"]))
    return pairs if top is None else pairs[:top]


@dataclass
class Calibration:
    """How well confidences match accuracy on one set of images."""

    ece: float  # expected calibration error, |accuracy - confidence| averaged over 15 bins
    nll: float  # mean negative log-likelihood of the true class
    brier: float  # mean squared distance between the probabilities and the one-hot truth

    def to_dict(self) -> dict[str, float]:
        return {"ece": self.ece, "nll": self.nll, "brier": self.brier}


def _bins(confidence: np.ndarray) -> np.ndarray:
    """torchmetrics' bucketing: float32 boundaries, a bin holds [lower, upper)."""
    boundaries = np.linspace(0, 1, N_BINS + 1, dtype=np.float32)
    return np.clip(np.searchsorted(boundaries, confidence.astype(np.float32), side="right") - 1, 0, N_BINS - 1)


def calibration(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> Calibration:
    """ECE (15 equal-width bins), NLL and Brier score of softmax(`logits` / `temperature`); log-probabilities
    may stand for logits (their softmax is the probabilities themselves)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    probs = softmax(scaled)
    targets = np.asarray(targets, dtype=np.int64)
    confidence, predicted = probs.max(1), probs.argmax(1)
    accurate = (predicted == targets).astype(float)
    bins = _bins(confidence)
    ece = 0.0
    for b in range(N_BINS):
        inside = bins == b
        if inside.any():
            ece += inside.mean() * abs(accurate[inside].mean() - confidence[inside].mean())
    one_hot = np.eye(probs.shape[1])[targets]
    nll = -log_softmax(scaled)[np.arange(len(targets)), targets].mean()
    return Calibration(float(ece), float(nll), float(((probs - one_hot) ** 2).sum(1).mean()))


@dataclass
class ReliabilityBins:
    """The reliability diagram's data: per non-empty bin, its left edge, mean confidence, accuracy and share."""

    lefts: list[float]
    confidence: list[float]
    accuracy: list[float]
    share: list[float]
    calibration: Calibration
    n_bins: int = N_BINS


def reliability_bins(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> ReliabilityBins:
    probs = probabilities(logits, temperature)
    confidence, correct = probs.max(1), (probs.argmax(1) == np.asarray(targets)).astype(float)
    bins = _bins(confidence)
    rows = [(b / N_BINS, confidence[bins == b].mean(), correct[bins == b].mean(), (bins == b).mean())
            for b in range(N_BINS) if (bins == b).any()]  # fmt: skip
    lefts, conf, acc, share = (list(map(float, column)) for column in zip(*rows)) if rows else ([], [], [], [])
    return ReliabilityBins(lefts, conf, acc, share, calibration(logits, targets, temperature))


def ood_scores(logits: np.ndarray, temperature: float = 1.0) -> dict[str, np.ndarray]:
    """Per image, each score (higher: more like the training data)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    peak = scaled.max(1)
    return {
        "msp": softmax(scaled).max(1),
        "energy": temperature * (peak + np.log(np.exp(scaled - peak[:, None]).sum(1))),
    }


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """The probability that a positive scores above a negative, ties counting half (Mann-Whitney U)."""
    from scipy.stats import rankdata  # here: scipy.stats takes 0.6 s to import, and predict never needs it

    ranks = rankdata(np.concatenate([positive, negative]), method="average")
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def threshold_for_recall(in_scores: np.ndarray, recall: float) -> float:
    """The score at or above which a share `recall` of the in-distribution images lies."""
    ordered = np.sort(in_scores)
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
        return asdict(self)


def separate(inside: dict[str, np.ndarray], outside: dict[str, np.ndarray], recall: float = 0.95) -> list[Separation]:
    """AUROC, the threshold that keeps `recall` of the in-distribution images and the false-positive rate
    there, for each score present in both (higher: more in-distribution)."""
    results = []
    for name in (n for n in inside if n in outside):
        threshold = threshold_for_recall(inside[name], recall)
        results.append(
            Separation(
                score=name,
                auroc=auroc(inside[name], outside[name]),
                threshold=threshold,
                recall=float((inside[name] >= threshold).mean()),
                fpr=float((outside[name] >= threshold).mean()),
            )
        )
    return results


def separation(
    in_logits: np.ndarray, out_logits: np.ndarray, temperature: float = 1.0, recall: float = 0.95
) -> list[Separation]:
    """`separate` for the logit scores."""
    return separate(ood_scores(in_logits, temperature), ood_scores(out_logits, temperature), recall)
