"""`analyze-data`: what is in a dataset before anyone trains on it.

Counts and balance per split and class, image properties from headers, unreadable files,
and duplicates (exact: content hash; near: a 256-bit difference hash) within and across splits.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from clothcli.data.duplicates import FileAudit, find_duplicates, inspect_file
from clothcli.data.layout import DatasetIndex
from clothcli.data.sources import open_dataset


def _distribution(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "min": min(values),
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "max": max(values),
    }


def balance_weights(counts: list[int]) -> dict[str, list[float]]:
    """Inverse-frequency class weights (mean 1 over samples) and per-sample sampler weights."""
    total, k = sum(counts), len(counts)
    class_weights = [total / (k * c) if c else 0.0 for c in counts]
    sampler_weights = [1.0 / c if c else 0.0 for c in counts]
    return {"class_weights": class_weights, "sampler_weights": sampler_weights}


@dataclass
class DatasetAudit:
    """What `analyze-data` found; each field is plain data, as the JSON output holds it."""

    root: str
    classes: list[str]
    splits: dict[str, dict[str, Any]]  # per split: directory, total, classes, shares, imbalance_ratio, skipped
    balance: dict[str, list[float]]  # class_weights and sampler_weights for the training split
    images: dict[str, Any]  # count, sizes, width, height, aspect_ratio, modes, formats, file_bytes
    unreadable: list[dict[str, str]]
    duplicates: list[dict[str, Any]]
    warnings: list[str]
    deep: bool
    # with image_issues: cleanvision's dark, blurry, low-information, odd-size and odd-aspect images
    image_issues: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def audit_dataset(
    root: str | Path,
    deep: bool = False,
    workers: int = 4,
    progress: Callable[[int, int], None] | None = None,
    image_issues: bool = False,
) -> DatasetAudit:
    """Analyse every split of `root`; with `image_issues`, cleanvision's image-quality checks too."""
    if image_issues:
        from clothcli.data.image_issues import require_cleanvision

        require_cleanvision()  # before any image is read
    index: DatasetIndex = open_dataset(root).index
    jobs = [
        (path, split.name, index.classes[target]) for split in index.splits.values() for path, target in split.samples
    ]
    reports: list[FileAudit] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, report in enumerate(pool.map(lambda j: inspect_file(*j, deep=deep), jobs), 1):
            reports.append(report)
            if progress:
                progress(i, len(jobs))

    splits = {}
    for name, split in index.splits.items():
        counts = split.class_counts(len(index.classes))
        total = sum(counts)
        nonzero = [c for c in counts if c]
        splits[name] = {
            "directory": str(split.directory),
            "total": total,
            "classes": dict(zip(index.classes, counts)),
            "shares": {c: (n / total if total else 0.0) for c, n in zip(index.classes, counts)},
            "imbalance_ratio": (max(nonzero) / min(nonzero)) if nonzero else None,
            "skipped": [{"path": str(s.path), "reason": s.reason} for s in split.skipped],
        }
    train_counts = index.splits["train"].class_counts(len(index.classes))

    readable = [r for r in reports if r.error is None]
    sizes = Counter(f"{r.width}x{r.height}" for r in readable)
    aspects = [r.width / r.height for r in readable if r.height]
    aspect_bins = Counter(
        "portrait (<0.9)" if a < 0.9 else "landscape (>1.1)" if a > 1.1 else "square-ish" for a in aspects
    )
    return DatasetAudit(
        root=str(index.root),
        classes=index.classes,
        splits=splits,
        balance=balance_weights(train_counts),
        images={
            "count": len(reports),
            "sizes": dict(sizes.most_common()),
            "width": _distribution([r.width for r in readable]),
            "height": _distribution([r.height for r in readable]),
            "aspect_ratio": {**_distribution(aspects), "bins": dict(aspect_bins)},
            "modes": dict(Counter(r.mode for r in readable).most_common()),
            "formats": dict(Counter(r.format for r in readable).most_common()),
            "file_bytes": {
                **_distribution([r.size_bytes for r in reports]),
                "total": sum(r.size_bytes for r in reports),
            },
        },
        unreadable=[{"path": str(r.path), "split": r.split, "reason": r.error} for r in reports if r.error is not None],
        duplicates=find_duplicates(reports),
        warnings=index.warnings,
        deep=deep,
        image_issues=_image_issues(readable, workers) if image_issues else None,
    )


def _image_issues(readable: list[FileAudit], workers: int) -> dict[str, Any]:
    import os

    from clothcli.data.image_issues import find_image_issues

    processes = max(1, min(workers, os.cpu_count() or 1))
    images = [(str(r.path), r.split, r.label) for r in readable]
    sizes = [(r.width, r.height) for r in readable if r.width and r.height]
    found = find_image_issues(images, sizes, processes)
    return found.to_dict()
