"""Writing tune's suggestion into the user's YAML: in place, comments and layout kept, and checked
to load before it replaces the file."""

from __future__ import annotations

import json
import re
from pathlib import Path

from clothcli.config import load_config
from clothcli.errors import UserError
from clothcli.io_utils import atomic_path


def write_suggestion(
    path: str | Path,
    lr: float,
    batch_size: int | None = None,
    mixed_precision: str | None = None,
    channels_last: bool | None = None,
) -> None:
    """Set optim.lr (and each train.* value given) in a YAML config in place, keeping comments and layout."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    text = _set_key(text, "optim", "lr", f"{lr:.3g}")
    if batch_size is not None:
        text = _set_key(text, "train", "batch_size", str(batch_size))
    if mixed_precision is not None:
        text = _set_key(text, "train", "mixed_precision", json.dumps(mixed_precision))  # bare `no` is YAML false
    if channels_last is not None:
        text = _set_key(text, "train", "channels_last", str(channels_last).lower())
    with atomic_path(path) as staged:
        staged.write_text(text, encoding="utf-8")
        try:
            load_config(staged)  # beside the file, so relative paths resolve as they will
        except UserError as exc:
            detail = str(exc).replace(str(staged), path.name)
            raise UserError(f"{path}: not changed, the edited config would not load: {detail}") from None


def _set_key(text: str, section: str, key: str, value: str) -> str:
    lines = text.splitlines(keepends=True)
    head = re.compile(rf"^{section}:\s*(#.*)?$")
    for i, line in enumerate(lines):
        if head.match(line.rstrip("\n")):
            indent = None
            for j in range(i + 1, len(lines)):
                stripped = lines[j].strip()
                if not stripped or stripped.startswith("#"):
                    continue
                current = len(lines[j]) - len(lines[j].lstrip())
                if current == 0:
                    break
                indent = indent if indent is not None else current
                match = re.match(rf"^(\s*){key}:\s*([^#\n]*?)(\s*#.*)?$", lines[j].rstrip("\n"))
                if match and len(match.group(1)) == indent:
                    comment = match.group(3) or ""
                    lines[j] = f"{match.group(1)}{key}: {value}{comment}\n"
                    return "".join(lines)
            lines.insert(i + 1, f"{' ' * (indent or 2)}{key}: {value}\n")
            return "".join(lines)
    suffix = "" if text.endswith("\n") or not text else "\n"
    return text + f"{suffix}{section}:\n  {key}: {value}\n"
