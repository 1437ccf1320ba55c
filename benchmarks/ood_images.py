"""Collect photos that are not clothing from images that ship inside installable packages, for
`clothcli evaluate --ood` and `clothcli calibrate --ood`. Nothing is downloaded at run time.

    pip install scikit-image   # its skimage/data folder ships these images inside the wheel
    python benchmarks/ood_images.py ood/

Pictures of people (astronaut, camera, grace_hopper) are left out: they show clothing.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

SKIMAGE = [
    "brick.png", "cell.png", "chelsea.png", "chessboard_RGB.png", "clock_motion.png", "coffee.png", "coins.png",
    "color.png", "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg", "ihc.png", "microaneurysms.png",
    "moon.png", "motorcycle_left.png", "motorcycle_right.png", "page.png", "phantom.png", "retina.jpg",
    "rocket.jpg", "text.png",
]  # fmt: skip
MATPLOTLIB = ["Minduka_Present_Blue_Pack.png", "logo2.png"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    sources = [(Path(matplotlib.get_data_path()) / "sample_data", MATPLOTLIB)]
    try:
        import skimage

        sources.append((Path(skimage.__file__).parent / "data", SKIMAGE))
    except ImportError:
        print("scikit-image is not installed: only matplotlib's sample images are copied")
    copied = 0
    for folder, names in sources:
        for name in names:
            if (folder / name).is_file():
                shutil.copy2(folder / name, out / f"{folder.parent.name}-{name}")
                copied += 1
    print(f"{copied} images in {out}")


if __name__ == "__main__":
    main()
