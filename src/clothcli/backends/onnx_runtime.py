"""The ONNX Runtime backend: an exported .onnx file, run without importing PyTorch, timm or torchvision.

`clothcli export` writes the class names, the preprocessing and the calibration into the file's
metadata, so the .onnx file is all this backend needs. Preprocessing is `data.preprocess` in PIL
and NumPy: within a level or two of 255 of the PyTorch backend's resize, which runs on tensors.
Images are decoded in a thread pool (PIL releases the GIL while it decodes and resizes) while ONNX
Runtime runs the batch before. The graph's second output, when the file has one, is the
penultimate features.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clothcli.backends.base import Classifier, OutputBatch
from clothcli.data.images import ImageReadError
from clothcli.data.preprocess import Preprocess
from clothcli.errors import UserError
from clothcli.formats import ONNX
from clothcli.io_utils import atomic_path
from clothcli.names import check_class_names
from clothcli.untrusted import parse_json

EXPORT_EXTRA = "pip install 'clothcli[export]'"
METADATA_KEY = "clothcli"  # the checkpoint's meta as JSON, in the model's metadata_props
FEATURES_OUTPUT = "features"


def import_onnxruntime() -> Any:
    """onnxruntime, or one line naming the extra that installs it."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"running an .onnx model needs ONNX Runtime: {EXPORT_EXTRA}") from None
    return onnxruntime


def read_metadata(session: Any, path: Path) -> dict[str, Any]:
    """The clothcli metadata an exported model carries; a UserError for other .onnx files."""
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if not text:
        raise UserError(f"{path}: no class names inside; export it with `clothcli export`")
    return validate_metadata(parse_json(text, path), path)


def validate_metadata(meta: Any, path: Path) -> dict[str, Any]:
    """An export's clothcli metadata when it holds a valid class list and preprocessing; else one line."""
    try:
        Preprocess.from_dict(meta["preprocess"])
        classes = check_class_names(meta["classes"], str(path))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: its clothcli metadata is not readable (classes and preprocess)") from None
    return {**meta, "classes": classes}


def check_external_data(path: Path) -> None:
    """A UserError when a tensor of the graph keeps its data in a file outside the model's folder (ONNX's
    external data names a file by a path the graph itself holds). Needs the `onnx` package, which the
    export extra installs beside ONNX Runtime; a file it cannot parse is left to ONNX Runtime to refuse."""
    try:
        import onnx
        from onnx.external_data_helper import _get_all_tensors

        graph = onnx.load(str(path), load_external_data=False)
    except Exception:  # not installed, or not a protobuf: ONNX Runtime says so in its own words
        return
    folder = path.parent.resolve()
    for tensor in _get_all_tensors(graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        if not (folder / location).resolve().is_relative_to(folder):
            raise UserError(
                f"{path}: tensor '{tensor.name}' reads its data from '{location}', outside the model's folder"
            )


def open_session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for the file at `path`; one line when it is missing or not ONNX."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model not found: {path}")
    ort = import_onnxruntime()
    check_external_data(path)
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


def write_metadata(path: Path, meta: dict[str, Any]) -> None:
    """Replace the clothcli entry of the .onnx file's metadata_props, writing the file anew atomically
    (the `onnx` package; the graph and its weights are copied as they are)."""
    try:
        import onnx
    except ImportError:
        raise UserError(f"writing an .onnx file's metadata needs onnx: {EXPORT_EXTRA}") from None
    graph = onnx.load(str(path), load_external_data=False)
    kept = [entry for entry in graph.metadata_props if entry.key != METADATA_KEY]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    entry = graph.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    with atomic_path(path) as staged:
        onnx.save(graph, str(staged))


class OnnxClassifier(Classifier):
    """An exported model ready to classify: the ONNX Runtime session, its classes and preprocessing."""

    format = ONNX

    def __init__(self, path: str | Path, calibrated: bool = True, threads: int | None = None):
        self.source = Path(path)
        self.session = open_session(self.source, threads)
        self.meta = read_metadata(self.session, self.source)
        self.classes = self.meta["classes"]
        self.preprocess = Preprocess.from_dict(self.meta["preprocess"])
        self.arch = str(self.meta.get("arch", "?"))
        self.temperature = self.stored_temperature if calibrated else 1.0
        threshold = self.meta.get("ood_threshold")
        self.ood_threshold = None if threshold is None else float(threshold)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._threads = threads

    @property
    def threads(self) -> int:
        if self._threads:
            return self._threads
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    @property
    def has_features(self) -> bool:
        return FEATURES_OUTPUT in self.output_names

    def forward(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(self.output_names[:1], {self.input_name: images})[0]

    def _forward_with_features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = self.session.run([self.output_names[0], FEATURES_OUTPUT], {self.input_name: images})
        return logits, features

    def run(
        self, files: list[Path], batch_size: int = 64, workers: int = 2, flip: bool = False, features: bool = False
    ) -> Iterator[OutputBatch]:
        if features and not self.has_features:
            raise UserError(f"{self.source}: this export has no features output; export it again with clothcli export")
        k = len(self.classes)
        for batch in image_batches(files, self.preprocess, batch_size, workers):
            rows = [batch.indices[pos] for pos in batch.readable]
            out = OutputBatch(batch.indices, rows, np.zeros((0, k), dtype=np.float32), batch.errors)
            if batch.images is not None:
                if features:
                    out.logits, out.features = self._forward_with_features(batch.images)
                else:
                    out.logits = self.forward(batch.images)
                if flip:
                    out.flipped_logits = self.forward(np.ascontiguousarray(batch.images[..., ::-1]))
            yield out

    def store(self, **values: Any) -> None:
        meta = {**self.meta, **json.loads(json.dumps(values))}
        write_metadata(self.source, meta)
        self.meta = meta


def _read_into(preprocess: Preprocess, path: Path, row: np.ndarray) -> str:
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
    files: list[Path], preprocess: Preprocess, batch_size: int, workers: int
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
