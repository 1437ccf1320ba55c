"""`clothcli export`: a checkpoint as an ONNX file or an OpenVINO IR that runs without PyTorch, verified;
optionally an int8 ONNX model.

The model is exported with batch norm folded (as `predict` runs it) through torch.onnx's dynamo
exporter, which handles the explicit "same" padding of timm's `tf_` models, with a dynamic batch
dimension and two outputs: the logits and the penultimate features. The checkpoint's metadata
(classes, preprocessing, temperature, rejection threshold, schema version) goes into the file's
metadata_props, so the .onnx file is all `predict` and `evaluate` need. Verification runs the ONNX
Runtime backend and the PyTorch backend on the same preprocessed images; a file that fails it is
not written. `--int8` adds ONNX Runtime's static QDQ quantization, calibrated on training images.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clothcli.backends import Classifier, load_classifier
from clothcli.backends.arrays import FEATURES_OUTPUT, METADATA_KEY, image_batches
from clothcli.backends.base import SCHEMA_VERSION
from clothcli.backends.onnx_runtime import EXPORT_EXTRA, OnnxClassifier
from clothcli.backends.openvino_runtime import OpenVinoClassifier, convert_onnx, import_openvino, publish
from clothcli.backends.pytorch import torch_module
from clothcli.data.preprocess import Preprocess
from clothcli.data.sources import available_splits
from clothcli.engines.evaluate import model_outputs, own_split, split_of
from clothcli.errors import UserError
from clothcli.formats import ONNX, OPENVINO, model_format
from clothcli.io_utils import atomic_path
from clothcli.models.loading import WithFeatures

# ONNX Runtime and PyTorch sum in different orders: fp32 logits of these models differ by ~1e-5.
DEFAULT_TOLERANCE = 1e-3  # per unit of the largest logit, see Verification.allowed_diff
META_FIELDS = (
    "arch", "classes", "preprocess", "temperature", "ood_threshold", "epoch", "metrics", "model_kwargs", "quantization",
    "schema_version",
)  # fmt: skip


@dataclass
class Verification:
    """ONNX Runtime against PyTorch on the same images."""

    images: int
    source: str  # the folder the images came from, or "generated"
    max_abs_diff: float  # largest absolute logit difference
    logit_scale: float  # largest absolute PyTorch logit
    top1_agreement: float
    # disagreements on images whose top two PyTorch logits are closer than the allowed difference
    near_ties: int
    tolerance: float

    @property
    def allowed_diff(self) -> float:
        """`tolerance` for logits up to 1 in size, relative to the largest logit beyond that (float32 rounding
        grows with the values summed)."""
        return self.tolerance * max(1.0, self.logit_scale)

    @property
    def passed(self) -> bool:
        disagreements = round((1.0 - self.top1_agreement) * self.images)
        return self.max_abs_diff <= self.allowed_diff and disagreements == self.near_ties


@dataclass
class Int8Result:
    """The quantized model beside the fp32 one, and both accuracies on the verification split."""

    path: str
    bytes: int
    calibration_images: int
    folder: str
    images: int
    fp32_accuracy: float
    int8_accuracy: float
    top1_agreement: float  # int8 against fp32


@dataclass
class ExportReport:
    path: str
    arch: str
    input_size: int
    opset: int
    bytes: int
    seconds: float
    verification: Verification
    int8: Int8Result | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["verification"]["passed"] = self.verification.passed
        return data


def _require_export_packages() -> None:
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            raise UserError(f"export needs {name}: {EXPORT_EXTRA}") from None


def _check_output(output: Path) -> None:
    if model_format(output) not in (ONNX, OPENVINO):
        raise UserError(f"the output must end in .onnx (ONNX Runtime) or .xml (OpenVINO), got '{output.name}'")
    if not output.parent.is_dir():
        raise UserError(f"output folder not found: {output.parent}")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence what the exporter and the quantizer print on stdout: the command renders its own report."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def _export_graph(model: torch.nn.Module, input_size: int, opset: int, path: Path, meta: dict[str, Any]) -> None:
    """The fp32 graph with a dynamic batch dimension and the checkpoint's metadata, written to `path`."""
    import onnx

    model = WithFeatures(model.to(memory_format=torch.contiguous_format))
    sample = torch.randn(2, 3, input_size, input_size)
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (sample,),
            str(path),
            dynamo=True,
            opset_version=opset,
            input_names=["image"],
            output_names=["logits", FEATURES_OUTPUT],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,
        )
    graph = onnx.load(str(path))
    _set_metadata(graph, meta)
    onnx.save(graph, str(path))


def _kept_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """What an exported file carries of the checkpoint's metadata."""
    return {k: meta[k] for k in META_FIELDS if k in meta} | {"schema_version": SCHEMA_VERSION}


