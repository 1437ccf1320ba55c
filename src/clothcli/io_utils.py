"""Atomic writes: a crash, Ctrl-C or SIGKILL never leaves a half-written file or folder in place.

A file is written beside its place and renamed over it. A folder is written as `.NAME.staging`, the
old one renamed to `.NAME.old`, and the staging folder renamed to `NAME`. A kill between those two
renames leaves no `NAME` but a complete staging folder: readers find it with `readable_dir`, and the
writer (the next save, or `--resume`) finishes the swap with `recover_dir`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# Tests only: seconds to pause at each point inside a write, so that a kill can land there.
FAULT_DELAY_ENV = "CLOTHCLI_FAULT_DELAY"


def user_cache_dir() -> Path:
    """clothcli's folder in the user's cache ($XDG_CACHE_HOME, else ~/.cache): measured choices, compiled
    kernels, decoded images and evaluations, kept between runs and never beside someone else's files."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clothcli"


def fault_point() -> None:
    """Pause here when CLOTHCLI_FAULT_DELAY is set (the fault-injection tests kill runs in these pauses)."""
    delay = os.environ.get(FAULT_DELAY_ENV)
    if delay:
        time.sleep(float(delay))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fault_point()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the mode a plain open() gives, not mkstemp's owner-only 0600
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def staging_dir(target: Path) -> Path:
    return target.with_name(f".{target.name}.staging")


def _old_dir(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def recover_dir(target: Path) -> None:
    """Finish a `replace_dir` that a kill interrupted. Only the process that writes `target` may call
    this (a reader could race a live swap): `readable_dir` is the readers' side.

    The old folder is renamed away only once the staging folder is complete, so a missing `target`
    beside a `.old` folder means the staging folder is the newer complete version; an `.old` folder
    beside `target` is what the swap had not yet deleted."""
    old, staging = _old_dir(target), staging_dir(target)
    if not target.exists() and old.exists():
        os.replace(staging if staging.exists() else old, target)
    if target.exists() and old.exists():
        shutil.rmtree(old)


def readable_dir(target: Path) -> Path:
    """Where the complete version of `target` is now, without changing anything: `target` itself, or
    during (or after a kill inside) a swap, the complete staging or old folder."""
    if target.exists():
        return target
    old, staging = _old_dir(target), staging_dir(target)
    if old.exists():
        return staging if staging.exists() else old
    return target


def replace_dir(staging: Path, target: Path) -> None:
    """Swap a fully written `staging` directory into place at `target`.

    The old directory is renamed away first, so at every instant either the old or the new complete
    directory exists under a name that `recover_dir` resolves."""
    recover_dir(target)
    old = _old_dir(target)
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
        fault_point()
    os.replace(staging, target)
    if old.exists():
        shutil.rmtree(old)


def file_sha256(path: str | Path) -> str:
    """The hex SHA-256 of the file at `path`, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
