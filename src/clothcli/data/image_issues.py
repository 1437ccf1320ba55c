"""Image-quality issues (`analyze-data --image-issues`): dark, blurry, low-information, odd-size and
odd-aspect images, found by cleanvision.

cleanvision scores every image on each property (0 worst, 1 best) and flags those below its threshold.
Its duplicate checks are not asked for (the difference-hash search in `data.duplicates` finds those),
nor are light and grayscale images (a white studio background and a black-and-white photo are normal
here). One setting is chosen from the data: cleanvision flags an odd size outside the interquartile
range of sqrt(width x height) widened by 3 ranges on each side, and where most photos come from one
camera that range is a pixel or two (clothing-dataset-small: 400 x 533 and 400 x 534), so every other
size would be flagged; the widening is raised until the band reaches at least half the median side on
each side. Images reach cleanvision through the reader every other command uses, so images inside
Parquet files are checked too.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from clothcli.data.images import ImageReadError, load_rgb
from clothcli.errors import require_packages

ISSUE_TYPES = ("dark", "blurry", "low_information", "odd_size", "odd_aspect_ratio")
IQR_FACTOR = 3.0  # cleanvision's default widening of the size band, in interquartile ranges
MIN_BAND = 0.5  # the band reaches at least this share of the median side beyond the quartiles
DATA_EXTRA = "pip install 'clothcli[data]'"


def require_cleanvision() -> None:
    require_packages(("cleanvision",), "--image-issues", DATA_EXTRA)


class ImageList:
    """The images as cleanvision's torchvision-style dataset: item i is (RGB image, 0); an image that
    cannot be read is a 1 x 1 placeholder (it is already listed as unreadable by the audit)."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        try:
            return load_rgb(self.paths[index]), 0
        except (ImageReadError, OSError):
            return Image.new("RGB", (1, 1)), 0


@dataclass
class ImageIssues:
    """Per issue type, the flagged images (path, split, label, score), worst first."""

    checked: int
    found: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def flagged(self) -> int:
        return len({item["path"] for items in self.found.values() for item in items})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flagged": self.flagged}


def size_band_factor(sizes: Sequence[tuple[int, int]]) -> float:
    """cleanvision's `iqr_factor` for these (width, height) sizes: its default, or more where the
    quartiles of sqrt(area) are so close that the band would be narrower than MIN_BAND of the median."""
    sides = np.sqrt(np.asarray([w * h for w, h in sizes], dtype=np.float64))
    if not len(sides):
        return IQR_FACTOR
    q1, median, q3 = np.percentile(sides, [25, 50, 75])
    spread = q3 - q1
    if spread * IQR_FACTOR >= MIN_BAND * median:
        return IQR_FACTOR
    return float(MIN_BAND * median / max(spread, 1e-6))


def find_image_issues(
    images: list[tuple[str, str, str]], sizes: Sequence[tuple[int, int]] = (), workers: int = 2
) -> ImageIssues:
    """`images` as (path, split, label), with their (width, height) `sizes` from the headers when known
    (they set the odd-size band, `size_band_factor`); cleanvision's verdict on each of ISSUE_TYPES."""
    require_cleanvision()
    from cleanvision import Imagelab

    result = ImageIssues(checked=len(images), found={name: [] for name in ISSUE_TYPES})
    if not images:
        return result
    dataset = ImageList([path for path, _, _ in images])
    checks: dict[str, dict[str, float]] = {name: {} for name in ISSUE_TYPES}
    checks["odd_size"] = {"iqr_factor": size_band_factor(sizes)}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        lab = Imagelab(torchvision_dataset=dataset, verbose=False)
        lab.find_issues(checks, n_jobs=max(1, workers), verbose=False)
    table = lab.issues
    for name in ISSUE_TYPES:
        flagged = table[table[f"is_{name}_issue"]].sort_values(f"{name}_score")
        result.found[name] = [
            {"path": images[i][0], "split": images[i][1], "label": images[i][2], "score": float(score)}
            for i, score in zip(flagged.index, flagged[f"{name}_score"])
        ]
    return result
