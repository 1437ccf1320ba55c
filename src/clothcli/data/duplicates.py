"""Exact and near duplicates: a content hash and a 256-bit difference hash per image, grouped.

`analyze-data` reports the groups; the split made for a dataset without split folders keeps each
group in one split (`data.splits`).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from clothcli.data.images import ImageReadError, load_rgb, read_image_bytes, read_info

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


# the popcount of every byte, for the exact Hamming check of candidate pairs where NumPy has no bitwise_count
_BYTE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.uint16)


def _hamming(packed: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between rows a and b of `packed` (bytes, or 64-bit words when the width allows)."""
    if hasattr(np, "bitwise_count") and packed.dtype == np.uint64:
        return np.bitwise_count(packed[a] ^ packed[b]).sum(1, dtype=np.int64)
    return _BYTE_BITS[packed[a] ^ packed[b]].sum(1)


MIN_SUBSTRING, MAX_SUBSTRING = 12, 24  # bits per substring of the multi-index search
DENSE_BUCKET = 2048  # a bucket this large is checked by one matrix product instead of pair by pair
PAIR_CHUNK = 1 << 20
DENSE_BLOCK = 1 << 23  # distances computed at once by the matrix product: 32 MB of float32


def _dense_pairs(bits: np.ndarray, members: np.ndarray, max_bits: int, others: np.ndarray | None = None) -> np.ndarray:
    """All pairs (i < j) of `members` within `max_bits` (or, with `others`, every pair of a member and one of
    `others`): with bits as +-1, Hamming distance = (n_bits - a.b)/2, so a chunked matrix product compares
    every pair of a large bucket at BLAS speed (in blocks of at most DENSE_BLOCK distances)."""
    block = bits[members].astype(np.float32) * 2 - 1
    against = block if others is None else bits[others].astype(np.float32) * 2 - 1
    columns = members if others is None else others
    chunk = max(1, DENSE_BLOCK // len(columns))
    found = []
    for start in range(0, len(members), chunk):
        distance = (block.shape[1] - block[start : start + chunk] @ against.T) / 2
        rows, cols = np.nonzero(distance <= max_bits + 0.5)
        a, b = members[start + rows], columns[cols]
        keep = a < b if others is None else a != b
        found.append(np.stack([np.minimum(a, b)[keep], np.maximum(a, b)[keep]], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)


@dataclass
class _Buckets:
    """One substring's values sorted: `order` the indices in sorted order, and each distinct value's
    bucket as its start in that order and its size."""

    order: np.ndarray
    sorted_keys: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray

    @classmethod
    def of(cls, keys: np.ndarray) -> _Buckets:
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        return cls(order, sorted_keys, starts, np.diff(np.r_[starts, len(keys)]))

    def members(self, bucket: int) -> np.ndarray:
        return self.order[self.starts[bucket] : self.starts[bucket] + self.sizes[bucket]]


def _bucket_pairs(buckets: _Buckets) -> tuple[np.ndarray, list[np.ndarray]]:
    """Pairs of indices with equal keys (i < j), from the buckets up to DENSE_BUCKET; the larger buckets'
    members apart."""
    order, sorted_keys, sizes = buckets.order, buckets.sorted_keys, buckets.sizes
    large = [buckets.members(b) for b in np.flatnonzero(sizes > DENSE_BUCKET)]
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


def _neighbour_pairs(buckets: _Buckets, width: int) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Pairs (i < j) whose keys differ in exactly one of their `width` bits, from bucket pairs of up to
    DENSE_BUCKET^2 candidates; larger bucket pairs' members apart."""
    order, starts, sizes = buckets.order, buckets.starts, buckets.sizes
    unique = buckets.sorted_keys[starts]
    bucket_of = np.full(1 << width, -1, dtype=np.int32)  # a direct table: one gather per probe, no search
    bucket_of[unique] = np.arange(len(unique), dtype=np.int32)
    pairs, large = [], []
    for bit in range(width):
        probe = unique ^ (np.int64(1) << bit)
        at = bucket_of[probe]
        hit = np.flatnonzero((at >= 0) & (unique < probe))  # each bucket pair once
        other = at[hit].astype(np.int64)
        counts = sizes[hit] * sizes[other]
        big = counts > DENSE_BUCKET * DENSE_BUCKET
        large += [(buckets.members(u), buckets.members(v)) for u, v in zip(hit[big], other[big])]
        hit, other, counts = hit[~big], other[~big], counts[~big]
        if not len(hit):
            continue
        pair_of = np.repeat(np.arange(len(hit)), counts)
        within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        wide = sizes[other][pair_of]
        a = order[starts[hit][pair_of] + within // wide]
        b = order[starts[other][pair_of] + within % wide]
        pairs.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1))
    return (np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)), large


