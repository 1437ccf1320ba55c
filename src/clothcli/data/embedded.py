"""Images stored inside a Parquet file, as Hugging Face `datasets` exports them.

Such a row has no file of its own, so its image id is the Parquet file's path, '#' and the row's number
(counted from 1, as bad rows are reported): `train.parquet#17`. Everything that names an image by its
path (splits.csv, evaluate's errors, compare's pairing, report thumbnails, predict's rows) names it by
this id, and `data.images` reads its bytes from the file. The image column (binary, or the
`{bytes, path}` struct that `datasets.Image` writes) is read once per process and held in memory at its
stored size; nothing is unpacked to disk. A real file whose name looks like an id is read as a file.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clothcli.errors import UserError
from clothcli.untrusted import parse_json

EMBEDDED_ID = re.compile(r"^(?P<file>.+\.parquet)#(?P<row>[1-9][0-9]{0,11})$", re.IGNORECASE)
DEFAULT_IMAGE_COLUMN = "image"
DATA_EXTRA = "pip install 'clothcli[data]'"


class EmbeddedReadError(Exception):
    """An embedded image that cannot be read; the message is the reason."""


def embedded_id(parquet: str | Path, row: int) -> str:
    return f"{parquet}#{row}"


def parse_id(path: str | Path) -> tuple[str, int] | None:
    """(Parquet file, row number) when `path` names an image inside a Parquet file, else None."""
    text = str(path)
    if "#" not in text:
        return None
    match = EMBEDDED_ID.match(text)
    return (match["file"], int(match["row"])) if match else None


def is_embedded(path: str | Path) -> bool:
    """True for an id of an embedded image (and no real file of that name)."""
    return parse_id(path) is not None and not os.path.lexists(path)


def pyarrow_modules() -> tuple[Any, Any]:
    """pyarrow and pyarrow.parquet, or one line naming the extra."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UserError(f"reading .parquet files needs pyarrow: {DATA_EXTRA}") from None
    return pyarrow, pyarrow.parquet


def _is_image_type(pa: Any, kind: Any) -> bool:
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    return pa.types.is_struct(kind) and any(
        f.name == "bytes" and (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)) for f in kind
    )


def image_columns(schema: Any) -> list[str]:
    """The columns of `schema` that can hold images: binary, or a struct with a binary `bytes` field."""
    pa, _ = pyarrow_modules()
    return [f.name for f in schema if _is_image_type(pa, f.type)]


def choose_image_column(schema: Any, wanted: str, source: str | Path) -> str | None:
    """The image column: `wanted` when it holds images, else (`wanted` being the default) the only column
    that does; None without one. A column named in the config that holds no images is an error."""
    found = image_columns(schema)
    if wanted in found:
        return wanted
    if wanted != DEFAULT_IMAGE_COLUMN and found:
        raise UserError(f"{source}: data.image_column '{wanted}' holds no images; image columns: {', '.join(found)}")
    if len(found) > 1:
        raise UserError(f"{source}: several image columns ({', '.join(found)}); name one with data.image_column")
    return found[0] if found else None


def class_names(schema: Any, column: str, source: str | Path) -> list[str] | None:
    """The names a Hugging Face ClassLabel column stores its integers for (schema metadata), if any."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    info = parse_json(raw, f"{source} (its Hugging Face metadata)")
    feature = info.get("info", {}).get("features", {}).get(column) if isinstance(info, dict) else None
    names = feature.get("names") if isinstance(feature, dict) else None
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return names
    return None


@dataclass
class _Column:
    stamp: tuple[int, int]  # the file's size and modification time when read
    values: Any  # a pyarrow BinaryArray, one entry per row


_columns: dict[str, _Column] = {}
_chosen: dict[str, str] = {}  # the image column a source was indexed with (data.image_column), by file
_lock = threading.Lock()


def remember_column(parquet: str | Path, column: str) -> None:
    """Read `parquet`'s images from `column` in this process (and in loader workers forked from it)."""
    _chosen[os.path.realpath(parquet)] = column


def _load(parquet: str) -> _Column:
    real = os.path.realpath(parquet)
    try:
        info = os.stat(real)
    except OSError as exc:
        raise EmbeddedReadError(f"{parquet}: {exc.strerror or 'unreadable'}") from None
    stamp = (info.st_size, info.st_mtime_ns)
    with _lock:
        cached = _columns.get(real)
        if cached is not None and cached.stamp == stamp:
            return cached
        pa, pq = pyarrow_modules()
        try:
            schema = pq.read_schema(real)
            column = _chosen.get(real) or choose_image_column(schema, DEFAULT_IMAGE_COLUMN, parquet)
            if column is None:
                raise EmbeddedReadError(f"{parquet}: no image column")
            values = pq.read_table(real, columns=[column], memory_map=True).column(column).combine_chunks()
        except (OSError, pa.ArrowException) as exc:
            raise EmbeddedReadError(f"{parquet}: not a readable Parquet file ({str(exc)[:120]})") from None
        except UserError as exc:
            raise EmbeddedReadError(str(exc)) from None
        if pa.types.is_struct(values.type):
            values = values.field("bytes")
        _columns[real] = loaded = _Column(stamp, values)
        return loaded


def read_bytes(path: str | Path) -> bytes:
    """The stored bytes of the embedded image `path` names."""
    parsed = parse_id(path)
    if parsed is None:
        raise EmbeddedReadError("not an embedded image id")
    parquet, row = parsed
    values = _load(parquet).values
    if row > len(values):
        raise EmbeddedReadError(f"no row {row} in {parquet} ({len(values)} rows)")
    data = values[row - 1].as_py()
    if not data:
        raise EmbeddedReadError("no image bytes in this row")
    return data


def byte_lengths(parquet: str | Path) -> list[int]:
    """The stored size of every row's image (0 where a row holds none), from the column read once and
    kept for reading the images afterwards."""
    import pyarrow.compute as pc

    try:
        values = _load(str(parquet)).values
    except EmbeddedReadError as exc:
        raise UserError(str(exc)) from None
    return pc.fill_null(pc.binary_length(values), 0).to_pylist()


def stamp(path: str | Path) -> tuple[int, int]:
    """(size, modification time) standing for an embedded image's: its Parquet file's (the id names the
    row), so rewriting the file changes the stamp of every image in it."""
    parsed = parse_id(path)
    if parsed is None:
        raise EmbeddedReadError("not an embedded image id")
    info = os.stat(parsed[0])
    return info.st_size, info.st_mtime_ns


def stored_image_ids(parquet: Path, path_column: str = "path") -> list[str] | None:
    """The id of every row of `parquet` (relative to its folder) when its images are stored inside it
    (an image column and no path column), else None: an input list of the images themselves."""
    pa, pq = pyarrow_modules()
    try:
        schema = pq.read_schema(parquet)
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{parquet}: not a readable Parquet file ({str(exc)[:120]})") from None
    column = None if path_column in schema.names else choose_image_column(schema, DEFAULT_IMAGE_COLUMN, parquet)
    if column is None:
        return None
    remember_column(parquet, column)
    return [embedded_id(parquet.name, row) for row in range(1, row_count(parquet) + 1)]


def row_count(parquet: str | Path) -> int:
    """Rows in a Parquet file, from its footer (no data read)."""
    _, pq = pyarrow_modules()
    return pq.ParquetFile(parquet).metadata.num_rows
