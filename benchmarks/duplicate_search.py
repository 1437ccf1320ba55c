"""Near-duplicate search at 10k to 1M hashes: clothcli's multi-index hashing against all pairs.

256-bit difference hashes, each set with near copies planted (a copy of a hash with up to two bits more
flipped than the threshold allows, so some fall just past it):
- uniform: random bits, the easy case (buckets of a substring's value stay small);
- real: the difference hashes of the dataset's photos and of augmented variants of them (random crops
  of 35-100% of the side, mirrored, brightness and contrast changed). Photos of one shop share the
  background, so their hashes cluster: large buckets, the hard case. The pool holds an equal number of
  variants of every photo, enough for the largest size, and is used two ways:
  - real: the first n hashes of the pool: every photo, with more variants of each as n grows (at a
    million ten times as many as at 100k, so the clusters get denser with n);
  - real-photos: every variant of as many photos as make n (photos in a seeded order): as many variants
    of each photo at every size, so n grows as a catalogue does, by more products.

The hashes of each size are taken from one pool, with their near copies planted among them. For
each size: the time and peak traced memory (NumPy's allocations, via tracemalloc) of
`data.near_duplicates.near_groups`, the groups found, and up to `--check-upto` hashes the all-pairs
search (`all_pairs`, a chunked matrix product) on the same hashes: its pairs, its time, and whether its
groups (connected components) are the index's.

    python benchmarks/duplicate_search.py --data ../shared/datasets/clothing-dataset-small \\
        --sizes 10000,100000,1000000 --repeat 3 --pool hashes.npz --json benchmarks/results/duplicate_search_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
from reference_outputs import host as cpu_description

from clothcli.data.duplicates import HASH_DECODE, NEAR_DUPLICATE_BITS, dhash
from clothcli.data.images import load_rgb
from clothcli.data.near_duplicates import all_pairs, groups_of, near_groups


def plant(bits: np.ndarray, rng: np.random.Generator, share: float = 0.05) -> np.ndarray:
    """Overwrite `share` of the rows with near copies of other rows (0 to NEAR_DUPLICATE_BITS + 2 flipped)."""
    n, most = len(bits), NEAR_DUPLICATE_BITS + 2
    count = int(n * share)
    sources, targets = rng.integers(0, n, count), rng.integers(0, n, count)
    flips = rng.integers(0, bits.shape[1], (count, most))
    keep = rng.integers(0, most + 1, count)
    rows = bits[sources].copy()
    for j in range(most):  # flip the first keep[i] positions of each row (repeats cancel: at most `most`)
        chosen = keep > j
        rows[chosen, flips[chosen, j]] ^= True
    bits[targets] = rows
    return bits


def uniform_hashes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, (n, 256), dtype=np.uint8).astype(bool)


def variants(path: Path, count: int, seed: int) -> list[np.ndarray]:
    """The difference hashes of `count` augmented variants of one photo (the photo itself first)."""
    rng = np.random.default_rng(seed)
    image = load_rgb(path, min_size=HASH_DECODE)
    out = [dhash(image)]
    width, height = image.size
    for _ in range(count - 1):
        side = rng.uniform(0.35, 1.0)
        w, h = max(8, int(width * side)), max(8, int(height * side))
        left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        crop = image.crop((left, top, left + w, top + h))
        if rng.random() < 0.5:
            crop = ImageOps.mirror(crop)
        crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.6, 1.4))
        crop = ImageEnhance.Contrast(crop).enhance(rng.uniform(0.6, 1.4))
        out.append(dhash(crop))
    return out


def real_hashes(data: Path, n: int, seed: int = 0, workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """n hashes of variants of the photos under `data`, shuffled, and the photo (its index) of each."""
    photos = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    per_photo = math.ceil(n / len(photos))
    with ThreadPoolExecutor(workers) as pool:
        found = pool.map(lambda item: variants(item[1], per_photo, seed + item[0]), enumerate(photos))
        rows = [h for hashes in found for h in hashes]
    shuffled = np.random.default_rng(seed).permutation(len(rows))[:n]
    return np.stack(rows)[shuffled], shuffled // per_photo


def whole_photos(photos: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Positions of n pool rows taking every variant of one photo after another (photos in a seeded order),
    in pool order."""
    rank = np.random.default_rng(seed).permutation(int(photos.max()) + 1)[photos]
    return np.sort(np.lexsort((np.arange(len(photos)), rank))[:n])


