"""Groups of near-identical binary hashes, found without comparing every pair.

Multi-index hashing (Norouzi et al. 2012) gives the candidates; the groups (connected components of
"within `max_bits`") are merged as they are found, so a pair whose two hashes are already in one group
is never checked. Photos with many copies each (variants of one product shot) make clusters whose
pairs grow with the square of the cluster; the groups do not, and neither does this search's work.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

# the popcount of every byte, for the exact Hamming check of candidate pairs where NumPy has no bitwise_count
_BYTE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.uint16)

MIN_SUBSTRING, MAX_SUBSTRING = 12, 24  # bits per substring of the multi-index search
DENSE_BUCKET = 2048  # a bucket this large is checked by matrix products instead of pair by pair
DENSE_NEIGHBOURHOOD = 1 << 16  # a value's pairs with its one-bit neighbours checked by one matrix product
DENSE_BLOCKS = 64  # a large bucket of at most this many groups: each group against the rest, else all pairs
PAIR_CHUNK = 1 << 20
DENSE_BLOCK = 1 << 23  # distances computed at once by the matrix product: 32 MB of float32

Codes = tuple[np.ndarray, np.ndarray]  # packed hashes and their first words, as `_Search.in_order` lays them out


def _hamming(packed: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between rows a and b of `packed` (bytes, or 64-bit words when the width allows)."""
    differ = np.take(packed, a, axis=0) ^ np.take(packed, b, axis=0)  # np.take: rows gathered 6x faster
    if hasattr(np, "bitwise_count") and packed.dtype == np.uint64:
        return np.bitwise_count(differ).sum(1, dtype=np.int64)
    return _BYTE_BITS[differ].sum(1)


def _stable_order(keys: np.ndarray, key_bits: int) -> np.ndarray:
    """np.argsort(keys, kind="stable") for keys in [0, 2**key_bits): keys and positions packed into one
    int64 and sorted by value, which NumPy vectorises (SIMD) where it does not for a stable argsort: about
    twice as fast at a million keys. A plain stable argsort where the two do not fit in 63 bits."""
    position_bits = max(1, (len(keys) - 1).bit_length())
    if key_bits + position_bits > 63:
        return np.argsort(keys, kind="stable")
    packed = (keys.astype(np.int64) << position_bits) | np.arange(len(keys), dtype=np.int64)
    return np.sort(packed) & ((1 << position_bits) - 1)


def _dense_pairs(bits: np.ndarray, members: np.ndarray, max_bits: int, others: np.ndarray | None = None) -> np.ndarray:
    """All pairs (i < j) of `members` within `max_bits` (or, with `others`, every pair of a member and one of
    `others`): with bits as +-1, Hamming distance = (n_bits - a.b)/2, so a chunked matrix product compares
    every pair of a large bucket at BLAS speed (in blocks of at most DENSE_BLOCK distances)."""
    block = np.take(bits, members, axis=0).astype(np.float32) * 2 - 1
    against = block if others is None else np.take(bits, others, axis=0).astype(np.float32) * 2 - 1
    columns = members if others is None else others
    chunk = max(1, DENSE_BLOCK // max(1, len(columns)))
    found = []
    for start in range(0, len(members), chunk):
        distance = (block.shape[1] - block[start : start + chunk] @ against.T) / 2
        rows, cols = np.nonzero(distance <= max_bits + 0.5)
        a, b = members[start + rows], columns[cols]
        keep = a < b if others is None else a != b
        found.append(np.stack([np.minimum(a, b)[keep], np.maximum(a, b)[keep]], axis=1))
    return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)


def all_pairs(bits: np.ndarray, max_bits: int) -> list[tuple[int, int]]:
    """Every pair within `max_bits` by comparing all n^2 pairs: the reference the index is checked against."""
    found = _dense_pairs(bits, np.arange(len(bits)), max_bits)
    return sorted((int(a), int(b)) for a, b in found)


