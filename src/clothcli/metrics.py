"""The classification report, computed with torchmetrics' functional API."""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from clothcli.evaluation_report import ClassificationReport


def classification_report(preds: torch.Tensor, targets: torch.Tensor, classes: list[str]) -> ClassificationReport:
    """The report for predicted class indices `preds` against true indices `targets` (same length)."""
    k = len(classes)
    preds = preds.long().cpu()
    targets = targets.long().cpu()
    n = int(targets.numel())
    correct = int((preds == targets).sum())
    report = ClassificationReport(
        n=n,
        correct=correct,
        accuracy=correct / n if n else 0.0,
        error_rate=1 - correct / n if n else 0.0,
        classes=list(classes),
        confusion_matrix=[[0] * k for _ in range(k)],
    )
    if n == 0:
        return report
    args = {"preds": preds, "target": targets, "num_classes": k}
    for average in ("weighted", "micro", "macro"):
        report.averages[average] = {
            "precision": float(multiclass_precision(**args, average=average, zero_division=0)),
            "recall": float(multiclass_recall(**args, average=average, zero_division=0)),
            "f1": float(multiclass_f1_score(**args, average=average, zero_division=0)),
        }
    precision = multiclass_precision(**args, average="none", zero_division=0)
    recall = multiclass_recall(**args, average="none", zero_division=0)
    f1 = multiclass_f1_score(**args, average="none", zero_division=0)
    support = torch.bincount(targets, minlength=k)
    report.per_class = [
        {
            "class": c,
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, c in enumerate(classes)
    ]
    report.confusion_matrix = multiclass_confusion_matrix(**args).tolist()
    report.balanced_accuracy = float(multiclass_accuracy(**args, average="macro"))
    return report


def macro_f1(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> float:
    if targets.numel() == 0:
        return 0.0
    return float(multiclass_f1_score(preds, targets, num_classes=num_classes, average="macro", zero_division=0))