def generated_photos(folder: Path, count: int = 12, seed: int = 0) -> Path:
    """`count` small JPEGs of coloured blocks on a shared grey background, for the real kinds in --tiny."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        pixels = np.full((96, 128, 3), 128, dtype=np.uint8)
        for _ in range(4):
            top, left = rng.integers(0, 72), rng.integers(0, 104)
            pixels[top : top + 24, left : left + 24] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(folder / f"photo{index}.jpg", quality=90)
    return folder


def load_pool(args: argparse.Namespace, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The real hashes and their photos: read from `--pool` when it holds enough, else made (and saved there)."""
    if args.pool and args.pool.is_file():
        with np.load(args.pool) as saved:
            if len(saved["hashes"]) >= size:
                return saved["hashes"], saved["photos"]
    hashes, photos = real_hashes(args.data, size)
    if args.pool:
        np.savez(args.pool, hashes=hashes, photos=photos)
    return hashes, photos


def measure(bits: np.ndarray, check: bool, repeat: int = 1) -> dict:
    """The search `repeat` times (its median time: single runs on a shared host move by 15% and more),
    its peak traced memory, its groups, and all pairs on the same hashes when `check`."""
    seconds, peaks = [], []
    for _ in range(repeat):
        tracemalloc.start()
        start = time.perf_counter()
        groups = near_groups(bits, NEAR_DUPLICATE_BITS)
        seconds.append(time.perf_counter() - start)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    row = {
        "hashes": len(bits),
        "index_s": round(statistics.median(seconds), 3),
        "index_runs_s": [round(s, 3) for s in seconds],
        "index_peak_mb": round(max(peaks) / 2**20, 1),
        "groups": len(groups),
        "images_in_groups": sum(len(g) for g in groups),
    }
    if check:
        start = time.perf_counter()
        reference = all_pairs(bits, NEAR_DUPLICATE_BITS)
        row["all_pairs_s"] = round(time.perf_counter() - start, 3)
        row["all_pairs_pairs"] = len(reference)
        row["same_groups_as_all_pairs"] = groups_of(len(bits), reference) == groups
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a folder of photos for the real-distribution hashes")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--check-upto", type=int, default=100_000, help="run all-pairs up to this many hashes")
    parser.add_argument("--pool", type=Path, help="keep the real-distribution hashes in this .npz for reruns")
    parser.add_argument("--repeat", type=int, default=1, help="time the search this many times (median)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tiny", action="store_true", help="CI: small sizes, uniform and generated photos")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.tiny:
        sizes, args.check_upto = [500, 2000], 2000
        scratch = tempfile.TemporaryDirectory()
        args.data, args.pool = args.data or generated_photos(Path(scratch.name) / "photos"), None
    results = []
    print("| hashes | n | index | peak | groups | in groups | all pairs | its pairs | same groups |")
    kinds = ["uniform"] + (["real", "real-photos"] if args.data else [])
    for kind in kinds:
        if kind == "uniform":
            pool, photos = uniform_hashes(max(sizes)), None
        elif kind == "real":
            pool, photos = load_pool(args, max(sizes))
        for n in sizes:
            rows = whole_photos(photos, n) if kind == "real-photos" else np.arange(n)
            bits = plant(pool[rows], np.random.default_rng(n))  # near copies within this size
            row = {"kind": kind, **measure(bits, n <= args.check_upto, args.repeat)}
            results.append(row)
            checked = "- | - | - |"
            if "all_pairs_s" in row:
                checked = (
                    f"{row['all_pairs_s']:>8.2f} s | {row['all_pairs_pairs']:>9,} | {row['same_groups_as_all_pairs']} |"
                )
            print(
                f"| {kind:11} | {n:>9,} | {row['index_s']:>8.2f} s | {row['index_peak_mb']:>8.1f} MB | "
                f"{row['groups']:>8,} | {row['images_in_groups']:>9,} | {checked}",
                flush=True,
            )
    host = {"cpu": cpu_description(), "python": platform.python_version()}
    if args.json:
        args.json.write_text(json.dumps({"host": host, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
