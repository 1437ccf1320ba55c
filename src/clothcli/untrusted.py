"""Reading metadata files someone else may have written: bounded in size and depth, data only.

checkpoint.json, an export's metadata and a run folder's state are JSON read with these limits, so
a file of gigabytes or of thousands of nested brackets is one line and exit code 2, not an hour of
parsing or a RecursionError.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clothcli.errors import UserError

MAX_METADATA_BYTES = 16 * 1024 * 1024  # a checkpoint's metadata is a few kB; a long run's history well under 1 MB
MAX_DEPTH = 64


def _depth(value: Any) -> int:
    """How deeply `value` nests lists and mappings, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in item if isinstance(child, dict | list))
    return deepest


def parse_json(text: str | bytes, source: str | Path, limit: int = MAX_METADATA_BYTES) -> Any:
    """`text` as JSON; a UserError naming `source` when it is larger than `limit`, malformed or nested
    deeper than MAX_DEPTH."""
    if len(text) > limit:
        raise UserError(f"{source}: {len(text):,} bytes of metadata, more than the {limit:,} allowed")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:120]
        raise UserError(f"{source}: not readable JSON ({reason})") from None
    if _depth(value) > MAX_DEPTH:
        raise UserError(f"{source}: JSON nested more than {MAX_DEPTH} levels deep")
    return value


def read_json(path: Path, limit: int = MAX_METADATA_BYTES) -> Any:
    """The JSON file at `path`, read only when it is a regular file within `limit` bytes."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise UserError(f"{path}: not a regular file")
        if size > limit:
            raise UserError(f"{path}: {size:,} bytes of metadata, more than the {limit:,} allowed")
        return parse_json(path.read_bytes(), path, limit)
    except OSError as exc:
        raise UserError(f"{path}: unreadable ({exc.strerror or exc})") from None
