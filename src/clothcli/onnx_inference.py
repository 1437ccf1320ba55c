"""Running an exported .onnx model on ONNX Runtime, without importing PyTorch, timm or torchvision.

`clothcli export` writes the class names, the preprocessing and the calibration into the file's
metadata, so the .onnx file is all `predict` and `evaluate` need. Preprocessing is PIL plus NumPy
and reproduces the evaluation transform of `data.loading` (resize the short side to
input_size / crop_pct, centre crop, scale to [0, 1], normalise): within a level or two of 255 of the
PyTorch path's resize, which runs on tensors. Images are decoded in a thread pool (PIL releases the
GIL while it decodes and resizes) while ONNX Runtime runs the batch before.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clothcli.data.images import ImageReadError, load_rgb
from clothcli.errors import UserError
from clothcli.numpy_metrics import softmax

EXPORT_EXTRA = "pip install 'clothcli[export]'"
METADATA_KEY = "clothcli"  # the checkpoint's meta as JSON, in the model's metadata_props
RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def import_onnxruntime() -> Any:
    """onnxruntime, or one line naming the extra that installs it."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"running an .onnx model needs ONNX Runtime: {EXPORT_EXTRA}") from None
    return onnxruntime


@dataclass
class ImagePreprocess:
    """The evaluation transform in PIL and NumPy: decode, resize the short side, centre crop, normalise."""

    input_size: int
    interpolation: str
    mean: np.ndarray
    std: np.ndarray
    crop_pct: float

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImagePreprocess:
        return cls(
            int(data["input_size"]),
            str(data["interpolation"]),
            np.asarray(data["mean"], dtype=np.float32),
            np.asarray(data["std"], dtype=np.float32),
            float(data["crop_pct"]),
        )

    @property
    def scale_size(self) -> int:
        """The short side before the centre crop (`data.loading.scale_size`)."""
        return math.floor(self.input_size / self.crop_pct)

    def crop(self, image: Image.Image) -> np.ndarray:
        """An RGB image -> the uint8 HWC centre crop the model sees (torchvision's Resize and CenterCrop sizes).

        Only the source region that survives the crop is resampled (PIL's `box`, whose filter still reads
        the pixels around it): the same image as resizing it all and cropping, within one level, in 60%
        of the time for a portrait photo."""
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.scale_size, int(self.scale_size * long / short)
        new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
        side = self.input_size
        top, left = round((new_height - side) / 2.0), round((new_width - side) / 2.0)
        sx, sy = width / new_width, height / new_height
        box = (left * sx, top * sy, (left + side) * sx, (top + side) * sy)
        resample = RESAMPLING.get(self.interpolation, Image.Resampling.BICUBIC)
        return np.asarray(image.resize((side, side), resample, box=box), dtype=np.uint8)

    def load(self, path: str | Path) -> np.ndarray:
        """The uint8 HWC crop of the file at `path`; ImageReadError when it cannot be decoded."""
        return self.crop(load_rgb(path, min_size=math.ceil(self.input_size / self.crop_pct)))

    def normalise(self, batch: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 NHWC -> float32 NCHW, scaled to [0, 1] and normalised with the model's mean and std,
        into `out` when given (a slice of the batch being assembled: no copy afterwards).

        One multiply and one add per channel, in place: (x / 255 - mean) / std = x * a + b."""
        planes = batch.transpose(0, 3, 1, 2)
        out = np.empty(planes.shape, dtype=np.float32) if out is None else out
        scale = (1.0 / (255.0 * self.std)).astype(np.float32)
        shift = (-self.mean / self.std).astype(np.float32)
        for c in range(3):
            np.multiply(planes[:, c], scale[c], out=out[:, c], dtype=np.float32)
            out[:, c] += shift[c]
        return out


@dataclass
class OnnxClassifier:
    """An exported model ready to classify: the ONNX Runtime session, its classes and preprocessing."""

    session: Any
    input_name: str
    classes: list[str]
    preprocess: ImagePreprocess
    arch: str
    path: Path
    meta: dict[str, Any]
    temperature: float = 1.0

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits of a normalised float32 NCHW batch."""
        return self.session.run(None, {self.input_name: batch})[0]


def read_metadata(session: Any, path: Path) -> dict[str, Any]:
    """The clothcli metadata an exported model carries; a UserError for other .onnx files."""
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if not text:
        raise UserError(f"{path}: no class names inside; export it with `clothcli export`")
    return json.loads(text)


def open_session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for the file at `path`; one line when it is missing or not ONNX."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model not found: {path}")
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # idle threads sleep instead of spinning, leaving the cores to the threads that decode the next batch
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, ...)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: not a readable ONNX model ({reason[:200]})") from None


