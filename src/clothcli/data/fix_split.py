"""`analyze-data --fix-split OUT`: a copy of a dataset in which no picture leaks across splits.

Every group of exact or near duplicates (as `analyze-data` finds them) is put into one split: the one
holding most of the group, train on ties. A group whose copies carry different labels is left out
(it is not known which label is right) unless `keep_conflicts`. Files are hard-linked where the file
system allows, else copied; the source is never changed. A manifest lists every file's old and new
place.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from clothcli.data.audit import DatasetAudit, audit_dataset
from clothcli.data.layout import find_split_dir
from clothcli.errors import UserError
from clothcli.io_utils import atomic_write_text

SPLIT_PREFERENCE = ("train", "validation", "val", "test")
MANIFEST = "manifest.json"


@dataclass
class SplitFix:
    out: Path
    files: int = 0  # files written
    hard_links: int = 0
    moved: list[dict[str, str]] = field(default_factory=list)  # source, destination, group kind
    left_out: list[dict[str, str]] = field(default_factory=list)  # source, labels of its group
    manifest: Path | None = None


def _target_split(splits: list[str]) -> str:
    """The split holding most of a group; on a tie the one first in SPLIT_PREFERENCE (train)."""
    counts = Counter(splits)
    best = max(counts.values())
    tied = [s for s in counts if counts[s] == best]
    return min(tied, key=lambda s: SPLIT_PREFERENCE.index(s) if s in SPLIT_PREFERENCE else len(SPLIT_PREFERENCE))


def _place(source: Path, destination: Path, root: Path) -> bool:
    """Hard-link `source` to `destination` (True), or copy it where links are not possible (False); never
    outside `root`, also through a link planted in it."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if not Path(os.path.realpath(destination.parent)).is_relative_to(os.path.realpath(root)):
        raise UserError(f"{destination}: outside {root}; refusing to write there")
    try:
        os.link(source, destination)
        return True
    except OSError:
        shutil.copy2(source, destination)
        return False


def fix_split(
    root: str | Path,
    out: str | Path,
    keep_conflicts: bool = False,
    workers: int = 4,
    progress: Callable[[int, int], None] | None = None,
    analysis: DatasetAudit | None = None,
) -> SplitFix:
    """Write the fixed copy of the dataset at `root` into `out` (which must not exist or be empty).
    `analysis` is `audit_dataset(root)` when the caller has it already."""
    root, out = Path(root), Path(out)
    if not root.is_dir() or find_split_dir(root, "train") is None:
        raise UserError(
            f"{root}: --fix-split rewrites split folders (train/, validation/, test/); an unsplit folder or a "
            "label file is split with every duplicate group in one split already (--write-splits writes it)"
        )
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not empty; --fix-split writes a new dataset folder")
    if out.resolve().is_relative_to(root.resolve()):
        raise UserError(f"{out}: must be outside the dataset folder {root}")
    analysis = analysis or audit_dataset(root, workers=workers, progress=progress)
    root = Path(analysis.root)
    destination_of: dict[str, Path | None] = {}
    result = SplitFix(out)
    for group in analysis.duplicates:
        paths = [Path(p) for p in group["paths"]]
        if group["conflicting_labels"] and not keep_conflicts:
            for path in paths:
                destination_of[str(path)] = None
                result.left_out.append({"source": str(path), "labels": ", ".join(group["labels"])})
            continue
        if not group["cross_split"]:
            continue
        split = _target_split([p.relative_to(root).parts[0] for p in paths])
        for path in paths:
            relative = path.relative_to(root)
            if relative.parts[0] != split:
                target = out / split / Path(*relative.parts[1:])
                destination_of[str(path)] = target
                result.moved.append({"source": str(path), "destination": str(target), "kind": group["kind"]})
    unreadable = {u["path"] for u in analysis.unreadable}
    entries = []
    for split_name, split in analysis.splits.items():
        directory = Path(split["directory"])
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            if str(path) in unreadable or not _is_indexed(path, directory):
                continue
            target = destination_of.get(str(path), out / path.relative_to(root))
            if target is not None:
                if target.exists():
                    target = target.with_name(f"{target.stem}-{split_name}{target.suffix}")
                result.hard_links += _place(path, target, out)
                result.files += 1
            entries.append({"source": str(path), "destination": str(target) if target else None})
    result.manifest = out / MANIFEST
    manifest = {"source": str(root), "moved": result.moved, "left_out": result.left_out, "files": entries}
    atomic_write_text(result.manifest, json.dumps(manifest, indent=2) + "\n")
    return result


def _is_indexed(path: Path, split_dir: Path) -> bool:
    """Whether the layout reads `path` as an image of a class (not hidden, an image name)."""
    from clothcli.data.layout import is_hidden, is_image_name

    relative = path.relative_to(split_dir)
    return len(relative.parts) >= 2 and is_image_name(path.name) and not any(is_hidden(p) for p in relative.parts)
