"""Does the grouped split keep planted copies with their originals?

The dataset's photos are merged into one unsplit folder (`<class>/<image>`, hard links), and resized,
re-encoded copies of some of them are planted beside their originals (scales 0.33x, 0.5x, 0.75x and 1.5x
in turn, JPEG quality 60-90). Then the split that `clothcli train --data merged/` would make is planned,
and for every copy: is it in its original's duplicate group, and in its original's split? Also: the
difference-hash distance of every copy from its original (against the threshold), and the closest two
photos of the dataset that are not copies of each other (the margin on the other side).

    python benchmarks/planted_duplicates.py ../shared/datasets/clothing-dataset-small --copies 400 \\
        --json benchmarks/results/planted_duplicates_cpu.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from clothcli.config import DataConfig
from clothcli.data.duplicates import HASH_DECODE, NEAR_DUPLICATE_BITS, dhash
from clothcli.data.images import load_rgb
from clothcli.data.layout import class_dirs, find_split_dir, walk_images
from clothcli.data.sources import open_dataset

SCALES = (0.33, 0.5, 0.75, 1.5)


def merge(data: Path, out: Path) -> list[Path]:
    """Every photo of data's splits in out/<class>/, hard-linked (copied across file systems)."""
    photos = []
    for split in ("train", "validation", "test"):
        folder = find_split_dir(data, split)
        for class_dir in class_dirs(folder) if folder else []:
            (out / class_dir.name).mkdir(parents=True, exist_ok=True)
            for path in walk_images(class_dir)[0]:
                target = out / class_dir.name / f"{split}-{path.name}"
                try:
                    os.link(path, target)
                except OSError:
                    target.write_bytes(path.read_bytes())
                photos.append(target)
    return photos


def plant(photos: list[Path], count: int, seed: int) -> list[tuple[Path, Path, float]]:
    """`count` resized, re-encoded copies beside their originals: (original, copy, scale)."""
    rng = random.Random(seed)
    planted = []
    for i, original in enumerate(rng.sample(photos, count)):
        scale = SCALES[i % len(SCALES)]
        image = Image.open(original).convert("RGB")
        size = (max(8, round(image.width * scale)), max(8, round(image.height * scale)))
        buffer = io.BytesIO()
        image.resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=rng.randint(60, 90))
        copy = original.with_name(f"copy-{i}-{original.name}")
        copy.write_bytes(buffer.getvalue())
        planted.append((original, copy, scale))
    return planted


def closest_distinct(photos: list[Path]) -> list[int]:
    """The five smallest hash distances between photos of the dataset (before any copy is planted)."""
    bits = np.stack([dhash(load_rgb(p, min_size=HASH_DECODE)) for p in photos]).astype(np.float32) * 2 - 1
    distance = (bits.shape[1] - bits @ bits.T) / 2
    return sorted(int(d) for d in distance[np.triu_indices(len(photos), 1)])[:5]


def bits_summary(bits: list[int]) -> dict:
    return {"median": float(np.median(bits)), "max": max(bits)} if bits else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="a dataset laid out split/class/image")
    parser.add_argument("--copies", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        merged = Path(scratch) / "merged"
        photos = merge(args.data, merged)
        nearest = closest_distinct(photos)
        planted = plant(photos, args.copies, args.seed)
        start = time.perf_counter()
        source = open_dataset(merged, DataConfig(), workers=os.cpu_count() or 1)
        seconds = time.perf_counter() - start
        where = {str(a.path): a for a in source.plan.assignments}
        distances, rows = [], []
        for original, copy, scale in planted:
            a, b = where.get(str(original)), where.get(str(copy))
            distance = int(
                (dhash(load_rgb(original, min_size=HASH_DECODE)) != dhash(load_rgb(copy, min_size=HASH_DECODE))).sum()
            )
            distances.append(distance)
            rows.append({"scale": scale, "bits": distance, "grouped": bool(a and b and a.group == b.group),
                         "same_split": bool(a and b and a.split == b.split), "kept": bool(a and b)})  # fmt: skip
    kept = [r for r in rows if r["kept"]]  # a copy of a photo whose group was left out (labels conflict) is gone
    result = {
        "host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "photos": len(photos),
        "copies": len(rows),
        "copies_in_a_kept_group": len(kept),
        "grouped_with_original": sum(r["grouped"] for r in kept),
        "divided_between_splits": sum(not r["same_split"] for r in kept),
        "groups_kept_together": source.plan.groups_kept_together,
        "split": {name: len(split.samples) for name, split in source.index.splits.items()},
        "split_seconds": round(seconds, 1),
        "threshold_bits": NEAR_DUPLICATE_BITS,
        "copy_bits": {str(s): bits_summary([r["bits"] for r in rows if r["scale"] == s]) for s in SCALES},
        "closest_distinct_photos_bits": nearest,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
