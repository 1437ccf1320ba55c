"""Exact and near duplicates: a content hash and a 256-bit difference hash per image, grouped.

`analyze-data` reports the groups; the split made for a dataset without split folders keeps each
group in one split (`data.splits`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clothcli.data.images import ImageReadError, load_rgb, read_image_bytes, read_info
from clothcli.data.near_duplicates import near_groups

HASH_SIDE = 16  # dHash grid: 16x16 = 256 bits
FLAT_LEVELS = 2  # grey levels (of 255) of difference below which a dHash bit stays unset
HASH_DECODE = 128  # short side the photo is decoded at before its thumbnail (JPEG draft: fast)
# Hamming distance (of 256 bits) that counts as "near". Measured on clothing-dataset-small (3,781 photos,
# benchmarks/planted_duplicates.py): 1,200 copies resized to 0.33x-1.5x and re-encoded at JPEG quality
# 60-90 stay within 14 bits of their originals (median 2-4), and the closest two different garments,
# on the same floor or background, are 35 apart.
NEAR_DUPLICATE_BITS = 18
_JPEG_END = b"\xff\xd9"
_PNG_END = b"IEND"


@dataclass
class FileAudit:
    """What one pass learnt about one file."""

    path: Path
    split: str
    label: str
    size_bytes: int
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    format: str | None = None
    sha256: str | None = None
    dhash: np.ndarray | None = None
    error: str | None = None


def dhash(img: Image.Image) -> np.ndarray:
    """256-bit difference hash of a grayscale thumbnail: robust to resizing and re-encoding.

    A bit is set where a thumbnail cell is brighter than its left neighbour by more than FLAT_LEVELS:
    in flat regions (a plain shirt on a plain floor) the sign of a difference of a level or two is noise
    that resizing and re-encoding flip, and leaving those bits unset keeps copies together. The thumbnail
    is made with Lanczos from a decode at HASH_DECODE px: bilinear's wider blur from a smaller decode left
    garment outlines only, so different shirts on one background came within 12 bits of each other."""
    small = np.asarray(
        img.convert("L").resize((HASH_SIDE + 1, HASH_SIDE), Image.Resampling.LANCZOS),
        dtype=np.int16,
    )
    return (small[:, 1:] > small[:, :-1] + FLAT_LEVELS).flatten()


def _tail_looks_truncated(data: bytes, fmt: str) -> bool:
    tail = data[-1024:]
    if fmt == "JPEG":
        return _JPEG_END not in tail
    if fmt == "PNG":
        return _PNG_END not in tail
    return False


def inspect_file(path: Path, split: str, label: str, deep: bool = False) -> FileAudit:
    """Header, hashes and an end-marker check (full decode with `deep`) for one file."""
    try:
        data = read_image_bytes(path)
    except ImageReadError as exc:  # an embedded image whose row holds no bytes
        return FileAudit(path=path, split=split, label=label, size_bytes=0, error=str(exc))
    report = FileAudit(path=path, split=split, label=label, size_bytes=len(data))
    report.sha256 = hashlib.sha256(data).hexdigest()
    try:
        info = read_info(path)
        report.width, report.height, report.mode, report.format = (info.width, info.height, info.mode, info.format)
        if _tail_looks_truncated(data, info.format):
            raise ImageReadError(f"truncated image (no {info.format} end marker)")
        if deep:
            load_rgb(path)
        # Always hash the same reduced decode, so --deep finds the same duplicates.
        report.dhash = dhash(load_rgb(path, min_size=HASH_DECODE))
    except ImageReadError as exc:
        report.error = str(exc)
    return report


def find_duplicates(reports: list[FileAudit], max_bits: int = NEAR_DUPLICATE_BITS) -> list[dict]:
    """Groups of identical (same bytes) or near-identical (dHash within `max_bits` of 256) images."""
    ok = [r for r in reports if r.dhash is not None]
    # identical bytes have identical difference hashes: the near groups hold the exact duplicates too
    found = near_groups(np.stack([r.dhash for r in ok]), max_bits) if ok else []
    groups = []
    for group in found:
        members = [ok[i] for i in group]
        exact = len({m.sha256 for m in members}) == 1
        groups.append(
            {
                "kind": "exact" if exact else "near",
                "paths": [str(m.path) for m in members],
                "splits": sorted({m.split for m in members}),
                "labels": sorted({m.label for m in members}),
                "cross_split": len({m.split for m in members}) > 1,
                "conflicting_labels": len({m.label for m in members}) > 1,
            }
        )
    groups.sort(key=lambda g: (not g["conflicting_labels"], not g["cross_split"], g["paths"][0]))
    return groups
