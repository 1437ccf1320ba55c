"""Exact and near duplicates: a content hash and a 256-bit difference hash per image, grouped.

`analyze-data` reports the groups; the split made for a dataset without split folders keeps each
group in one split (`data.splits`).
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clothcli.data.images import ImageReadError, load_rgb, read_image_bytes, read_info

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
        report.dhash = dhash(load_rgb(path, min_size=64))
    except ImageReadError as exc:
        report.error = str(exc)
    return report


# the popcount of every byte, for the exact Hamming check of candidate pairs where NumPy has no bitwise_count
_BYTE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.uint16)


def _hamming(packed: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between rows a and b of `packed` (bytes, or 64-bit words when the width allows)."""
    if hasattr(np, "bitwise_count") and packed.dtype == np.uint64:
        return np.bitwise_count(packed[a] ^ packed[b]).sum(1, dtype=np.int64)
    return _BYTE_BITS[packed[a] ^ packed[b]].sum(1)


DENSE_BUCKET = 2048  # a bucket this large is checked by one matrix product instead of pair by pair
PAIR_CHUNK = 1 << 20


def _dense_pairs(bits: np.ndarray, members: np.ndarray, max_bits: int, chunk: int = 1024) -> np.ndarray:
    """All pairs (i < j) of `members` within `max_bits`: with bits as +-1, Hamming distance = (n_bits - a.b)/2,
    so a chunked matrix product compares every pair of a large bucket at BLAS speed."""
    block = bits[members].astype(np.float32) * 2 - 1
    found = []
    for start in range(0, len(members), chunk):
        distance = (block.shape[1] - block[start : start + chunk] @ block.T) / 2
        rows, cols = np.nonzero(distance <= max_bits + 0.5)
        keep = start + rows < cols
        found.append(np.stack([members[start + rows[keep]], members[cols[keep]]], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)


def _bucket_pairs(keys: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Pairs of indices with equal `keys` (i < j), from the buckets up to DENSE_BUCKET; the larger buckets'
    members apart."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    sizes = np.diff(np.r_[starts, len(keys)])
    large = [
        order[start : start + size] for start, size in zip(starts[sizes > DENSE_BUCKET], sizes[sizes > DENSE_BUCKET])
    ]
    size_of = np.repeat(sizes, sizes)  # each sorted element's bucket size
    small = size_of <= DENSE_BUCKET
    order, sorted_keys, size_of = order[small], sorted_keys[small], size_of[small]
    pairs = []
    offset = 1
    while True:
        # only the buckets larger than the offset have pairs that far apart; each stays whole and in order,
        # so the work is about the number of pairs, however the bucket sizes are spread
        live = size_of > offset
        if not live.any():
            break
        if not live.all():
            order, sorted_keys, size_of = order[live], sorted_keys[live], size_of[live]
        same = np.flatnonzero(sorted_keys[:-offset] == sorted_keys[offset:])
        a, b = order[same], order[same + offset]
        pairs.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1))
        offset += 1
    return (np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)), large


def near_pairs(bits: np.ndarray, max_bits: int) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose hashes (rows of 0/1 `bits`) differ in at most `max_bits` bits: all of them.

    Multi-index hashing (Norouzi et al. 2012): the bits are cut into `max_bits + 1` substrings, and a pair
    that differs in at most `max_bits` bits agrees exactly on at least one of them (pigeonhole). So the
    candidates are the pairs that share a substring's value, found by sorting each substring's values, and
    each is then checked exactly (the bits are shuffled first, by a fixed permutation). The work grows
    with the number of candidates, about n log n for hashes that are spread out, instead of n^2 for
    comparing every pair."""
    n, n_bits = bits.shape
    if n < 2:
        return []
    # neighbouring bits of a difference hash agree on flat backgrounds, so contiguous substrings of
    # real photos' hashes take a few values very often (huge buckets); substrings of bits drawn from all
    # over the hash are spread out. Any partition keeps the pigeonhole guarantee.
    shuffled = np.random.default_rng(0).permutation(n_bits)
    packed = np.packbits(bits.astype(bool), axis=1)
    if packed.shape[1] % 8 == 0:  # whole 64-bit words: one popcount per word instead of per byte
        packed = np.ascontiguousarray(packed).view(np.uint64)
    bounds = np.linspace(0, n_bits, min(max_bits + 1, n_bits) + 1).astype(int)
    codes = []
    for lo, hi in itertools.pairwise(bounds):
        keys = bits[:, shuffled[lo:hi]].astype(np.int64) @ (np.int64(1) << np.arange(hi - lo, dtype=np.int64))
        candidates, large = _bucket_pairs(keys)
        for start in range(0, len(candidates), PAIR_CHUNK):
            a, b = candidates[start : start + PAIR_CHUNK].T
            distance = _hamming(packed, a, b)
            codes.append(a[distance <= max_bits] * n + b[distance <= max_bits])
        for members in large:
            found = _dense_pairs(bits, np.sort(members), max_bits)
            codes.append(found[:, 0] * n + found[:, 1])
    unique = np.unique(np.concatenate(codes)) if codes else np.zeros(0, dtype=np.int64)
    return [(int(code // n), int(code % n)) for code in unique]


def all_pairs(bits: np.ndarray, max_bits: int) -> list[tuple[int, int]]:
    """Every pair within `max_bits` by comparing all n^2 pairs: the reference `near_pairs` is checked against."""
    found = _dense_pairs(bits, np.arange(len(bits)), max_bits)
    return sorted((int(a), int(b)) for a, b in found)


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
