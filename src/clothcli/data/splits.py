"""Splitting images that arrive without split folders: seeded, stable, grouped by duplicates.

Exact duplicates (the same bytes) and near duplicates (a 256-bit difference hash within 18 bits,
as `analyze-data` finds them) form groups, and a group is never divided between splits: a resized
or re-encoded copy of a training photo cannot sit in test. Each group goes to a split by a hash of
its key (the smallest content hash among its members) and the split seed, compared with the
validation and test shares, so the split is stratified in expectation within every class and
adding images later never moves the ones already assigned (as TensorFlow Datasets keeps splits
stable). A class with fewer than MIN_GROUPS groups stays in train; a group whose labels disagree is
left out (it is not known which label is right) unless conflicts are kept.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clothcli.config import SplitConfig
from clothcli.data.duplicates import NEAR_DUPLICATE_BITS, inspect_file
from clothcli.data.near_duplicates import groups_of, near_groups

SPLITS_FILE = "splits.csv"
SPLIT_COLUMNS = ["path", "class", "split", "group"]
MIN_GROUPS = 10  # fewer duplicate groups than this in a class: too small to stratify, kept in train


@dataclass
class Assignment:
    path: Path
    label: str
    split: str
    group: str  # the group's key: the smallest content hash of its members (16 hex digits)


@dataclass
class SplitPlan:
    """Where every image went, and what the grouping did."""

    assignments: list[Assignment]
    groups_kept_together: int = 0  # groups of two or more images, each in one split
    grouped_images: int = 0
    left_out: list[dict] = field(default_factory=list)  # conflicting groups: paths and labels
    small_classes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def draw(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by the group's key and the split seed."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:16], 16) / 2**64


def group_ids(items: list[tuple[Path, str]], workers: int) -> tuple[list[int], list[str], list[str]]:
    """Per item: its duplicate group (an index), and its content hash; and warnings."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        audits = list(pool.map(lambda item: inspect_file(item[0], "", item[1]), items))
    hashes = [a.sha256 or "" for a in audits]
    pairs: list[tuple[int, int]] = []
    first: dict[str, int] = {}
    for i, digest in enumerate(hashes):
        if digest in first:
            pairs.append((first[digest], i))
        else:
            first[digest] = i
    warnings = []
    readable = [i for i, a in enumerate(audits) if a.dhash is not None]
    if readable:
        bits = np.stack([audits[i].dhash for i in readable])
        for group in near_groups(bits, max_bits=NEAR_DUPLICATE_BITS):
            pairs.extend((readable[group[0]], readable[i]) for i in group[1:])
    group_of = list(range(len(items)))
    for members in groups_of(len(items), pairs):
        for i in members:
            group_of[i] = members[0]
    return group_of, hashes, warnings


def plan_splits(
    items: list[tuple[Path, str]], cfg: SplitConfig, validation: float | None = None, test: float | None = None,
    workers: int = 4,
) -> SplitPlan:  # fmt: skip
    """Assign every (path, label) to train, validation or test (`validation`/`test` override the shares)."""
    start = time.perf_counter()
    shares = {
        "test": cfg.test if test is None else test,
        "validation": cfg.validation if validation is None else validation,
    }
    group_of, hashes, warnings = group_ids(items, workers)
    members: dict[int, list[int]] = {}
    for i, group in enumerate(group_of):
        members.setdefault(group, []).append(i)
    plan = SplitPlan(assignments=[], warnings=warnings)
    kept: list[list[int]] = []
    for group in members.values():
        labels = sorted({items[i][1] for i in group})
        if len(labels) > 1 and not cfg.keep_conflicts:
            plan.left_out.append({"paths": [str(items[i][0]) for i in group], "labels": labels})
            continue
        kept.append(group)
    groups_per_class = Counter(items[group[0]][1] for group in kept)
    plan.small_classes = sorted(c for c, n in groups_per_class.items() if n < MIN_GROUPS)
    for group in kept:
        key = min(hashes[i] for i in group)[:16]
        u = draw(key, cfg.seed)
        split = "test" if u < shares["test"] else "validation" if u < shares["test"] + shares["validation"] else "train"
        if items[group[0]][1] in plan.small_classes:
            split = "train"
        if len(group) > 1:
            plan.groups_kept_together += 1
            plan.grouped_images += len(group)
        plan.assignments += [Assignment(items[i][0], items[i][1], split, key) for i in group]
    plan.assignments.sort(key=lambda a: str(a.path))
    if plan.small_classes:
        plan.warnings.append(
            f"class(es) with fewer than {MIN_GROUPS} distinct images kept in train only: "
            + ", ".join(plan.small_classes)
        )
    if plan.left_out:
        plan.warnings.append(
            f"{len(plan.left_out)} duplicate group(s) whose labels disagree left out "
            f"({sum(len(g['paths']) for g in plan.left_out)} images; data.split.keep_conflicts keeps them)"
        )
    plan.seconds = time.perf_counter() - start
    return plan


def splits_csv(rows: list[Assignment], root: Path) -> str:
    """The split as CSV text: path (relative to `root` where inside it), class, split, group."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(SPLIT_COLUMNS)
    root = Path(os.path.abspath(root))
    for row in rows:
        path = Path(os.path.abspath(row.path))
        path = path.relative_to(root) if path.is_relative_to(root) else path
        writer.writerow([path.as_posix(), row.label, row.split, row.group])
    return buffer.getvalue()
