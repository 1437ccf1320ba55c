"""The decode cache on disk: its size per image, how long it takes to build, and how fast it reads back.

Builds the cache of every image under DATA at the short side training uses (`--short-side`, 219 for the
192-px CPU recipe) into a scratch folder, then reads every image back from the memory-mapped file in
random order, against decoding the JPEG files themselves (PIL, reduced-size decode, the same resize),
in one process on one thread. The scratch folder is on the same disk as the user's cache by default
(`--dir`). Reads right after the build come from the page cache; `--cold` asks the kernel to drop it
first (needs root; say so if it cannot).

    python benchmarks/cache_read.py ../shared/datasets/clothing-dataset-small --cold \\
        --json benchmarks/results/cache_read_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from clothcli.data.cache import build_or_open, decode_resized

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--short-side", type=int, default=219)
    parser.add_argument("--dir", type=Path, help="where to build the scratch cache (default: the system temp)")
    parser.add_argument("--cold", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    paths = sorted(p for p in args.data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    order = np.random.default_rng(0).permutation(len(paths))
    with tempfile.TemporaryDirectory(prefix="clothcli-cache-bench-", dir=args.dir) as scratch:
        start = time.perf_counter()
        images = build_or_open(paths, args.short_side, "bicubic", scratch, mode="disk", workers=os.cpu_count() or 2)
        build_s = time.perf_counter() - start
        cold = drop_page_cache() if args.cold else False
        images = build_or_open(paths, args.short_side, "bicubic", scratch, mode="disk")
        start = time.perf_counter()
        for i in order:
            images.get(int(i))
        cache_s = time.perf_counter() - start
        size = images.path.stat().st_size
    start = time.perf_counter()
    for i in order:
        decode_resized(paths[int(i)], args.short_side, "bicubic")
    decode_s = time.perf_counter() - start
    n = len(paths)
    result = {
        "images": n,
        "short_side": args.short_side,
        "cache_mb": round(size / 2**20, 1),
        "kb_per_image": round(size / n / 1024, 1),
        "build_s": round(build_s, 1),
        "cache_read_images_per_s": round(n / cache_s),
        "decode_images_per_s": round(n / decode_s),
        "page_cache_dropped": cold,
        "projected_gb_per_million": round(size / n * 1e6 / 1e9, 1),
        "host": {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
    }
    print("| images | cache size | per image | build | read from cache (1 thread) | decode JPEG (1 thread) |")
    print(
        f"| {n:,} | {result['cache_mb']} MB | {result['kb_per_image']} KB | {build_s:.1f} s | "
        f"{result['cache_read_images_per_s']:,} img/s | {result['decode_images_per_s']:,} img/s |"
    )
    print(f"a million such images: {result['projected_gb_per_million']} GB on disk"
          + ("" if not args.cold else f"; page cache dropped before reading: {cold}"))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
