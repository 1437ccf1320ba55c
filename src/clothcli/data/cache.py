"""Decode each image once per run, not once per epoch.

Images are decoded, made upright RGB and resized (`ResizeShortSide`, exactly as evaluation does)
so the short side is `floor(input_size / crop_pct)` (about 1.14x the input), then stored as
uint8 in one flat file. Training crops and augments those uint8 tensors with
torchvision.transforms.v2; evaluation only centre-crops them, so its outputs equal the
decode-every-time path. The file is keyed by the images' content and the target size, built in
parallel, reused by later runs, and loaded into memory when it fits or memory-mapped when not.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clothcli.data.images import ImageReadError, load_rgb, read_image_bytes, read_info
from clothcli.data.loading import ResizeShortSide
from clothcli.io_utils import atomic_path, user_cache_dir

CACHE_VERSION = 2  # 2: resized with torch's uint8 kernel (ResizeShortSide), no longer PIL


def default_cache_dir() -> Path:
    return user_cache_dir() / "decoded"


@dataclass
class CacheBudget:
    """Whether a new decode cache fits the disk budget of its folder, and what makes room for it."""

    needed: int  # bytes, estimated from a sample of the images' headers
    budget: int  # bytes the folder's caches may take together
    explicit: bool  # from data.cache_max_gb, not the free-space default
    evict: list[Path]  # older caches to delete (least recently used first) so that it fits
    fits: bool

    def describe(self) -> str:
        limit = f"data.cache_max_gb {self.budget / 1e9:g}" if self.explicit else "half the free disk space"
        return f"the decode cache would take about {self.needed / 1e9:.1f} GB, past {limit}"


def estimate_bytes(paths: Sequence[Path], short_side: int, sample: int = 256) -> int:
    """The decoded size of `paths` at `short_side`, from the header sizes of an even sample of them."""
    if not paths:
        return 0
    step = max(1, len(paths) // sample)
    ratios = []
    for path in paths[::step][:sample]:
        try:
            info = read_info(path)
        except (ImageReadError, OSError):
            continue
        if info.width and info.height:
            ratios.append(max(info.width, info.height) / min(info.width, info.height))
    mean_ratio = float(np.mean(ratios)) if ratios else 1.0
    return int(len(paths) * short_side * short_side * mean_ratio * 3)


def cache_entries(directory: Path) -> list[tuple[Path, Path]]:
    """The caches in `directory` (data file, index), least recently used (by the index's time) first."""
    entries = [(data, data.with_suffix(".json")) for data in directory.glob("*.u8")]

    def last_used(entry: tuple[Path, Path]) -> float:
        return (entry[1] if entry[1].exists() else entry[0]).stat().st_mtime

    return sorted(entries, key=last_used)


def plan_budget(paths: Sequence[Path], short_side: int, directory: Path, max_gb: float | None) -> CacheBudget:
    """Room for a new cache of `paths`: the least recently used caches of the folder are given up first;
    past the budget even with the folder emptied, it does not fit."""
    needed = estimate_bytes(paths, short_side)
    free = shutil.disk_usage(directory).free
    entries = cache_entries(directory)
    held = sum(data.stat().st_size for data, _ in entries)
    budget = int(max_gb * 1e9) if max_gb is not None else (free + held) // 2
    evict, total = [], held + needed
    for data, _ in entries:
        if total <= budget:
            break
        evict.append(data)
        total -= data.stat().st_size
    fits = total <= budget and needed < free
    return CacheBudget(needed, budget, max_gb is not None, evict if fits else [], fits)


def decode_resized(path: Path, short_side: int, interpolation: str) -> np.ndarray:
    """Upright RGB, short side resized to `short_side` as evaluation resizes it (HWC uint8)."""
    resized = ResizeShortSide(short_side, interpolation)(load_rgb(path, min_size=short_side))
    return resized.permute(1, 2, 0).contiguous().numpy()


def _decode_job(args: tuple[str, int, str]) -> tuple[np.ndarray | None, str]:
    path, short_side, interpolation = args
    try:
        return decode_resized(Path(path), short_side, interpolation), ""
    except ImageReadError as exc:
        return None, str(exc)


def content_key(paths: Sequence[Path], short_side: int, interpolation: str) -> str:
    """Hash of every file's bytes (in order) and the decode settings."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}:{short_side}:{interpolation}:{len(paths)}".encode())
    for path in paths:
        try:
            data = read_image_bytes(path)
        except (OSError, ImageReadError):
            data = b"<unreadable>"
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()[:32]


@dataclass
class DecodedImages:
    """uint8 CHW tensors by index; `errors[i]` holds the reason an image could not be decoded."""

    buffer: np.ndarray
    offsets: np.ndarray
    shapes: np.ndarray
    errors: dict[int, str]
    path: Path
    in_memory: bool

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)

    def __getstate__(self) -> dict:
        # DataLoader workers started by spawn/forkserver (macOS, Python >= 3.14, or any process that is
        # itself spawned) get the object pickled: send the cache file's name, not a copy of every image
        # (570 MB per worker per epoch made such workers 7x slower in the training benchmark). A memory map
        # is no exception: numpy pickles np.memmap as an ordinary array, every byte of it.
        state = self.__dict__.copy()
        state["buffer"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.buffer is None:
            self.buffer = _map(self.path)

    def get(self, index: int) -> torch.Tensor | None:
        if index in self.errors:
            return None
        h, w = (int(v) for v in self.shapes[index])
        start = int(self.offsets[index])
        hwc = np.asarray(self.buffer[start : start + h * w * 3]).reshape(h, w, 3)
        return torch.from_numpy(np.array(hwc)).permute(2, 0, 1)


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def _map(path: Path) -> np.ndarray:
    """The cache file as a read-only memory map (an empty array for an empty file, which mmap refuses)."""
    return np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)


def build_or_open(
    paths: Sequence[Path],
    short_side: int,
    interpolation: str = "bilinear",
    cache_dir: str | Path | None = None,
    mode: str = "auto",
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
    max_gb: float | None = None,
) -> DecodedImages | CacheBudget:
    """The decoded images of `paths`, from the cache file if one matches, else built now (the least recently
    used caches of the folder deleted first when the budget asks: `plan_budget`); None when a new cache
    does not fit the budget even then."""
    directory = Path(cache_dir) if cache_dir else default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    key = content_key(paths, short_side, interpolation)
    data_path = directory / f"{key}.u8"
    index_path = directory / f"{key}.json"
    if not (data_path.is_file() and index_path.is_file()):
        room = plan_budget(paths, short_side, directory, max_gb)
        if not room.fits:
            return room
        for old in room.evict:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
        _build(paths, short_side, interpolation, data_path, index_path, workers, progress)
    os.utime(index_path)  # used now (its index's time, the data file's stays its build time): given up last
    index = json.loads(index_path.read_text())
    offsets = np.array(index["offsets"], dtype=np.int64)
    shapes = np.array(index["shapes"], dtype=np.int64).reshape(-1, 2)
    size = data_path.stat().st_size
    in_memory = mode == "memory" or (mode == "auto" and size < _available_memory() // 4)
    buffer = np.fromfile(data_path, dtype=np.uint8) if in_memory else _map(data_path)
    errors = {int(k): v for k, v in index["errors"].items()}
    return DecodedImages(buffer, offsets, shapes, errors, data_path, in_memory)


def _build(
    paths: Sequence[Path],
    short_side: int,
    interpolation: str,
    data_path: Path,
    index_path: Path,
    workers: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    offsets, shapes, errors = [], [], {}
    jobs = [(str(p), short_side, interpolation) for p in paths]
    position = 0
    with atomic_path(data_path) as tmp, open(tmp, "wb") as out:
        if workers > 1:
            # One thread per decoding process: `workers` of them already share the cores, and forked
            # children that ask GNU OpenMP for several threads can deadlock once the parent used it.
            pool = ProcessPoolExecutor(max_workers=workers, initializer=torch.set_num_threads, initargs=(1,))
            results = pool.map(_decode_job, jobs, chunksize=16)
        else:
            pool = None
            results = map(_decode_job, jobs)
        try:
            for i, (array, error) in enumerate(results):
                offsets.append(position)
                if array is None:
                    shapes.append((0, 0))
                    errors[i] = error
                else:
                    shapes.append(array.shape[:2])
                    out.write(array.tobytes())
                    position += array.nbytes
                if progress:
                    progress(i + 1, len(jobs))
        finally:
            if pool is not None:
                pool.shutdown()
        out.flush()
    with atomic_path(index_path) as tmp:
        tmp.write_text(
            json.dumps(
                {
                    "offsets": offsets,
                    "shapes": [list(s) for s in shapes],
                    "errors": {str(k): v for k, v in errors.items()},
                }
            )
        )
