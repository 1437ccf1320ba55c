"""Finding the images that files, folders and glob patterns name."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

from clothcli.data.layout import is_hidden, is_image_name
from clothcli.errors import UserError


@dataclass
class Inputs:
    files: list[Path]
    missing: list[str] = field(default_factory=list)
    skipped: int = 0


def collect_inputs(items: list[str], recursive: bool = True) -> Inputs:
    """Files, folders and glob patterns -> sorted unique files (symlink loops followed once)."""
    found: dict[str, Path] = {}
    out = Inputs(files=[])

    def add(path: Path) -> None:
        found.setdefault(os.path.realpath(path), path)

    def walk(folder: Path) -> None:
        seen_dirs: set[str] = set()
        for current, dirs, files in os.walk(folder, followlinks=True):
            real = os.path.realpath(current)
            if real in seen_dirs:
                dirs[:] = []
                continue
            seen_dirs.add(real)
            dirs[:] = sorted(d for d in dirs if not is_hidden(d)) if recursive else []
            for name in files:
                if is_hidden(name) or not is_image_name(name):
                    out.skipped += 1
                    continue
                path = Path(current) / name
                if path.is_file():  # regular files only: a FIFO named like an image would block
                    add(path)

    for item in items:
        path = Path(item)
        if path.is_dir():
            walk(path)
        elif path.is_file():
            add(path)
        elif any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                out.missing.append(item)
            for match in matches:
                m = Path(match)
                if m.is_dir():
                    walk(m)
                elif m.is_file() and is_image_name(m.name) and not is_hidden(m.name):
                    add(m)
        else:
            out.missing.append(item)
    out.files = sorted(found.values(), key=lambda p: str(p))
    return out


def images_under(folder: str | Path) -> list[Path]:
    """Every image under `folder`, in any layout (an out-of-distribution folder); a UserError when none."""
    found = collect_inputs([str(folder)])
    if found.missing or not found.files:
        raise UserError(f"{folder}: no images found")
    return found.files
