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

from clothcli.data.images import ImageReadError, load_rgb, read_info

HASH_SIDE = 16  # dHash grid: 16x16 = 256 bits
# Hamming distance (of 256 bits) that counts as "near". Calibrated on clothing-dataset-small:
# <= 12 finds the re-saved/identical shots; from 13 on, pairs are different garments that only
# share the photographer's pink background.
NEAR_DUPLICATE_BITS = 12
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


def dhash(img: Image.Image) -> int:
    """256-bit difference hash of a grayscale thumbnail: robust to resizing and re-encoding."""
    small = np.asarray(
        img.convert("L").resize((HASH_SIDE + 1, HASH_SIDE), Image.Resampling.BILINEAR),
        dtype=np.int16,
    )
    return (small[:, 1:] > small[:, :-1]).flatten()


def _tail_looks_truncated(data: bytes, fmt: str) -> bool:
    tail = data[-1024:]
    if fmt == "JPEG":
        return _JPEG_END not in tail
    if fmt == "PNG":
        return _PNG_END not in tail
    return False


def inspect_file(path: Path, split: str, label: str, deep: bool = False) -> FileAudit:
    """Header, hashes and an end-marker check (full decode with `deep`) for one file."""
    data = path.read_bytes()
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
        report.dhash = dhash(load_rgb(path, min_size=64))
    except ImageReadError as exc:
        report.error = str(exc)
    return report


def near_pairs(bits: np.ndarray, max_bits: int, chunk: int = 1024) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose hashes differ in at most `max_bits` bits.

    With bits mapped to +-1, Hamming distance = (n_bits - a.b) / 2, so a chunked matrix product
    compares all pairs in seconds even for tens of thousands of images.
    """
    signs = bits.astype(np.float32) * 2 - 1
    n_bits = signs.shape[1]
    pairs = []
    for start in range(0, len(signs), chunk):
        distance = (n_bits - signs[start : start + chunk] @ signs.T) / 2
        rows, cols = np.nonzero(distance <= max_bits + 0.5)
        pairs.extend((start + int(r), int(c)) for r, c in zip(rows, cols) if start + r < c)
    return pairs


def groups_of(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        parent[find(a)] = find(b)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(find(i), []).append(i)
    return [sorted(g) for g in members.values() if len(g) > 1]


def find_duplicates(reports: list[FileAudit], max_bits: int = NEAR_DUPLICATE_BITS) -> list[dict]:
    """Groups of identical (same bytes) or near-identical (dHash within `max_bits` of 256) images."""
    ok = [r for r in reports if r.dhash is not None]
    pairs: list[tuple[int, int]] = []
    by_hash: dict[str, int] = {}
    for i, r in enumerate(ok):
        if r.sha256 in by_hash:
            pairs.append((by_hash[r.sha256], i))
        else:
            by_hash[r.sha256] = i
    if ok:
        pairs.extend(near_pairs(np.stack([r.dhash for r in ok]), max_bits))
    groups = []
    for group in groups_of(len(ok), pairs):
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
