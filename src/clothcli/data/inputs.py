"""Finding the images that files, folders, glob patterns and input lists name.

An input list (`predict --from-list`) is a text file of one path per line, or a .csv, .jsonl or .parquet
file with a `path` column: a million paths that do not fit on a command line. Its paths are relative to
its folder (or to the folder given as its root) and must stay inside it, as a label file's must; its order
is kept, so every process of a sharded run sees the same list.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

from clothcli.data.embedded import stored_image_ids
from clothcli.data.layout import is_hidden, is_image_name
from clothcli.errors import UserError

LIST_TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")
LIST_PATH_COLUMN = "path"


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


@dataclass
class ListedInputs:
    """An input list's paths in its order, duplicates dropped; the entries that were refused, by line."""

    files: list[str]  # strings, not Paths: a million Path objects take seconds to make
    refused: list[str] = field(default_factory=list)  # "line N: why", for entries outside the root or empty


def _list_entries(path: Path) -> list[str]:
    from clothcli.data.sources import read_rows

    if path.suffix.lower() not in LIST_TABLE_SUFFIXES:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise UserError(f"{path}: not a UTF-8 text list of paths") from None
        return [line.strip() for line in text.splitlines()]
    if path.suffix.lower() == ".parquet" and (ids := stored_image_ids(path, LIST_PATH_COLUMN)) is not None:
        return ids
    rows = read_rows(path)
    if rows and "__bad__" not in rows[0] and LIST_PATH_COLUMN not in rows[0]:
        raise UserError(f"{path}: no '{LIST_PATH_COLUMN}' column; columns: {', '.join(rows[0])}")
    return [str(row.get(LIST_PATH_COLUMN) or "").strip() for row in rows]


def read_input_list(path: str | Path, root: str | Path | None = None) -> ListedInputs:
    """The images an input list names, relative to `root` (by default the list's folder) and inside it.

    Lexical checks only (no stat per entry): a listed file that is missing becomes a result with an
    error later, as an unreadable image does, instead of aborting a run over a million paths. Blank
    lines and lines starting with '#' in a text list are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input list not found: {path}")
    given = str(root if root is not None else path.parent)
    base = os.path.abspath(given)
    if root is not None and not os.path.isdir(base):
        raise UserError(f"--list-root {root}: not a folder")
    textual = path.suffix.lower() not in LIST_TABLE_SUFFIXES
    first_row = 1 if textual or path.suffix.lower() != ".csv" else 2
    out = ListedInputs(files=[])
    seen: set[str] = set()
    inside = base.rstrip(os.sep) + os.sep
    prefix = "" if os.path.normpath(given) == "." else os.path.normpath(given).rstrip(os.sep) + os.sep
    for number, entry in enumerate(_list_entries(path), first_row):
        if not entry or (textual and entry.startswith("#")):
            if not textual:
                out.refused.append(f"row {number}: no {LIST_PATH_COLUMN}")
            continue
        if _plain_relative(entry):  # no '..', '.', '//' or leading '/': inside by construction, no normpath
            shown, full = prefix + entry, inside + entry
        else:
            shown = os.path.normpath(os.path.join(given, entry))  # as the user names it: relative stays relative
            full = os.path.normpath(os.path.join(base, entry))
            if not full.startswith(inside):
                out.refused.append(f"{'line' if textual else 'row'} {number}: {entry} is outside {base}")
                continue
        if full not in seen:
            seen.add(full)
            out.files.append(shown)
    return out


def _plain_relative(entry: str) -> bool:
    return not (
        entry.startswith(("/", "./", "../")) or entry in (".", "..") or "/../" in entry or "/./" in entry
        or "//" in entry or entry.endswith(("/..", "/.", "/")) or (os.sep != "/" and os.sep in entry)
    )  # fmt: skip
