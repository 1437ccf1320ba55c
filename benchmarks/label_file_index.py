"""How long indexing a large label file takes: parsing, column and label checks, one stat per file.

Builds ROWS distinct hard links of the real images of DATA (a few real photos reached by a million
names: the file system does the stat work it would do for a million photos), writes a CSV of path,
label and split, and times `data.sources.open_dataset` on it in a fresh process, with its peak RSS.
The grouped split (decoding and hashing every image) is timed apart on a subset
(`benchmarks/duplicate_search.py` times the near-duplicate search itself up to a million hashes).

    python benchmarks/label_file_index.py ../shared/datasets/clothing-dataset-small --rows 1000000
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPLITS = ("train", "train", "train", "train", "train", "train", "train", "train", "validation", "test")


def build(data: Path, rows: int, folder: Path) -> Path:
    """`rows` hard links to DATA's images under `folder`, and the label file listing them."""
    images = sorted(p for p in data.rglob("*.jpg") if p.is_file())
    labels = folder / "labels.csv"
    with open(labels, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        for i in range(rows):
            source = images[i % len(images)]
            sub = folder / "img" / f"{i // 10000:03d}"
            if i % 10000 == 0:
                sub.mkdir(parents=True, exist_ok=True)
            name = f"{i:07d}.jpg"
            os.link(source, sub / name)
            writer.writerow([f"img/{i // 10000:03d}/{name}", source.parent.name, SPLITS[i % len(SPLITS)]])
    return labels


def index_in_a_fresh_process(labels: Path) -> dict:
    code = (
        "import json, resource, sys, time\n"
        "start = time.perf_counter()\n"
        "from clothcli.data.sources import open_dataset\n"
        "imported = time.perf_counter()\n"
        "source = open_dataset(sys.argv[1])\n"
        "done = time.perf_counter()\n"
        "print(json.dumps({'import_s': imported - start, 'index_s': done - imported,\n"
        "    'images': sum(len(s.samples) for s in source.index.splits.values()),\n"
        "    'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(labels)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def grouped_split_seconds(labels: Path, rows: int) -> dict:
    """Decoding and hashing for the grouped split, on the first `rows` rows without their split column."""
    subset = labels.with_name("subset.csv")
    with open(labels, newline="") as src, open(subset, "w", newline="") as dst:
        reader, writer = csv.reader(src), csv.writer(dst)
        next(reader)
        writer.writerow(["path", "label"])
        for i, row in enumerate(reader):
            if i >= rows:
                break
            writer.writerow(row[:2])
    from clothcli.data.sources import open_dataset

    start = time.perf_counter()
    source = open_dataset(subset)
    return {"rows": rows, "seconds": time.perf_counter() - start, "groups": source.plan.groups_kept_together}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--hash-rows", type=int, default=20_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="label-index-"))
    try:
        start = time.perf_counter()
        labels = build(args.data, args.rows, folder)
        result = {"rows": args.rows, "build_s": time.perf_counter() - start}
        result |= index_in_a_fresh_process(labels)
        result["grouped_split"] = grouped_split_seconds(labels, min(args.hash_rows, args.rows))
        result["this_process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
