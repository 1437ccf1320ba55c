"""The evaluation metrics in NumPy, for the ONNX Runtime path that must not import PyTorch.

Each function returns what its PyTorch counterpart returns (`metrics.classification_report`,
`calibration.calibration`, `ood.separation`); tests hold them equal on the same inputs.
"""

from __future__ import annotations

import numpy as np

from clothcli.evaluation_report import ClassificationReport

N_BINS = 15  # as calibration.N_BINS


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


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


def calibration(log_probs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """ECE (15 equal-width bins), NLL and Brier score of softmax(`log_probs`)."""
    probs = softmax(log_probs)
    targets = np.asarray(targets, dtype=np.int64)
    confidence, predicted = probs.max(1), probs.argmax(1)
    accurate = (predicted == targets).astype(float)
    # torchmetrics' bucketing: float32 boundaries, a bin holds [lower, upper)
    boundaries = np.linspace(0, 1, N_BINS + 1, dtype=np.float32)
    bins = np.clip(np.searchsorted(boundaries, confidence.astype(np.float32), side="right") - 1, 0, N_BINS - 1)
    ece = 0.0
    for b in range(N_BINS):
        inside = bins == b
        if inside.any():
            ece += inside.mean() * abs(accurate[inside].mean() - confidence[inside].mean())
    one_hot = np.eye(probs.shape[1])[targets]
    nll = -log_softmax(log_probs)[np.arange(len(targets)), targets].mean()
    return {"ece": float(ece), "nll": float(nll), "brier": float(((probs - one_hot) ** 2).sum(1).mean())}


def ood_scores(logits: np.ndarray, temperature: float = 1.0) -> dict[str, np.ndarray]:
    """Per image, the maximum softmax probability and the negative energy (as `ood.ood_scores`)."""
    scaled = logits.astype(np.float64) / temperature
    peak = scaled.max(1)
    return {
        "msp": softmax(scaled).max(1),
        "energy": temperature * (peak + np.log(np.exp(scaled - peak[:, None]).sum(1))),
    }


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """The probability that a positive scores above a negative, ties counting half (Mann-Whitney U)."""
    scores = np.concatenate([positive, negative])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks over ties
        tied = scores == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def separation(
    in_logits: np.ndarray, out_logits: np.ndarray, temperature: float = 1.0, recall: float = 0.95
) -> list[dict[str, float | str]]:
    """Per score: AUROC, the threshold that keeps `recall` of the in-distribution images, and the share of
    out-of-distribution images at or above it (as `ood.separation(...).to_dict()`)."""
    inside, outside = ood_scores(in_logits, temperature), ood_scores(out_logits, temperature)
    rows = []
    for name in ("msp", "energy"):
        ordered = np.sort(inside[name])
        position = min(max(int((1.0 - recall) * len(ordered)), 0), len(ordered) - 1)
        threshold = float(ordered[position])
        rows.append(
            {
                "score": name,
                "auroc": auroc(inside[name], outside[name]),
                "threshold": threshold,
                "recall": float((inside[name] >= threshold).mean()),
                "fpr": float((outside[name] >= threshold).mean()),
            }
        )
    return rows
