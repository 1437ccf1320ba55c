"""Fetching clothing-dataset-small for users who are online.

The archive is GitHub's zip of a pinned upstream commit. GitHub does not promise byte-stable
zips, so what is checked is the content: a SHA-256 over the sorted list of
`split/class/file <sha256 of file>` lines of the extracted images (`content_digest`).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from clothcli.data.layout import IMAGE_EXTENSIONS, is_hidden
from clothcli.errors import UserError

CLOTHING_COMMIT = "11961516512414bf9f6c150a832cfd21b54a6b54"
CLOTHING_URL = f"https://github.com/alexeygrigorev/clothing-dataset-small/archive/{CLOTHING_COMMIT}.zip"
CLOTHING_DIGEST = "55ee2d8f2e6ad4bb657b13347839fe62bea5db0375d77ebe169e12026edee35c"

ProgressFn = Callable[[int, int | None], None]


def content_digest(root: Path) -> str:
    """SHA-256 over `relative/path <file sha256>` lines of all images below `root`, sorted."""
    lines = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not any(is_hidden(p) for p in rel.parts):
            lines.append(f"{rel.as_posix()} {hashlib.sha256(path.read_bytes()).hexdigest()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _fetch(url: str, target: Path, progress: ProgressFn | None) -> None:
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(target, "wb") as out:
            total = response.headers.get("Content-Length")
            total_bytes = int(total) if total and total.isdigit() else None
            done = 0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total_bytes)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"could not download the dataset from {url} ({reason}); if you are offline, get "
            "clothing-dataset-small another way and pass its folder with --data PATH"
        ) from None


def _dataset_root(extracted: Path) -> Path:
    """The folder inside an extracted archive that holds train/."""
    candidates = [p.parent for p in extracted.rglob("train") if p.is_dir()]
    if not candidates:
        raise UserError("the downloaded archive has no train/ folder; it is not a split/class dataset")
    return min(candidates, key=lambda p: len(p.parts))


def download_dataset(
    dest: str | Path,
    url: str = CLOTHING_URL,
    expected_digest: str | None = CLOTHING_DIGEST,
    progress: ProgressFn | None = None,
) -> Path:
    """Download and unpack the dataset zip at `url` into `dest`; verify its content digest.

    Nothing is left at `dest` unless the whole dataset arrived and matched.
    """
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise UserError(f"{dest} already exists and is not empty; pass it with --data instead")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        archive = Path(tmp) / "dataset.zip"
        _fetch(url, archive, progress)
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(Path(tmp) / "x")
        except zipfile.BadZipFile:
            raise UserError(f"the file downloaded from {url} is not a zip archive") from None
        root = _dataset_root(Path(tmp) / "x")
        if expected_digest:
            digest = content_digest(root)
            if digest != expected_digest:
                raise UserError(
                    f"checksum mismatch for the dataset from {url}: expected {expected_digest}, "
                    f"got {digest}; the download is corrupt or the archive changed"
                )
        if dest.exists():
            dest.rmdir()
        shutil.move(str(root), str(dest))
    return dest