def _set_metadata(graph: Any, meta: dict[str, Any]) -> None:
    kept = _kept_metadata(meta)
    del graph.metadata_props[:]
    entry = graph.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(kept)


def _labelled_images(classifier: Classifier, data: Path, split: str, limit: int, seed: int = 0) -> tuple[Path, list]:
    """Up to `limit` (path, target) samples of the `split` of `data` (`evaluate.split_of`), a fixed random
    subset when there are more."""
    index = split_of(classifier, data, split)
    folder, samples = index.directory, list(index.samples)
    if not samples:
        raise UserError(f"{folder}: no images")
    if len(samples) > limit:
        samples = sorted(random.Random(seed).sample(samples, limit))
    return folder, samples


def verify(
    reference: Classifier,
    exported: Classifier,
    samples: list | None,
    source: str,
    tolerance: float,
    batch_size: int = 32,
) -> Verification:
    """The exported model against the PyTorch backend on the samples' images (generated ones when `samples`
    is None), both fed the same preprocessed arrays."""
    preprocess = exported.preprocess
    if samples is None:
        generator = np.random.default_rng(0)
        raw = generator.integers(0, 256, (16, preprocess.input_size, preprocess.input_size, 3), dtype=np.uint8)
        batches = [preprocess.normalise(raw)]
    else:
        files = [p for p, _ in samples]
        batches = [b.images for b in image_batches(files, preprocess, batch_size, 2) if b.images is not None]
    outputs = [(reference.forward(images), exported.forward(images)) for images in batches]
    if not outputs:
        raise UserError(f"{source}: no readable images to verify the export on")
    expected = np.concatenate([r for r, _ in outputs])
    found = np.concatenate([o for _, o in outputs])
    check = Verification(
        images=len(expected),
        source=source,
        max_abs_diff=float(np.abs(expected - found).max()),
        logit_scale=float(np.abs(expected).max()),
        top1_agreement=float((expected.argmax(1) == found.argmax(1)).mean()),
        near_ties=0,
        tolerance=tolerance,
    )
    differ = expected.argmax(1) != found.argmax(1)
    rows = np.arange(len(expected))[differ]
    margins = expected[rows, expected.argmax(1)[differ]] - expected[rows, found.argmax(1)[differ]]
    check.near_ties = int((margins <= 2 * check.allowed_diff).sum())
    return check


class _CalibrationReader:
    """Feeds ONNX Runtime's static quantization batches of training images (its CalibrationDataReader)."""

    BATCH = 16

    def __init__(self, files: list[Path], preprocess: Preprocess, input_name: str):
        self.input_name = input_name
        self.batches = (b.images for b in image_batches(files, preprocess, self.BATCH, 2) if b.images is not None)
        self.shape: tuple[int, ...] | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch; one of another size than the first (the last, or one with unreadable files) is
        left out: the percentile calibrator stacks the batches' activations and needs one shape."""
        for images in self.batches:
            if self.shape is None or images.shape == self.shape:
                self.shape = images.shape
                return {self.input_name: images}
        return None


