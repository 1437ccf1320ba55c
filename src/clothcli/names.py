"""Class names are data from someone else's file: one rule for every class list, and safe folder names.

A class list enters clothcli from training folders, checkpoint.json, an exported model's metadata
and, in a comparison, reference rows. Each name must be non-empty, at most MAX_LENGTH characters,
free of control and invisible formatting characters, not `.` or `..` nor a path that climbs out of
a folder (`../x`, `/etc`, `a/../../b`), not the reserved answer `unknown`, and unique, also when
case and Unicode normal form are ignored (`Shirt` and `shirt` are one folder on macOS and Windows).
A slash inside a name is kept (a catalogue's `T-shirt/top` is a fine label); wherever a folder is
made from a label, `class_folders` gives it a single safe path component instead.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from clothcli.errors import UserError

MAX_LENGTH = 120
UNKNOWN = "unknown"  # what predict answers below its confidence floor: no class may be called so
_DRIVE = re.compile(r"^[A-Za-z]:")
_SEPARATORS = re.compile(r"[/\\]")


def name_key(name: str) -> str:
    """What two names must not share: the same letters up to case and Unicode normal form."""
    return unicodedata.normalize("NFKC", name).casefold()


def name_problem(name: object) -> str | None:
    """Why `name` cannot be a class name, or None when it can."""
    if not isinstance(name, str):
        return f"{name!r} is not text"
    if not name.strip():
        return "an empty name"
    if len(name) > MAX_LENGTH:
        return f"a name of {len(name)} characters (at most {MAX_LENGTH})"
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") for ch in name):
        return f"{name!a} holds a control or invisible character"
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return f"'{name}' is an absolute path"
    if any(part in ("", ".", "..") for part in _SEPARATORS.split(name)):
        return f"'{name}' is not a plain name (an empty, '.' or '..' path component)"
    if name_key(name) == UNKNOWN:
        return f"'{name}' is reserved for images predict rejects"
    return None


def check_class_names(names: Iterable[object], source: str) -> list[str]:
    """`names` as a list when every one follows the rule; else one UserError naming `source` and the name."""
    if not isinstance(names, list | tuple):
        raise UserError(f"{source}: the class names must be a list, got {type(names).__name__}")
    names = list(names)
    if not names:
        raise UserError(f"{source}: no class names")
    seen: dict[str, str] = {}
    for name in names:
        problem = name_problem(name)
        if problem is not None:
            raise UserError(f"{source}: bad class name: {problem}")
        key = name_key(name)  # type: ignore[arg-type]
        if key in seen:
            raise UserError(f"{source}: class names '{seen[key]}' and '{name}' are the same name up to case or form")
        seen[key] = name  # type: ignore[assignment]
    return names  # type: ignore[return-value]


def folder_name(label: str) -> str:
    """One safe path component for a label: separators become '_', and a leading dot (a hidden folder)
    is escaped. The label itself must already follow the rule."""
    name = _SEPARATORS.sub("_", label)
    return "_" + name if name.startswith(".") else name


def class_folders(labels: Iterable[str]) -> dict[str, str]:
    """Label -> folder name for every label, refusing two labels that would share one folder (such as
    `T-shirt/top` and `T-shirt_top`, or names equal up to case)."""
    folders: dict[str, str] = {}
    taken: dict[str, str] = {}
    for label in labels:
        folder = folder_name(label)
        key = name_key(folder)
        if key in taken and taken[key] != label:
            raise UserError(f"labels '{taken[key]}' and '{label}' would share the folder '{folder}'")
        taken[key], folders[label] = label, folder
    return folders
