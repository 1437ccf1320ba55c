"""What every exported format shares: images decoded into NumPy batches, and one `run` over them.

Exported models run without PyTorch, so they decode with PIL and NumPy (`data.preprocess`) in a
thread pool (PIL releases the GIL while it decodes and resizes), two batches ahead of the model.
A backend of this kind implements `infer` (logits, and the penultimate features when asked) and
inherits the rest of the `Classifier` interface's work from `ExportedClassifier`.
"""

from __future__ import annotations

from abc import abstractmethod
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clothcli.backends.base import Classifier, OutputBatch
from clothcli.data.images import ImageReadError
from clothcli.data.preprocess import Preprocess
from clothcli.errors import UserError
from clothcli.names import check_class_names

METADATA_KEY = "clothcli"  # the checkpoint's meta as JSON, inside the exported file
FEATURES_OUTPUT = "features"  # the graph's second output: the penultimate features


def validate_metadata(meta: Any, path: Path) -> dict[str, Any]:
    """An export's clothcli metadata when it holds a valid class list and preprocessing; else one line."""
    try:
        Preprocess.from_dict(meta["preprocess"])
        classes = check_class_names(meta["classes"], str(path))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: its clothcli metadata is not readable (classes and preprocess)") from None
    return {**meta, "classes": classes}


class ExportedClassifier(Classifier):
    """An exported model: decoding here, the graph in a runtime (`infer`)."""

    output_names: list[str]
    # True where the runtime normalises inside its graph: `run` then hands it the uint8 NHWC crops
    # (`infer_pixels`), and the decoding threads write a quarter of the bytes and skip the arithmetic.
    feeds_pixels = False

    def _adopt(self, calibrated: bool) -> None:
        """Classes, preprocessing, architecture and calibration from `self.meta`, the file's metadata."""
        self.classes = self.meta["classes"]
        self.preprocess = Preprocess.from_dict(self.meta["preprocess"])
        self.arch = str(self.meta.get("arch", "?"))
        self.temperature = self.stored_temperature if calibrated else 1.0
        threshold = self.meta.get("ood_threshold")
        self.ood_threshold = None if threshold is None else float(threshold)

    @abstractmethod
    def infer(self, images: np.ndarray, features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits of a preprocessed float32 NCHW batch, and its features when asked."""

    def infer_pixels(self, pixels: np.ndarray, features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """`infer` on a uint8 NHWC batch of crops; runtimes that normalise in their graph override it."""
        return self.infer(self.preprocess.normalise(pixels), features)

    @property
    def has_features(self) -> bool:
        return FEATURES_OUTPUT in self.output_names

    def forward(self, images: np.ndarray) -> np.ndarray:
        return self.infer(images)[0]

    def prepare(self, image: Image.Image) -> np.ndarray:
        return self.preprocess.normalise(self.preprocess.crop(image)[None])[0]

    def run(
        self, files: list[Path], batch_size: int = 64, workers: int = 2, flip: bool = False, features: bool = False
    ) -> Iterator[OutputBatch]:
        if features and not self.has_features:
            raise UserError(f"{self.source}: this export has no features output; export it again with clothcli export")
        k = len(self.classes)
        pixels = self.feeds_pixels
        infer = self.infer_pixels if pixels else self.infer
        for batch in image_batches(files, self.preprocess, batch_size, workers, pixels=pixels):
            rows = [batch.indices[pos] for pos in batch.readable]
            out = OutputBatch(batch.indices, rows, np.zeros((0, k), dtype=np.float32), batch.errors)
            if batch.images is not None:
                out.logits, out.features = infer(batch.images, features)
                if flip:
                    mirrored = batch.images[:, :, ::-1] if pixels else batch.images[..., ::-1]
                    out.flipped_logits = infer(np.ascontiguousarray(mirrored))[0]
            yield out


def _read_into(preprocess: Preprocess, path: Path, row: np.ndarray) -> str:
    """Write the image at `path` into `row` (in a pool thread): normalised CHW float32, or the uint8 HWC
    crop for a row of that type; why it cannot be read, or ""."""
    try:
        if row.dtype == np.uint8:
            row[...] = preprocess.load(path)
        else:
            preprocess.normalise(preprocess.load(path)[None], out=row[None])
        return ""
    except ImageReadError as exc:
        return str(exc)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


@dataclass
class ImageBatch:
    """One batch of files: the normalised images that could be read, and why the others could not."""

    indices: list[int]  # into the file list, in order
    images: np.ndarray | None  # float32 NCHW (uint8 NHWC crops when asked) for the readable files
    readable: list[int]  # the positions in `indices` of the images' rows
    errors: dict[int, str]  # file index -> reason


def image_batches(
    files: list[Path], preprocess: Preprocess, batch_size: int, workers: int, pixels: bool = False
) -> Iterator[ImageBatch]:
    """`files` decoded and preprocessed in batches, in order; with `workers`, two batches ahead in threads.

    Each image is normalised straight into its row of the batch's array; with `pixels`, its uint8 crop is
    copied there unnormalised (NHWC), for a runtime that normalises inside its graph."""
    chunks = [list(range(start, min(start + batch_size, len(files)))) for start in range(0, len(files), batch_size)]
    side = preprocess.input_size

    def allocate(chunk: list[int]) -> np.ndarray:
        if pixels:
            return np.empty((len(chunk), side, side, 3), dtype=np.uint8)
        return np.empty((len(chunk), 3, side, side), dtype=np.float32)

    def assemble(chunk: list[int], array: np.ndarray, reasons: list[str]) -> ImageBatch:
        readable = [pos for pos, reason in enumerate(reasons) if not reason]
        images = (array if len(readable) == len(chunk) else array[readable]) if readable else None
        errors = {chunk[pos]: reason for pos, reason in enumerate(reasons) if reason}
        return ImageBatch(chunk, images, readable, errors)

    if workers == 0:
        for chunk in chunks:
            array = allocate(chunk)
            reasons = [_read_into(preprocess, files[i], array[pos]) for pos, i in enumerate(chunk)]
            yield assemble(chunk, array, reasons)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[tuple[list[int], np.ndarray, list[Future]]] = deque()
        upcoming = iter(chunks)

        def submit() -> None:
            chunk = next(upcoming, None)
            if chunk is not None:
                array = allocate(chunk)
                futures = [pool.submit(_read_into, preprocess, files[i], array[pos]) for pos, i in enumerate(chunk)]
                pending.append((chunk, array, futures))

        submit()
        submit()
        while pending:
            chunk, array, futures = pending.popleft()
            submit()
            yield assemble(chunk, array, [f.result() for f in futures])
