"""Opening images as a phone or the web produces them, with a reason when that fails."""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from clothcli.data import embedded

# PIL only warns between MAX_IMAGE_PIXELS and twice that; we treat both as a decompression bomb.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class ImageReadError(Exception):
    """An image that cannot be used; the message is the reason shown to the user."""


@dataclass
class ImageInfo:
    """What an image header says, read without decoding the pixels."""

    width: int
    height: int
    mode: str
    format: str


def _describe(exc: BaseException) -> str:
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return f"decompression bomb (more than {MAX_IMAGE_PIXELS:,} pixels)"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (format not recognised)"
    if isinstance(exc, OSError) and "truncated" in str(exc).lower():
        return "truncated image"
    return f"{type(exc).__name__}: {exc}"


def read_image_bytes(path: str | Path) -> bytes:
    """The bytes of an image file, or of an image stored inside a Parquet file (`data.embedded`)."""
    if embedded.is_embedded(path):
        try:
            return embedded.read_bytes(path)
        except embedded.EmbeddedReadError as exc:
            raise ImageReadError(str(exc)) from None
    return Path(path).read_bytes()


def image_stamp(path: str | Path) -> tuple[int, int]:
    """(size, modification time) of an image file, or of the Parquet file an embedded image is in."""
    if embedded.is_embedded(path):
        return embedded.stamp(path)
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns


def _open(source: Path | bytes) -> Image.Image:
    """The image header opened (pixels not decoded yet): a file, the bytes of one (an upload), or an
    image inside a Parquet file."""
    if isinstance(source, Path) and embedded.is_embedded(source):
        source = read_image_bytes(source)
    if isinstance(source, bytes):
        if not source:
            raise ImageReadError("empty file (0 bytes)")
        target: Path | io.BytesIO = io.BytesIO(source)
    else:
        info = source.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block the read forever
            raise ImageReadError("not a regular file")
        if info.st_size == 0:
            raise ImageReadError("empty file (0 bytes)")
        target = source
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(target)
        except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageReadError(_describe(exc)) from exc


def read_info(path: str | Path) -> ImageInfo:
    """Size, mode and format from the header (fast: no pixel decoding)."""
    try:
        with _open(Path(path)) as img:
            return ImageInfo(img.width, img.height, img.mode, img.format or "?")
    except FileNotFoundError as exc:
        raise ImageReadError("file not found") from exc


def load_rgb(path: str | Path | bytes, min_size: int | None = None) -> Image.Image:
    """Decode a file (or the bytes of one) to an upright RGB image.

    EXIF orientation is applied, the first frame of animations is used, palette/alpha/16-bit/
    CMYK/grayscale are converted to RGB (transparent areas on white). With `min_size`, JPEGs far
    larger than needed are decoded at a reduced scale (`Image.draft`), keeping the short side at
    least `min_size`.
    """
    try:
        img = _open(path if isinstance(path, bytes) else Path(path))
    except FileNotFoundError as exc:
        raise ImageReadError("file not found") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if min_size and img.format == "JPEG":
                scale = min(img.width, img.height) / min_size
                if scale >= 2:
                    img.draft("RGB", (img.width // int(scale), img.height // int(scale)))
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except ImageReadError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(_describe(exc)) from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit integer grayscale: scale to 8 bits instead of clipping.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        peak = arr.max() if arr.size else 0
        arr = arr * (255.0 / peak) if peak > 255 else arr
        img = Image.fromarray(arr.clip(0, 255).astype("uint8"), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
