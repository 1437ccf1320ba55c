"""The OpenVINO backend: an exported IR (`model.xml` beside its `model.bin`), run without PyTorch.

`clothcli export -o model.xml` writes the class names, the preprocessing and the calibration into
the IR's runtime info, so the two files are all this backend needs. Decoding is the ONNX Runtime
backend's (PIL and NumPy in a thread pool). OpenVINO's CPU plugin runs in bf16 by default on CPUs
with AVX512-BF16 or AMX: this backend asks for f32 unless told `precision="bf16"`, so an fp32 export
computes what PyTorch computes.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from clothcli.backends.arrays import FEATURES_OUTPUT, METADATA_KEY, ExportedClassifier, validate_metadata
from clothcli.errors import UserError
from clothcli.formats import OPENVINO
from clothcli.untrusted import parse_json

OPENVINO_EXTRA = "pip install 'clothcli[openvino]'"
PRECISIONS = {"f32": "f32", "bf16": "bf16"}


def import_openvino() -> Any:
    """openvino, or one line naming the extra that installs it."""
    try:
        import openvino
    except ImportError:
        raise UserError(f"running an OpenVINO model needs OpenVINO: {OPENVINO_EXTRA}") from None
    return openvino


@functools.cache
def core() -> Any:
    """The process's one OpenVINO Core, alive until exit: models compiled from a Core that was destroyed
    first crashed the process later (a segfault when their objects were collected)."""
    return import_openvino().Core()


def read_model(path: Path) -> Any:
    """The IR at `path` (its weights in the .bin of the same name), or one line saying why not."""
    if not path.is_file():
        raise UserError(f"model not found: {path}")
    weights = path.with_suffix(".bin")
    if not weights.is_file():
        raise UserError(f"{path}: its weights file {weights.name} is missing beside it")
    try:
        return core().read_model(str(path), str(weights))
    except Exception as exc:  # OpenVINO raises RuntimeError with its own text
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{path}: not a readable OpenVINO model ({reason})") from None


def model_metadata(model: Any, path: Path) -> dict[str, Any]:
    if not model.has_rt_info([METADATA_KEY]):
        raise UserError(f"{path}: no class names inside; export it with `clothcli export`")
    return validate_metadata(parse_json(model.get_rt_info([METADATA_KEY]).astype(str), path), path)


def publish(staged: Path, path: Path) -> None:
    """Move a written IR into place: the .bin first, then the .xml whose weights it holds."""
    os.replace(staged.with_suffix(".bin"), path.with_suffix(".bin"))
    os.replace(staged, path)


def save_model(model: Any, path: Path) -> None:
    """The IR written beside `path` and moved into place."""
    ov = import_openvino()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".openvino-") as scratch:
        staged = Path(scratch) / path.name
        ov.save_model(model, str(staged), compress_to_fp16=False)
        publish(staged, path)


class OpenVinoClassifier(ExportedClassifier):
    """An OpenVINO IR compiled for the CPU, ready to classify. `run` feeds it uint8 crops: the scaling and
    normalisation run inside the graph (OpenVINO's preprocessing API), not in the decoding threads."""

    format = OPENVINO
    feeds_pixels = True

    def __init__(self, path: str | Path, calibrated: bool = True, threads: int | None = None, precision: str = "f32"):
        if precision not in PRECISIONS:
            raise UserError(f"OpenVINO precision must be f32 or bf16, got '{precision}'")
        self.source = Path(path)
        self.model = read_model(self.source)
        self.meta = model_metadata(self.model, self.source)
        self._adopt(calibrated)
        self.precision = precision
        config = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision]}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self._config = config
        self.output_names = [next(iter(sorted(o.get_names())), f"output{i}") for i, o in enumerate(self.model.outputs)]
        self._threads = threads
        self.pixel_graph = self._compile_pixel_graph()  # now: an IR the CPU plugin cannot run fails as it loads

    @functools.cached_property
    def compiled(self) -> Any:
        """The model as the file holds it, float32 NCHW in: compiled when first used (by export's
        verification, timings or calibration), as `predict` and `evaluate` run `pixel_graph` alone."""
        return core().compile_model(self.model, "CPU", self._config)

    @property
    def quantization(self) -> str:
        base = str(self.meta.get("quantization") or "")
        return base if self.precision == "f32" else (base + " " if base else "") + self.precision

    @property
    def threads(self) -> int:
        return self._threads or int(self.pixel_graph.get_property("INFERENCE_NUM_THREADS"))

    def infer(self, images: np.ndarray, features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        return self._run_graph(self.compiled, images, features)

    def _compile_pixel_graph(self) -> Any:
        """The model compiled behind its normalisation: uint8 NHWC crops in, as `run` decodes them. The same
        arithmetic as `Preprocess.normalise`, ahead of the first convolution and its padding."""
        from openvino.preprocess import PrePostProcessor

        ov = import_openvino()
        steps = PrePostProcessor(self.model.clone())
        steps.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
        steps.input().model().set_layout(ov.Layout("NCHW"))
        normalise = steps.input().preprocess().convert_element_type(ov.Type.f32)
        normalise.mean([255.0 * m for m in self.preprocess.mean]).scale([255.0 * s for s in self.preprocess.std])
        return core().compile_model(steps.build(), "CPU", self._config)

    def infer_pixels(self, pixels: np.ndarray, features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        return self._run_graph(self.pixel_graph, pixels, features)

    def _run_graph(self, graph: Any, batch: np.ndarray, features: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits (and features) of one compiled graph on `batch`."""
        results = graph(batch)
        outputs = [np.asarray(results[output]) for output in graph.outputs]
        return outputs[0], outputs[self.output_names.index(FEATURES_OUTPUT)] if features else None

    def store(self, **values: Any) -> None:
        meta = {**self.meta, **json.loads(json.dumps(values))}
        model = read_model(self.source)
        model.set_rt_info(json.dumps(meta), [METADATA_KEY])
        save_model(model, self.source)
        self.meta = meta


def convert_onnx(onnx_path: Path, staged: Path, meta: dict[str, Any]) -> None:
    """Write at `staged` the IR of an exported .onnx file (its graph as it is), `meta` in its runtime info."""
    ov = import_openvino()
    model = ov.convert_model(str(onnx_path))
    model.set_rt_info(json.dumps(meta), [METADATA_KEY])
    ov.save_model(model, str(staged), compress_to_fp16=False)