def _substring(packed: np.ndarray, bits: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Every hash's bits lo..hi-1 as one integer: shifted out of the packed 64-bit words (a run of at most
    MAX_SUBSTRING bits spans two words at most; any fixed partition of the bits serves the search), or
    summed from the bit columns where the hashes are not whole words."""
    if packed.dtype != np.uint64:
        keys = np.zeros(len(bits), dtype=np.int64)
        for place in range(lo, hi):
            keys |= bits[:, place].astype(np.int64) << (place - lo)
        return keys
    word, shift = divmod(lo, 64)
    keys = packed[:, word] >> np.uint64(shift)
    if hi > (word + 1) * 64:
        keys = keys | (packed[:, word + 1] << np.uint64(64 - shift))
    return (keys & np.uint64((1 << (hi - lo)) - 1)).astype(np.int64)


def near_pairs(bits: np.ndarray, max_bits: int) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose hashes (rows of 0/1 `bits`) differ in at most `max_bits` bits: all of them.

    Multi-index hashing (Norouzi et al. 2012): the bits are cut into m substrings of about log2(n) + 4
    bits each. With m > max_bits, a pair within `max_bits` agrees exactly on at least one substring; with
    m > max_bits / 2, it differs in at most one bit of at least one (pigeonhole: two or more in every one
    would be 2m > max_bits). So the candidates are the pairs whose values of some substring are equal (or
    one bit apart, probed through a table of the values), and each is then checked exactly (the bits are
    shuffled first, by a fixed permutation). Substrings that long keep buckets under one hash, so the
    work grows with the number of candidates, about n log n for hashes that are spread out, instead of n^2
    for comparing every pair."""
    n, n_bits = bits.shape
    if n < 2:
        return []
    # neighbouring bits of a difference hash agree on flat backgrounds, so contiguous substrings of
    # real photos' hashes take a few values very often (huge buckets); substrings of bits drawn from all
    # over the hash are spread out. Any partition keeps the pigeonhole guarantee.
    # Hamming distances do not change when every hash's bits are permuted alike, so the search runs on
    # the shuffled bits, packed, and a substring is a run of their packed bits (np.take: 8x faster than
    # fancy indexing here)
    shuffled = np.take(bits.astype(bool), np.random.default_rng(0).permutation(n_bits), axis=1)
    packed = np.packbits(shuffled, axis=1)
    if packed.shape[1] % 8 == 0:  # whole 64-bit words: one popcount per word instead of per byte
        packed = np.ascontiguousarray(packed).view(np.uint64)
    # substrings of log2(n) + 4 bits: a substring value is shared by one hash in 16 of another, so few
    # candidates come from chance; at most MAX_SUBSTRING bits keep the table of one-bit neighbours small
    width = int(np.clip(round(math.log2(n)) + 4, MIN_SUBSTRING, MAX_SUBSTRING))
    parts = min(n_bits, max(max_bits // 2 + 1, -(-n_bits // width)))
    probe = parts < max_bits + 1  # with max_bits + 1 substrings, one is always equal: no neighbours to probe
    bounds = np.linspace(0, n_bits, parts + 1).astype(int)
    codes = []

    first = packed[:, :1]  # the first word (or byte) alone: most chance candidates already differ too much there

    def check(candidates: np.ndarray) -> None:
        for start in range(0, len(candidates), PAIR_CHUNK):
            a, b = candidates[start : start + PAIR_CHUNK].T
            close = _hamming(first, a, b) <= max_bits
            a, b = a[close], b[close]
            distance = _hamming(packed, a, b)
            codes.append(a[distance <= max_bits] * n + b[distance <= max_bits])

    for lo, hi in itertools.pairwise(bounds):
        keys = _substring(packed, shuffled, lo, hi)
        buckets = _Buckets.of(keys)
        equal, large = _bucket_pairs(buckets)
        check(equal)
        for members in large:
            found = _dense_pairs(bits, np.sort(members), max_bits)
            codes.append(found[:, 0] * n + found[:, 1])
        if probe:
            apart, large_pairs = _neighbour_pairs(buckets, hi - lo)
            check(apart)
            for members, others in large_pairs:
                found = _dense_pairs(bits, members, max_bits, others=others)
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