def quantize_int8(fp32_path: Path, int8_path: Path, calibration_files: list[Path], meta: dict[str, Any]) -> None:
    """Static QDQ quantization (int8 weights per channel, uint8 activations) calibrated on the files, with
    activation ranges set at the 99.999th percentile of what the calibration images produce."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = OnnxClassifier(fp32_path)
    scratch_dir = tempfile.TemporaryDirectory(dir=int8_path.parent, prefix=".int8-")
    with scratch_dir as scratch, atomic_path(int8_path) as target:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        reader = _CalibrationReader(calibration_files, model.preprocess, model.input_name)
        with _quiet():
            quantize_static(
                str(prepared),
                str(target),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                # the 99.999th percentile rather than the extremes: MinMax lost 2.9 points on MobileNetV3's validation
                calibrate_method=CalibrationMethod.Percentile,
            )
        graph = onnx.load(str(target))
        _set_metadata(graph, {**meta, "quantization": "int8 QDQ"})
        onnx.save(graph, str(target))


def _accuracy(path: Path, samples: list) -> tuple[float, np.ndarray]:
    """Top-1 accuracy of the .onnx model over labelled samples, and its predictions."""
    outputs = model_outputs(OnnxClassifier(path), [p for p, _ in samples])
    predicted = outputs.logits.argmax(1)
    targets = np.array([samples[i][1] for i in outputs.rows], dtype=np.int64)
    return float((predicted == targets).mean()) if len(targets) else 0.0, predicted


def int8_path_for(output: Path) -> Path:
    """Where `--int8` writes the quantized model: beside the fp32 one, as NAME.int8.onnx."""
    return output.with_name(output.stem + ".int8.onnx")


def export_onnx(
    *,
    checkpoint: str | Path,
    output: str | Path,
    opset: int = 18,
    verify_data: str | Path | None = None,
    verify_split: str = "validation",
    verify_images: int = 512,
    tolerance: float = DEFAULT_TOLERANCE,
    int8: bool = False,
    int8_data: str | Path | None = None,
    int8_images: int = 256,
) -> ExportReport:
    """Export, verify and (with `int8`) quantize the checkpoint at `checkpoint` to `output`.

    Nothing is written to `output` unless verification passes; the caller sees the failed
    verification in the report. With `int8`, the quantized model goes to `int8_path_for(output)`."""
    output = Path(output)
    _check_output(output)
    if int8 and int8_data is None:
        raise UserError("--int8 needs --int8-data DATA (a dataset folder whose train split calibrates it)")
    if int8 and model_format(output) != ONNX:
        raise UserError("--int8 writes ONNX Runtime's int8 model: export to a .onnx file for it")
    _require_export_packages()
    if model_format(output) == OPENVINO:
        import_openvino()
    start = time.perf_counter()
    loaded = load_classifier(checkpoint, device="cpu")
    model = torch_module(loaded)
    meta, preprocess = loaded.meta, loaded.preprocess
    samples, source = None, "generated"
    if verify_data is not None:
        folder, samples = _labelled_images(loaded, Path(verify_data), verify_split, verify_images)
        source = str(folder)
    try:
        checked = _write_verified(model, loaded, output, opset, samples, source, tolerance)
    except _Rejected as rejected:
        return ExportReport(str(output), loaded.arch, preprocess.input_size, opset, 0, 0.0, rejected.verification)
    report = ExportReport(
        str(output),
        loaded.arch,
        preprocess.input_size,
        opset,
        sum(p.stat().st_size for p in exported_files(output)),
        round(time.perf_counter() - start, 2),
        checked,
    )
    if int8:
        data = Path(int8_data)
        if samples is None:  # accuracy needs labelled images: the calibration dataset's validation split
            folder, samples = _labelled_images(loaded, data, verify_split, verify_images)
            source = str(folder)
        report.int8 = _int8(output, meta, loaded, data, samples, source, int8_images)
    return report


def exported_files(output: Path) -> list[Path]:
    """The files an export consists of: the .onnx, or the IR's .xml and .bin."""
    return [output, output.with_suffix(".bin")] if model_format(output) == OPENVINO else [output]


def _write_verified(
    model: torch.nn.Module, loaded: Classifier, output: Path, opset: int, samples: list | None, source: str,
    tolerance: float,
) -> Verification:  # fmt: skip
    """Write the export at `output` only once it verifies against the PyTorch backend (else _Rejected).
    An OpenVINO IR is converted from the ONNX graph, in a scratch folder beside the output."""
    size = loaded.preprocess.input_size
    if model_format(output) == ONNX:
        with atomic_path(output) as staged:
            _export_graph(model, size, opset, staged, loaded.meta)
            checked = verify(loaded, OnnxClassifier(staged), samples, source, tolerance)
            if not checked.passed:
                raise _Rejected(checked)
        return checked
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".export-") as scratch:
        graph, staged = Path(scratch) / "graph.onnx", Path(scratch) / output.name
        _export_graph(model, size, opset, graph, loaded.meta)
        convert_onnx(graph, staged, _kept_metadata(loaded.meta))
        checked = verify(loaded, OpenVinoClassifier(staged), samples, source, tolerance)
        if not checked.passed:
            raise _Rejected(checked)
        publish(staged, output)
    return checked


class _Rejected(Exception):
    """Verification failed: the staged file is dropped, `output` is left as it was."""

    def __init__(self, verification: Verification):
        self.verification = verification


def _int8(
    output: Path, meta: dict[str, Any], classifier: Classifier, data: Path, samples: list, folder: str, count: int
) -> Int8Result:
    if "train" not in available_splits(data, own_split(classifier, data)):
        raise UserError(f"{data}: no train split to calibrate int8 on")
    _, calibration = _labelled_images(classifier, data, "train", count, seed=1)
    quantized = int8_path_for(output)
    quantize_int8(output, quantized, [p for p, _ in calibration], meta)
    fp32_accuracy, fp32_preds = _accuracy(output, samples)
    int8_accuracy, int8_preds = _accuracy(quantized, samples)
    agreement = float((fp32_preds == int8_preds).mean()) if len(fp32_preds) else 0.0
    return Int8Result(
        str(quantized),
        quantized.stat().st_size,
        len(calibration),
        folder,
        len(samples),
        fp32_accuracy,
        int8_accuracy,
        agreement,
    )
