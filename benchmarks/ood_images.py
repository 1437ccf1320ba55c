"""Two disjoint folders of photographs that are not clothing, with no people in them, for
`clothcli calibrate --ood` (CHOOSE: the score and its threshold are chosen on it) and
`clothcli evaluate --ood` (TEST: only for the final figures). Nothing is downloaded from a model or
data hub: the photos ship in Debian packages (wallpapers, OpenCV's sample data), fetched with
`apt-get download` and unpacked with `dpkg-deb`, then saved with the long side at 1,024 px.

    python benchmarks/ood_images.py ood/      # writes ood/choose (30) and ood/test (30)

The two folders come from different packages as far as the counts allow: CHOOSE holds MATE's and
Plasma's wallpapers, TEST OpenCV's sample photographs and most of Lomiri's wallpapers. Pictures
with people in them, drawings and renders were left out by looking at each one.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

PLASMA = "usr/share/wallpapers/{}/contents/images/{}"
MATE = "usr/share/backgrounds/mate/nature/{}.jpg"
LOMIRI = "usr/share/backgrounds/{}.jpg"
OPENCV = "usr/share/doc/opencv-doc/examples/data/{}"

CHOOSE = {
    "mate-backgrounds": [MATE.format(name) for name in (
        "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
        "TwoWings", "Wood", "YellowFlower",
    )],
    "plasma-workspace-wallpapers": [PLASMA.format(name, size) for name, size in (
        ("BytheWater", "1600x1200.jpg"), ("ColdRipple", "1600x1200.jpg"), ("ColorfulCups", "2560x1600.jpg"),
        ("DarkestHour", "1600x1200.jpg"), ("EveningGlow", "1600x1200.jpg"), ("FallenLeaf", "1600x1200.jpg"),
        ("Grey", "1600x1200.jpg"), ("Kite", "1600x1200.jpg"), ("OneStandsOut", "1600x1200.jpg"),
        ("Path", "1600x1200.jpg"), ("summer_1am", "1600x1200.jpg"),
    )],
    "lomiri-wallpapers-20.04": [LOMIRI.format(name) for name in ("Infinite-Sea_by_Aury88", "Kleiber_by_Lukas_Baubkus")],
    "lomiri-wallpapers-16.04": [LOMIRI.format(name) for name in (
        "Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Picture_0B_by_freespace", "Picture_1A_by_freespace",
        "Wine_by_Jakkub_Mede",
    )],
}  # fmt: skip
TEST = {
    "opencv-doc": [OPENCV.format(name) for name in (
        "apple.jpg", "baboon.jpg", "board.jpg", "building.jpg", "butterfly.jpg", "fruits.jpg", "home.jpg",
        "leuvenA.jpg", "aero1.jpg", "aloeL.jpg", "box_in_scene.png", "graf1.png", "orange.jpg", "pca_test1.jpg",
        "rubberwhale1.png", "squirrel_cls.jpg", "stuff.jpg", "ela_original.jpg", "licenseplate_motion.jpg",
        "chicky_512.png", "text_defocus.jpg",
    )],
    "lomiri-wallpapers-16.04": [LOMIRI.format(name) for name in (
        "aitzgorri_by_Aitzol_Berasategi", "analogpattern_by_Peter_Nerlich", "free_by_Peter_Nerlich",
        "friends_by_Aitzol_Berasategi", "greentock_by_Peter_Nerlich", "life_by_Aitzol_Berasategi",
        "picosdeeuropa_by_Aitzol_Berasategi", "seeding_by_Clements_Engelhardt", "sunset_by_Aitzol_Berasategi",
    )],
}  # fmt: skip
LONG_SIDE = 1024


def unpack(package: str, scratch: Path) -> Path:
    """The package's files under scratch/package (apt-get download, then dpkg-deb -x)."""
    target = scratch / package
    if not target.is_dir():
        subprocess.run(["apt-get", "download", package], cwd=scratch, check=True, capture_output=True)
        deb = next(scratch.glob(f"{package}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    return target


def photo_name(name: str) -> str:
    """A file's name in the output folder: a Plasma wallpaper's is its folder's (its files are sizes)."""
    path = Path(name)
    return path.parents[2].name if path.parent.name == "images" else path.stem


def write_folder(chosen: dict[str, list[str]], out: Path, scratch: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    for package, files in chosen.items():
        root = unpack(package, scratch)
        for name in files:
            image = Image.open(root / name).convert("RGB")
            image.thumbnail((LONG_SIDE, LONG_SIDE), Image.Resampling.LANCZOS)
            image.save(out / f"{package}-{photo_name(name)}.jpg", quality=92)
    return sum(len(files) for files in chosen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    out = parser.parse_args().out
    with tempfile.TemporaryDirectory(prefix="ood-packages-") as scratch:
        folders = {"choose": CHOOSE, "test": TEST}
        counts = {name: write_folder(chosen, out / name, Path(scratch)) for name, chosen in folders.items()}
    print(", ".join(f"{count} photos in {out / name}" for name, count in counts.items()))


if __name__ == "__main__":
    main()
