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
from pathlib import Path
from typing import Any

import numpy as np

from clothcli.backends.arrays import FEATURES_OUTPUT, METADATA_KEY, ExportedClassifier, validate_metadata
from clothcli.errors import UserError
from clothcli.formats import ONNX
from clothcli.io_utils import atomic_path
from clothcli.untrusted import parse_json

EXPORT_EXTRA = "pip install 'clothcli[export]'"


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


def check_external_data(path: Path) -> None:
    """A UserError when a tensor of the graph keeps its data in a file outside the model's folder (ONNX's
    external data names a file by a path the graph itself holds). Needs the `onnx` package, which the
    export extra installs beside ONNX Runtime; a file it cannot parse is left to ONNX Runtime to refuse.
    A graph whose bytes never spell the key `location` has no external data: it is passed without
    importing `onnx` (half a second of the start-up otherwise)."""
    with open(path, "rb") as handle:
        if b"location" not in handle.read():
            return
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


class OnnxClassifier(ExportedClassifier):
    """An exported model ready to classify: the ONNX Runtime session, its classes and preprocessing."""

    format = ONNX

    def __init__(self, path: str | Path, calibrated: bool = True, threads: int | None = None):
        self.source = Path(path)
        self.session = open_session(self.source, threads)
        self.meta = read_metadata(self.session, self.source)
        self._adopt(calibrated)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._threads = threads

    @property
    def threads(self) -> int:
        if self._threads:
            return self._threads
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    def infer(self, images: np.ndarray, features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        names = [self.output_names[0], FEATURES_OUTPUT] if features else self.output_names[:1]
        outputs = self.session.run(names, {self.input_name: images})
        return outputs[0], outputs[1] if features else None

    def store(self, **values: Any) -> None:
        meta = {**self.meta, **json.loads(json.dumps(values))}
        write_metadata(self.source, meta)
        self.meta = meta
