"""Writing files into folders named after labels, never outside the folder asked for.

Labels come from someone else's model file, so every writer that makes a path from one goes through
here: the folder must be one plain path component, it is opened relative to the root's descriptor
without following a symbolic link (one planted inside the target between a check and the write
cannot redirect it), and the file is created exclusively (never over an existing file or link).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from pathlib import Path

from clothcli.errors import UserError

_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def check_component(name: str, what: str = "folder") -> str:
    """`name` when it is one plain path component (no separator, not '.' or '..'); else a UserError."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or os.sep in name:
        raise UserError(f"refusing to write to the {what} '{name}': not a plain name inside the target folder")
    return name


def open_inside(root: Path, folder: str) -> int:
    """A descriptor of root/folder (made when missing), opened without following a symbolic link."""
    check_component(folder)
    root.mkdir(parents=True, exist_ok=True)
    root_fd = os.open(root, os.O_RDONLY | _DIRECTORY)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o777, dir_fd=root_fd)
        try:
            return os.open(folder, os.O_RDONLY | _DIRECTORY | _NO_FOLLOW, dir_fd=root_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UserError(
                    f"{root / folder} is a symbolic link or not a folder: refusing to write through it"
                ) from None
            raise
    finally:
        os.close(root_fd)


def _copy_into(source: Path, name: str, dir_fd: int) -> None:
    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NO_FOLLOW, 0o666, dir_fd=dir_fd)
    try:
        with open(source, "rb") as src, os.fdopen(out, "wb", closefd=False) as dst:
            shutil.copyfileobj(src, dst)
        info = os.stat(source)
        os.fchmod(out, stat.S_IMODE(info.st_mode))
        os.utime(out, ns=(info.st_atime_ns, info.st_mtime_ns))
    except BaseException:
        os.unlink(name, dir_fd=dir_fd)
        raise
    finally:
        os.close(out)


def _move_into(source: Path, name: str, dir_fd: int) -> None:
    """A hard link then the unlink of the source: never replaces an existing name (a rename would)."""
    try:
        os.link(source, name, dst_dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        _copy_into(source, name, dir_fd)
    os.unlink(source)


def place_file(source: Path, root: Path, folder: str, move: bool = False) -> Path:
    """Copy (or move) `source` into root/folder/, as its own name or name-1, name-2 ...; the path written."""
    folder_fd = open_inside(root, folder)
    try:
        stem, suffix = os.path.splitext(check_component(source.name, "file"))
        attempt = 0
        while True:
            name = source.name if attempt == 0 else f"{stem}-{attempt}{suffix}"
            try:
                (_move_into if move else _copy_into)(source, name, folder_fd)
                return root / folder / name
            except FileExistsError:
                attempt += 1
    finally:
        os.close(folder_fd)


def refuse_links(*paths: Path) -> None:
    """A UserError when any of `paths` is a symbolic link: clothcli writes there, and a link would send
    the write elsewhere."""
    for path in paths:
        if path.is_symlink():
            raise UserError(f"{path} is a symbolic link (to {os.readlink(path)}): refusing to write through it")
