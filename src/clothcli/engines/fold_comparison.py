"""`compare` of fold groups (`train --folds K`): two recipes cross-validated on the same folds, tested
fold by fold with the corrected resampled t-test of Nadeau and Bengio (2003).

The k differences of held-out accuracy are not independent: every two training sets share (k-2)/(k-1)
of their images, so the plain paired t-test understates their variance and calls too many differences
significant (McNemar on the pooled out-of-fold predictions ignores the same dependence). Nadeau and
Bengio's correction multiplies the variance by (1/k + n_test/n_train) instead of 1/k; the statistic
has k - 1 degrees of freedom. Groups that held out different images (another dataset or split seed)
are refused: the test needs the same folds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import t as student_t

from clothcli.data.folds import FOLDS_FILE
from clothcli.engines.comparison import SIGNIFICANCE
from clothcli.errors import UserError
from clothcli.untrusted import read_json


def is_fold_group(path: str | Path) -> bool:
    return (Path(path) / FOLDS_FILE).is_file()


def corrected_resampled_t(differences: list[float], n_train: float, n_test: float) -> tuple[float, float]:
    """Nadeau and Bengio's corrected resampled t statistic of k per-fold differences, and its two-sided
    p-value (k - 1 degrees of freedom)."""
    d = np.asarray(differences, dtype=np.float64)
    k = len(d)
    if k < 2:
        raise UserError("the corrected resampled t-test needs at least 2 folds")
    variance = d.var(ddof=1) * (1.0 / k + n_test / n_train)
    if variance == 0:
        return (0.0, 1.0) if d.mean() == 0 else (math.copysign(math.inf, d.mean()), 0.0)
    statistic = float(d.mean() / math.sqrt(variance))
    return statistic, float(2 * student_t.sf(abs(statistic), k - 1))


@dataclass
class FoldGroup:
    name: str
    folds: int
    model: str
    images: int
    digest: str
    accuracies: list[float]
    macro_f1: list[float]
    fold_images: list[int]

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.accuracies, ddof=1))


@dataclass
class FoldPair:
    a: str
    b: str
    mean_difference: float  # accuracy of a minus b, averaged over folds
    statistic: float
    p_value: float
    significant: bool


@dataclass
class FoldComparison:
    groups: list[FoldGroup] = field(default_factory=list)
    pairs: list[FoldPair] = field(default_factory=list)
    test: str = "corrected resampled t-test (Nadeau and Bengio 2003)"

    def to_dict(self) -> dict[str, Any]:
        found = asdict(self)
        for group, row in zip(self.groups, found["groups"]):
            row.update(mean=group.mean, std=group.std)
        return found


def read_group(path: Path) -> FoldGroup:
    data = read_json(path / FOLDS_FILE)
    try:
        results = sorted(data["results"], key=lambda r: int(r["fold"]))
        group = FoldGroup(
            name=path.name, folds=int(data["folds"]), model=str(data["model"]), images=int(data["images"]),
            digest=str(data["digest"]), accuracies=[float(r["accuracy"]) for r in results],
            macro_f1=[float(r["macro_f1"]) for r in results], fold_images=[int(r["images"]) for r in results],
        )  # fmt: skip
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path / FOLDS_FILE}: not a fold group's record (written by clothcli train --folds)") from None
    if len(group.accuracies) != group.folds:
        raise UserError(f"{path}: {len(group.accuracies)} of {group.folds} folds finished; finish it with the same "
                        "train --folds command")  # fmt: skip
    return group


def compare_fold_groups(paths: list[Path]) -> FoldComparison:
    """Every pair of fold groups, tested fold by fold."""
    if len(paths) < 2:
        raise UserError("compare needs at least two fold groups")
    groups = [read_group(Path(p)) for p in paths]
    first = groups[0]
    for other in groups[1:]:
        if other.folds != first.folds or other.digest != first.digest:
            raise UserError(
                f"{first.name} and {other.name} held out different images ({first.folds} folds, {first.digest} vs "
                f"{other.folds} folds, {other.digest}): fold by fold needs the same dataset, folds and split seed"
            )
    found = FoldComparison(groups)
    n_test = float(np.mean(first.fold_images))
    n_train = first.images - n_test
    for i, a in enumerate(groups):
        for b in groups[i + 1 :]:
            differences = [x - y for x, y in zip(a.accuracies, b.accuracies)]
            statistic, p = corrected_resampled_t(differences, n_train, n_test)
            found.pairs.append(FoldPair(a.name, b.name, float(np.mean(differences)), statistic, p, p < SIGNIFICANCE))
    return found