def groups_of(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    """The connected components (of more than one) of `pairs` over n items, each sorted, by first member."""
    if not pairs:
        return []
    edges = np.asarray(pairs, dtype=np.int64)
    return groups_from_labels(_merge(np.arange(n), edges[:, 0], edges[:, 1]))


def groups_from_labels(labels: np.ndarray) -> list[list[int]]:
    """Items sharing a label, as sorted lists of more than one, ordered by their first member."""
    order = _stable_order(labels, max(1, int(labels.max(initial=0)).bit_length()))
    starts = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1]])
    sizes = np.diff(np.r_[starts, len(labels)])
    groups = [order[s : s + k].tolist() for s, k in zip(starts[sizes > 1], sizes[sizes > 1])]
    return sorted(groups, key=lambda group: group[0])


def _merge(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Labels after joining the groups of a[i] and b[i] for every i: each item labelled by its group's
    smallest member (a label is always an item), so the next merge can link item to label as an edge."""
    if not len(a):
        return labels
    n = len(labels)
    rows = np.concatenate([np.arange(n), a])
    cols = np.concatenate([labels, b])
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    _, first = np.unique(component, return_index=True)  # each component's smallest member
    return first[component]


def _expand(
    first_a: np.ndarray, count_a: np.ndarray, first_b: np.ndarray, count_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each row r, every (i, j) with i in first_a[r] + range(count_a[r]) and j in first_b[r] + range(count_b[r])."""
    a_items = _ranges(first_a, count_a)  # every i, in row order
    b_count = np.repeat(count_b, count_a)  # how many j each i meets
    return np.repeat(a_items, b_count), _ranges(np.repeat(first_b, count_a), b_count)


def _ranges(first: np.ndarray, count: np.ndarray) -> np.ndarray:
    """first[r] + range(count[r]) for every row r, laid end to end (no division: repeats and one arange), in
    32-bit integers where they fit: these arrays run to millions of entries, and memory traffic is their cost."""
    total = int(count.sum())
    fits = total < 2**31 and (not len(first) or int(first.max()) + total < 2**31)
    kind = np.int32 if fits else np.int64
    ends = np.cumsum(count, dtype=kind)
    return np.repeat(first.astype(kind, copy=False) - (ends - count.astype(kind, copy=False)), count) + np.arange(
        total, dtype=kind
    )


def _same_run_pairs(run_sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i < j) of positions within each run of consecutive positions of the given sizes."""
    starts = np.cumsum(run_sizes) - run_sizes
    size_of = np.repeat(run_sizes, run_sizes)
    position = np.arange(len(size_of))
    offset_in_run = position - np.repeat(starts, run_sizes)
    later = size_of - offset_in_run - 1  # how many positions follow each one in its run
    ones = np.ones(len(later), dtype=np.int64)
    return _expand(position, ones, position + 1, later)


@dataclass
class _Blocks:
    """One substring's values sorted, each value's items split by group: `order` the items in that order;
    a block is one (value, group) with its start in `order` and its size; `runs` are a value's blocks."""

    order: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray
    labels: np.ndarray  # each block's group
    run_keys: np.ndarray  # each distinct value
    run_starts: np.ndarray  # its first block
    run_blocks: np.ndarray  # its number of blocks
    run_items: np.ndarray  # its number of items

    @classmethod
    def of(cls, keys: np.ndarray, key_order: np.ndarray, labels: np.ndarray) -> _Blocks:
        """The blocks, from the items already sorted by key (`key_order`): only the items that share their
        key with others need sorting again, by group within their key."""
        order = key_order.copy()
        sorted_keys = keys[order]
        new_key = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
        key_starts = np.flatnonzero(new_key)
        key_sizes = np.diff(np.r_[key_starts, len(keys)])
        shared = np.repeat(key_sizes > 1, key_sizes)
        if shared.any():
            shift = max(1, int(len(labels) - 1).bit_length())
            run_of = np.repeat(np.arange(len(key_starts)), key_sizes)[shared]
            items = order[shared]
            key_bits = shift + max(1, int(len(key_starts) - 1).bit_length())
            order[shared] = items[_stable_order((run_of << shift) | labels[items], key_bits)]
        sorted_labels = labels[order]
        starts = np.flatnonzero(new_key | np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
        sizes = np.diff(np.r_[starts, len(keys)])
        block_keys = sorted_keys[starts]
        run_starts = np.flatnonzero(np.r_[True, block_keys[1:] != block_keys[:-1]])
        return cls(
            order=order,
            starts=starts,
            sizes=sizes,
            labels=sorted_labels[starts],
            run_keys=block_keys[run_starts],
            run_starts=run_starts,
            run_blocks=np.diff(np.r_[run_starts, len(starts)]),
            run_items=key_sizes,
        )

    def run_members(self, run: int) -> np.ndarray:
        first = self.starts[self.run_starts[run]]
        return self.order[first : first + self.run_items[run]]

    def run_labels(self, run: int) -> np.ndarray:
        return self.labels[self.run_starts[run] : self.run_starts[run] + self.run_blocks[run]]

    def run_groups(self, run: int) -> list[np.ndarray]:
        first = self.run_starts[run]
        return [self.block_members(block) for block in range(first, first + self.run_blocks[run])]

    def block_members(self, block: int) -> np.ndarray:
        return self.order[self.starts[block] : self.starts[block] + self.sizes[block]]

    def member_positions(self, block_a: np.ndarray, block_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every item of block_a[r] with every item of block_b[r], as positions in `order`."""
        return _expand(self.starts[block_a], self.sizes[block_a], self.starts[block_b], self.sizes[block_b])


class _Search:
    """The hashes shuffled and packed once, the exact check of candidates, and the dense fallback."""

    def __init__(self, bits: np.ndarray, max_bits: int):
        self.bits, self.max_bits = bits, max_bits
        n, n_bits = bits.shape
        # neighbouring bits of a difference hash agree on flat backgrounds, so contiguous substrings of
        # real photos' hashes take a few values very often (huge buckets); substrings of bits drawn from all
        # over the hash are spread out. Any partition keeps the pigeonhole guarantee. Hamming distances do
        # not change when every hash's bits are permuted alike, so the search runs on the shuffled bits,
        # packed, and a substring is a run of their packed bits (np.take: 8x faster than fancy indexing)
        self.shuffled = np.take(bits.astype(bool), np.random.default_rng(0).permutation(n_bits), axis=1)
        packed = np.packbits(self.shuffled, axis=1)
        if packed.shape[1] % 8 == 0:  # whole 64-bit words: one popcount per word instead of per byte
            packed = np.ascontiguousarray(packed).view(np.uint64)
        self.packed = packed
        self.first = packed[:, :1]  # the first word (or byte) alone: most chance candidates differ too much there
        # substrings of log2(n) + 4 bits: a substring value is shared by one hash in 16 of another, so few
        # candidates come from chance; at most MAX_SUBSTRING bits keep the table of one-bit neighbours small
        width = int(np.clip(round(math.log2(n)) + 4, MIN_SUBSTRING, MAX_SUBSTRING))
        parts = min(n_bits, max(max_bits // 2 + 1, -(-n_bits // width)))
        # with max_bits + 1 substrings, one is always equal: no neighbours to probe
        self.probe = parts < max_bits + 1
        self.bounds = list(itertools.pairwise(np.linspace(0, n_bits, parts + 1).astype(int)))

    def substring(self, lo: int, hi: int) -> np.ndarray:
        """Every hash's bits lo..hi-1 as one integer: shifted out of the packed 64-bit words (a run of at most
        MAX_SUBSTRING bits spans two words at most), or summed from the bit columns otherwise."""
        if self.packed.dtype != np.uint64:
            keys = np.zeros(len(self.shuffled), dtype=np.int64)
            for place in range(lo, hi):
                keys |= self.shuffled[:, place].astype(np.int64) << (place - lo)
            return keys
        word, shift = divmod(lo, 64)
        keys = self.packed[:, word] >> np.uint64(shift)
        if hi > (word + 1) * 64:
            keys = keys | (self.packed[:, word + 1] << np.uint64(64 - shift))
        return (keys & np.uint64((1 << (hi - lo)) - 1)).astype(np.int64)

    def in_order(self, order: np.ndarray) -> Codes:
        """The packed hashes (and their first words) laid out in `order`: a bucket's members then sit side
        by side in memory, so checking its pairs reads memory in runs instead of gathering across it."""
        return np.take(self.packed, order, axis=0), np.take(self.first, order, axis=0)

    def check(self, a: np.ndarray, b: np.ndarray, codes: Codes | None = None) -> np.ndarray:
        """The candidate pairs (a[i], b[i]) truly within max_bits, as rows of an (k, 2) array; with `codes`
        from `in_order`, a and b are positions in that order and so are the pairs returned."""
        packed, first = codes or (self.packed, self.first)
        found = []
        for start in range(0, len(a), PAIR_CHUNK):
            x, y = a[start : start + PAIR_CHUNK], b[start : start + PAIR_CHUNK]
            close = _hamming(first, x, y) <= self.max_bits
            x, y = x[close], y[close]
            close = _hamming(packed, x, y) <= self.max_bits
            found.append(np.stack([x[close], y[close]], axis=1))
        return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)

    def dense(self, groups: list[np.ndarray]) -> np.ndarray:
        """Pairs within max_bits between different `groups` (arrays of items), by matrix products: each group
        against the groups after it when they are few, else every pair of all of them."""
        if len(groups) > DENSE_BLOCKS:
            return _dense_pairs(self.bits, np.sort(np.concatenate(groups)), self.max_bits)
        found = [
            _dense_pairs(self.bits, group, self.max_bits, others=np.concatenate(groups[i + 1 :]))
            for i, group in enumerate(groups[:-1])
        ]
        return np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)


def _pivot_edges(search: _Search, keys: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Every hash checked against the first hash of its bucket (`order` sorts `keys`): n checks per
    substring that join most of a cluster of copies before the exact pass, which then skips their pairs."""
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    pivots = np.repeat(order[starts], np.diff(np.r_[starts, len(keys)]))
    others = pivots != order
    return search.check(pivots[others], order[others])


def _slices(counts: np.ndarray, limit: int = 4 * PAIR_CHUNK) -> list[slice]:
    """Consecutive slices of rows whose `counts` (pairs each row expands to) add up to about `limit`, so
    no expansion holds more than that many pairs at once."""
    if not len(counts):
        return []
    ends = np.searchsorted(np.cumsum(counts), np.arange(limit, int(counts.sum()), limit), side="right")
    bounds = np.unique(np.r_[0, ends, len(counts)])
    return [slice(lo, hi) for lo, hi in itertools.pairwise(bounds)]


def _block_pair_edges(
    search: _Search, blocks: _Blocks, codes: Codes, block_a: np.ndarray, block_b: np.ndarray
) -> list[np.ndarray]:
    """Edges between every item of block_a[r] and every item of block_b[r], in slices of bounded size,
    checked on the hashes in the blocks' order (`codes`) and returned as items."""
    found = []
    for part in _slices(blocks.sizes[block_a] * blocks.sizes[block_b]):
        a, b = blocks.member_positions(block_a[part], block_b[part])
        found.append(blocks.order[search.check(a, b, codes)])
    return found


def _equal_edges(search: _Search, blocks: _Blocks, codes: Codes) -> list[np.ndarray]:
    """Edges between items of one substring value in different groups."""
    small = blocks.run_items <= DENSE_BUCKET
    found = []
    for run in np.flatnonzero(~small & (blocks.run_blocks > 1)):
        found.append(search.dense(blocks.run_groups(run)))
    runs = np.flatnonzero(small & (blocks.run_blocks > 1))
    block_runs = blocks.run_blocks[runs]
    i, j = _same_run_pairs(block_runs)  # positions among these runs' blocks, laid end to end
    block_at = _ranges(blocks.run_starts[runs], block_runs)
    return found + _block_pair_edges(search, blocks, codes, block_at[i], block_at[j])


def _neighbour_edges(search: _Search, blocks: _Blocks, codes: Codes, width: int) -> list[np.ndarray]:
    """Edges between items whose substring values differ in one bit, in different groups.

    Values with few set bits (flat photos) are shared by many hashes and have many such neighbours: each
    of those values is checked against all its neighbours at once by one matrix product when that is more
    than DENSE_NEIGHBOURHOOD pairs, the rest pair by pair."""
    # which values occur, as a direct table of one byte per value (16 MB at 24 bits, a quarter of a table of
    # run numbers: half the time at a million values); the probes that hit are found among the sorted values
    present = np.zeros(1 << width, dtype=bool)
    present[blocks.run_keys] = True
    pairs_u, pairs_v = [], []
    for bit in range(width):
        probe = blocks.run_keys ^ (np.int64(1) << bit)
        u = np.flatnonzero(np.take(present, probe) & (blocks.run_keys < probe))  # each pair of values once
        pairs_u.append(u)
        pairs_v.append(np.searchsorted(blocks.run_keys, probe[u]))
    u, v = np.concatenate(pairs_u), np.concatenate(pairs_v)
    # each pair of values from the one with more hashes: a value with many neighbours gathers them all
    anchor = np.where(blocks.run_items[u] >= blocks.run_items[v], u, v)
    partner = u + v - anchor
    by_anchor = _stable_order(anchor, max(1, int(len(blocks.run_keys) - 1).bit_length()))
    anchor, partner = anchor[by_anchor], partner[by_anchor]
    pairs = blocks.run_items[anchor] * blocks.run_items[partner]
    heavy = np.zeros(len(anchor), dtype=bool)
    found = []
    if len(anchor):
        starts = np.flatnonzero(np.r_[True, anchor[1:] != anchor[:-1]])
        ends = np.r_[starts[1:], len(anchor)]
        for group in np.flatnonzero(np.add.reduceat(pairs, starts) > DENSE_NEIGHBOURHOOD):
            first, last = starts[group], ends[group]
            heavy[first:last] = True
            x, ys = anchor[first], partner[first:last]
            labels = np.concatenate([blocks.run_labels(x)] + [blocks.run_labels(y) for y in ys])
            if (labels != labels[0]).any():  # else all one group already
                others = np.concatenate([blocks.run_members(y) for y in ys])
                found.append(_dense_pairs(search.bits, blocks.run_members(x), search.max_bits, others=others))
    u, v = anchor[~heavy], partner[~heavy]
    # most values of spread-out hashes belong to one hash each: their pairs need no expansion
    single = (blocks.run_items[u] == 1) & (blocks.run_items[v] == 1)
    one_a, one_b = blocks.run_starts[u[single]], blocks.run_starts[v[single]]
    apart = blocks.labels[one_a] != blocks.labels[one_b]
    found.append(blocks.order[search.check(blocks.starts[one_a[apart]], blocks.starts[one_b[apart]], codes)])
    u, v = u[~single], v[~single]
    block_a, block_b = _expand(blocks.run_starts[u], blocks.run_blocks[u], blocks.run_starts[v], blocks.run_blocks[v])
    apart = blocks.labels[block_a] != blocks.labels[block_b]
    return found + _block_pair_edges(search, blocks, codes, block_a[apart], block_b[apart])


def near_groups(bits: np.ndarray, max_bits: int) -> list[list[int]]:
    """Groups of hashes (rows of 0/1 `bits`) linked by differences of at most `max_bits` bits: exactly the
    connected components of all pairs within `max_bits`, each sorted, ordered by their first member.

    The bits are cut into m substrings of about log2(n) + 4 bits. With m > max_bits, a pair within
    `max_bits` agrees exactly on at least one substring; with m > max_bits / 2, it differs in at most one
    bit of at least one (pigeonhole: two or more in every one would be 2m > max_bits). So the candidates
    are the pairs whose values of some substring are equal or one bit apart, each checked exactly. Two
    hashes already in one group need no check: a first pass joins each hash to the first of its bucket
    in every substring, and each substring's candidates are then taken only between different groups,
    the groups merged after each substring. Substrings that long keep chance buckets under one hash, so
    the work grows about as n log n, instead of n^2 for comparing every pair."""
    n = len(bits)
    labels = np.arange(n)
    if n < 2:
        return []
    search = _Search(bits, max_bits)
    orders, pivots = [], []
    for lo, hi in search.bounds:
        keys = search.substring(lo, hi)
        orders.append(_stable_order(keys, hi - lo))
        pivots.append(_pivot_edges(search, keys, orders[-1]))
    edges = np.concatenate(pivots)
    labels = _merge(labels, edges[:, 0], edges[:, 1])
    for (lo, hi), order in zip(search.bounds, orders):
        blocks = _Blocks.of(search.substring(lo, hi), order, labels)
        codes = search.in_order(blocks.order)
        found = _equal_edges(search, blocks, codes)
        if search.probe:
            found += _neighbour_edges(search, blocks, codes, hi - lo)
        if found:
            edges = np.concatenate(found)
            labels = _merge(labels, edges[:, 0], edges[:, 1])
    return groups_from_labels(labels)