def load_onnx(path: str | Path, calibrated: bool = True, threads: int | None = None) -> OnnxClassifier:
    """The exported model at `path`, with the temperature of `clothcli calibrate` unless not `calibrated`."""
    session = open_session(path, threads)
    meta = read_metadata(session, Path(path))
    return OnnxClassifier(
        session=session,
        input_name=session.get_inputs()[0].name,
        classes=list(meta["classes"]),
        preprocess=ImagePreprocess.from_dict(meta["preprocess"]),
        arch=str(meta.get("arch", "?")),
        path=Path(path),
        meta=meta,
        temperature=float(meta.get("temperature") or 1.0) if calibrated else 1.0,
    )


def _read_into(preprocess: ImagePreprocess, path: Path, row: np.ndarray) -> str:
    """Write the normalised CHW image at `path` into `row` (in a pool thread); why it cannot be read, or ""."""
    try:
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
    images: np.ndarray | None  # float32 NCHW for the readable files
    readable: list[int]  # the positions in `indices` of the images' rows
    errors: dict[int, str]  # file index -> reason


def image_batches(
    files: list[Path], preprocess: ImagePreprocess, batch_size: int, workers: int
) -> Iterator[ImageBatch]:
    """`files` decoded and preprocessed in batches, in order; with `workers`, two batches ahead in threads.

    Each image is normalised straight into its row of the batch's array."""
    chunks = [list(range(start, min(start + batch_size, len(files)))) for start in range(0, len(files), batch_size)]
    side = preprocess.input_size

    def allocate(chunk: list[int]) -> np.ndarray:
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


def batch_probabilities(
    model: OnnxClassifier, batch: ImageBatch, tta_flip: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """The batch's probabilities (softmax of logits / temperature; averaged with the mirrored image's
    under `tta_flip`) and its logits, for the readable images."""
    if batch.images is None:
        empty = np.zeros((0, len(model.classes)), dtype=np.float32)
        return empty, empty
    logits = model.logits(batch.images)
    probs = softmax(logits.astype(np.float64) / model.temperature)
    if tta_flip:
        mirrored = model.logits(np.ascontiguousarray(batch.images[..., ::-1]))
        probs = (probs + softmax(mirrored.astype(np.float64) / model.temperature)) / 2
    return probs, logits


def predict_files_onnx(
    path: str | Path,
    files: list[Path],
    batch_size: int = 64,
    workers: int = 2,
    top_k: int = 1,
    min_confidence: float | str = 0.0,
    calibrated: bool = True,
) -> Iterator[Any]:
    """One `predict.Prediction` per file, in the order of `files`, from the exported model at `path`."""
    from clothcli.predict import Prediction, label_row, resolve_min_confidence

    model = load_onnx(path, calibrated)
    threshold = resolve_min_confidence(min_confidence, model.meta, model.temperature, model.path)
    top_k = min(top_k, len(model.classes))
    for batch in image_batches(files, model.preprocess, batch_size, workers):
        probs, _ = batch_probabilities(model, batch)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
        rows = dict(zip(batch.readable, range(len(batch.readable))))
        for pos, index in enumerate(batch.indices):
            if index in batch.errors:
                yield Prediction(files[index], [], [], batch.errors[index])
                continue
            row = rows[pos]
            top = order[row].tolist()
            values = [float(probs[row, i]) for i in top]
            yield Prediction(files[index], label_row(values, top, model.classes, threshold), values)
