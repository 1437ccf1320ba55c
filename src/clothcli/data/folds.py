"""k-fold cross-validation splits: one fold of the train and validation images held out as validation.

The train and validation images are pooled and split into `folds` folds by scikit-learn's
StratifiedGroupKFold: stratified by class, and grouped by duplicate group (exact copies and near
duplicates within 18 bits of the difference hash, as the split of an unsplit folder groups them), so
a resized copy of a photo never trains a fold whose held-out part holds the original. The folds are
seeded by `data.split.seed` and depend on nothing else: every run of a fold group, and every group
of one dataset and seed, holds out the same images. The test split is left as it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clothcli.data.layout import DatasetIndex, SplitIndex
from clothcli.data.splits import group_ids
from clothcli.errors import UserError, require_packages

DATA_EXTRA = "pip install 'clothcli[data]'"
FOLDS_FILE = "folds.json"  # what a fold group (`train --folds`) records; `compare` reads it


def fold_numbers(items: list[tuple[Path, str]], folds: int, seed: int, workers: int = 4) -> list[int]:
    """The fold (0 to folds - 1) of each (path, label), stratified by label and grouped by duplicates."""
    require_packages(("sklearn",), "k-fold cross-validation", DATA_EXTRA)
    from sklearn.model_selection import StratifiedGroupKFold

    group_of, _, _ = group_ids(items, workers)
    labels = np.array([label for _, label in items])
    smallest = min(np.unique(labels, return_counts=True)[1])
    if smallest < folds:
        raise UserError(f"{folds} folds need at least {folds} images of every class; one class has {smallest}")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    numbers = np.zeros(len(items), dtype=np.int64)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(items)), labels, np.array(group_of))):
        numbers[held_out] = fold
    return numbers.tolist()


def hold_out_fold(index: DatasetIndex, folds: int, fold: int, seed: int, workers: int = 4) -> DatasetIndex:
    """`index` with fold `fold` of the pooled train and validation images as its validation split and the
    other folds as train."""
    if not 0 <= fold < folds:
        raise UserError(f"data.fold must be from 0 to {folds - 1} for {folds} folds, got {fold}")
    pooled = [(path, target) for name in ("train", "validation") if name in index.splits
              for path, target in index.splits[name].samples]  # fmt: skip
    pooled.sort(key=lambda item: str(item[0]))
    items = [(path, index.classes[target]) for path, target in pooled]
    numbers = fold_numbers(items, folds, seed, workers)
    train, held = SplitIndex("train", index.root), SplitIndex("validation", index.root)
    for (path, target), number in zip(pooled, numbers):
        (held if number == fold else train).samples.append((path, target))
    if "train" in index.splits:
        train.skipped = index.splits["train"].skipped
    splits = {"train": train, "validation": held, **{k: v for k, v in index.splits.items() if k == "test"}}
    warnings = [w for w in index.warnings if "no validation" not in w]
    return DatasetIndex(index.root, index.classes, splits, warnings)
