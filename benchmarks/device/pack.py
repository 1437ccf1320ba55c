"""Pack what a device-machine run needs into `.device/` (git-ignored; pass it in the run's `carry`).

The device tool sends at most 64 MiB and not ../shared, so the dataset travels re-encoded at a
short side of 256 px, JPEG quality 75 (every recipe here decodes to a short side of 256 px or less),
with the MobileNetV3-Small weights: 56 MiB in all. Its test accuracy is therefore close to, not
identical with, the original files'; evaluate the returned checkpoint on the originals here.
`--wheels DIR` adds the wheels in DIR (packages the machine lacks: thop, the server's) to `.device/wheels`.

    python benchmarks/device/pack.py --data ../shared/datasets/clothing-dataset-small \\
        --weights ../shared/weights/tf_mobilenetv3_small_100.in1k.safetensors --wheels /tmp/wheels
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image, ImageOps


def shrink(src: Path, dst: Path, short_side: int, quality: int) -> None:
    with Image.open(src) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
        scale = short_side / min(img.size)
        if scale < 1:
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        dst.parent.mkdir(parents=True, exist_ok=True)
        img.save(dst.with_suffix(".jpg"), quality=quality)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--wheels", type=Path, help="a folder of .whl files to carry along")
    parser.add_argument("--out", type=Path, default=Path(".device"))
    parser.add_argument("--short-side", type=int, default=256)
    parser.add_argument("--quality", type=int, default=75)
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    files = [p for p in sorted(args.data.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    images = [p for p in files if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    for path in files:
        target = args.out / "data" / path.relative_to(args.data)
        if path in images:
            shrink(path, target, args.short_side, args.quality)
        else:  # licence, readme
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    (args.out / "weights").mkdir(parents=True)
    shutil.copy2(args.weights, args.out / "weights" / args.weights.name)
    if args.wheels:
        (args.out / "wheels").mkdir()
        for wheel in sorted(args.wheels.glob("*.whl")):
            shutil.copy2(wheel, args.out / "wheels" / wheel.name)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"packed {len(images)} images and {args.weights.name} into {args.out}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
