"""The dataset layout: `root/<split>/<class>/<image>`, classes taken from `train/`.

Hidden entries and files that are not images are skipped and counted, never fatal; what
cannot be trained on (no train split, an empty class, an extra class in another split) is a
UserError.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from clothcli.errors import UserError
from clothcli.names import check_class_names, folder_name

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
SPLIT_NAMES = {
    "train": ("train",),
    "validation": ("validation", "val", "valid"),
    "test": ("test",),
}


def is_image_name(path: str | Path) -> bool:
    """True when the extension (any case) is one we decode."""
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def is_hidden(name: str) -> bool:
    """Dot-files, macOS resource forks and the like."""
    return name.startswith(".") or name.startswith("__MACOSX")


@dataclass
class Skipped:
    """A file that was not used, and why."""

    path: Path
    reason: str


@dataclass
class SplitIndex:
    """The image files of one split, labelled by class index."""

    name: str
    directory: Path
    samples: list[tuple[Path, int]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        return [p for p, _ in self.samples]

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    def class_counts(self, num_classes: int) -> list[int]:
        counts = [0] * num_classes
        for _, target in self.samples:
            counts[target] += 1
        return counts


@dataclass
class DatasetIndex:
    """All splits of a dataset with one shared class list."""

    root: Path
    classes: list[str]
    splits: dict[str, SplitIndex]
    warnings: list[str] = field(default_factory=list)


def walk_images(directory: Path) -> tuple[list[Path], list[Skipped]]:
    """All image files below `directory` (sorted, symlinked folders not followed twice)."""
    images: list[Path] = []
    skipped: list[Skipped] = []
    for current, dirs, files in os.walk(directory, followlinks=False):
        hidden_dirs = [d for d in dirs if is_hidden(d)]
        for name in hidden_dirs:
            skipped.append(Skipped(Path(current) / name, "hidden folder"))
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        for name in sorted(files):
            path = Path(current) / name
            if is_hidden(name):
                skipped.append(Skipped(path, "hidden file"))
            elif not is_image_name(name):
                skipped.append(Skipped(path, "not an image extension"))
            elif not path.is_file():  # a FIFO or a device named like an image would block a reader
                skipped.append(Skipped(path, "not a regular file"))
            else:
                images.append(path)
    return images, skipped


def class_difference(expected: list[str], found: list[str]) -> str:
    """How `found` differs from `expected`, for an error line: "lacks a, b; adds c", or for the same names
    in another order, "orders them ..."; "" when they are equal."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    parts = [f"lacks {', '.join(missing)}" if missing else "", f"adds {', '.join(extra)}" if extra else ""]
    if missing or extra:
        return "; ".join(p for p in parts if p)
    return "" if list(expected) == list(found) else "orders them " + ", ".join(found)


def find_split_dir(root: Path, split: str) -> Path | None:
    """The folder of `split` under `root`, accepting the aliases (val/ for validation/)."""
    for name in SPLIT_NAMES.get(split, (split,)):
        candidate = root / name
        if candidate.is_dir():
            return candidate
    return None


def resolve_eval_folder(data: str | Path, split: str) -> Path:
    """`data/<split>` when `data` is a dataset folder, else `data` itself (laid out by class)."""
    data = Path(data)
    if not data.is_dir():
        raise UserError(f"data folder not found: {data}")
    return find_split_dir(data, split) or data


def class_dirs(split_dir: Path) -> list[Path]:
    """Visible sub-folders of a split, sorted by name."""
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not is_hidden(p.name))


def index_folder(directory: Path, classes: list[str], name: str = "folder") -> SplitIndex:
    """Index a folder laid out `<class>/<image>` against a known class list."""
    split = SplitIndex(name=name, directory=directory)
    for entry in sorted(directory.iterdir()):
        if entry.is_file():
            reason = "hidden file" if is_hidden(entry.name) else "not inside a class folder"
            split.skipped.append(Skipped(entry, reason))
    # a label with a slash lives in its derived folder (`names.folder_name`), as predict --copy-to sorts it
    lookup = {folder_name(c): i for i, c in enumerate(classes)} | {c: i for i, c in enumerate(classes)}
    for class_dir in class_dirs(directory):
        if class_dir.name not in lookup:
            raise UserError(
                f"{directory}: class '{class_dir.name}' is not among the known classes ({', '.join(classes)})"
            )
        images, skipped = walk_images(class_dir)
        split.samples.extend((p, lookup[class_dir.name]) for p in images)
        split.skipped.extend(skipped)
    return split


def index_dataset(root: str | Path, splits: tuple[str, ...] = ("train", "validation", "test")) -> DatasetIndex:
    """Index `root`; the class list comes from train/, which must exist and have no empty class."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"dataset folder not found: {root}")
    train_dir = find_split_dir(root, "train")
    if train_dir is None:
        raise UserError(f"{root}: no train/ folder (expected {root}/train/<class>/<image>)")
    classes = [d.name for d in class_dirs(train_dir)]
    if not classes:
        raise UserError(f"{train_dir}: no class folders (expected train/<class>/<image>)")
    check_class_names(classes, str(train_dir))
    index = DatasetIndex(root=root, classes=classes, splits={})
    for split_name in ("train", *[s for s in splits if s != "train"]):
        directory = find_split_dir(root, split_name)
        if directory is None:
            if split_name != "train" and split_name in splits:
                index.warnings.append(f"no {split_name}/ split in {root}")
            continue
        split = index_folder(directory, classes, split_name)
        counts = split.class_counts(len(classes))
        if split_name == "train":
            empty = [c for c, n in zip(classes, counts) if n == 0]
            if empty:
                raise UserError(f"{directory}: class folder(s) with no images: {', '.join(empty)}")
        elif not split.samples:
            index.warnings.append(f"{directory}: split has no images")
        else:
            missing = [c for c, n in zip(classes, counts) if n == 0]
            if missing:
                index.warnings.append(f"{directory}: no images for class(es) {', '.join(missing)}")
        if split_name in splits:
            index.splits[split_name] = split
    return index
