"""`clothcli analyze-data` end to end on a large generated dataset: wall time and peak memory.

Makes `--images` distinct small JPEGs (random blocks of colour, 96x72 and 72x96, `--classes` classes,
split 80/10/10 in split folders; one in a hundred a re-encoded copy of another, so duplicates exist to be
found), then runs `clothcli analyze-data DATA --json ...` in a fresh process and reports its wall time,
its peak RSS and what it found.

    python benchmarks/analyze_at_scale.py --images 100000 --json benchmarks/results/analyze_at_scale_cpu.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ["train"] * 8 + ["validation", "test"]


def make_chunk(args: tuple[Path, int, int, int]) -> int:
    """Images start..start+count under `root`: each a 6x8 grid of random colours, upscaled."""
    root, start, count, classes = args
    rng = np.random.default_rng(start)
    previous = None
    for i in range(start, start + count):
        split, label = SPLITS[i % len(SPLITS)], f"class{(i // len(SPLITS)) % classes:02d}"
        folder = root / split / label
        folder.mkdir(parents=True, exist_ok=True)
        if previous is not None and i % 100 == 0:  # a duplicate: the last image re-encoded
            data = previous
        else:
            grid = rng.integers(0, 256, (6, 8, 3) if i % 2 else (8, 6, 3), dtype=np.uint8)
            image = Image.fromarray(grid).resize((96, 72) if i % 2 else (72, 96), Image.Resampling.BILINEAR)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=85)
            data = buffer.getvalue()
        previous = data
        (folder / f"{i:07d}.jpg").write_bytes(data if i % 100 else _reencode(data))
    return count


def _reencode(data: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, "JPEG", quality=70)
    return buffer.getvalue()


def generate(root: Path, images: int, classes: int, workers: int) -> float:
    start = time.perf_counter()
    chunk = 2000
    jobs = [(root, s, min(chunk, images - s), classes) for s in range(0, images, chunk)]
    with ProcessPoolExecutor(workers) as pool:
        sum(pool.map(make_chunk, jobs))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tiny", action="store_true", help="CI: 600 images")
    args = parser.parse_args()
    if args.tiny:
        args.images = 600
    with tempfile.TemporaryDirectory(prefix="clothcli-analyze-bench-") as scratch:
        root, report = Path(scratch) / "data", Path(scratch) / "audit.json"
        generated_s = generate(root, args.images, args.classes, args.workers)
        start = time.perf_counter()
        command = [sys.executable, "-m", "clothcli", "analyze-data", str(root), "--json", str(report),
                   "--workers", str(args.workers)]  # fmt: skip
        with tempfile.TemporaryFile("w+") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
            _, status, usage = os.wait4(process.pid, 0)  # this process's own peak, not the generators'
            process.returncode = os.waitstatus_to_exitcode(status)
            wall = time.perf_counter() - start
            if process.returncode != 0:
                log.seek(0)
                raise SystemExit(log.read()[-4000:])
        peak_mb = usage.ru_maxrss / 1024
        audit = json.loads(report.read_text())
    groups = audit.get("duplicates", [])
    result = {
        "images": args.images,
        "generate_s": round(generated_s, 1),
        "analyze_s": round(wall, 1),
        "images_per_s": round(args.images / wall),
        "peak_rss_mb": round(peak_mb),
        "duplicate_groups": len(groups),
        "host": {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
    }
    print("| images | analyze-data wall | images/s | peak RSS | duplicate groups |")
    print(f"| {args.images:,} | {wall:.1f} s | {result['images_per_s']:,} | {peak_mb:.0f} MB | {len(groups):,} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
