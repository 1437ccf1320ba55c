"""`clothcli export`: a checkpoint as an ONNX file or an OpenVINO IR that runs without PyTorch, verified;
optionally an int8 model beside it.

The model is exported with batch norm folded (as `predict` runs it) through torch.onnx's dynamo
exporter, which handles the explicit "same" padding of timm's `tf_` models, with a dynamic batch
dimension and two outputs: the logits and the penultimate features. The checkpoint's metadata
(classes, preprocessing, temperature, rejection threshold, schema version) goes into the file's
metadata_props, so the .onnx file is all `predict` and `evaluate` need. Verification runs the ONNX
Runtime backend and the PyTorch backend on the same preprocessed images; a file that fails it is
not written. `--int8` adds an int8 model calibrated on training images (`engines.quantize`): ONNX
Runtime's static QDQ quantization for .onnx, NNCF's for an OpenVINO IR.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clothcli.backends import Classifier, load_classifier
from clothcli.backends.arrays import FEATURES_OUTPUT, METADATA_KEY, image_batches
from clothcli.backends.base import SCHEMA_VERSION
from clothcli.backends.executorch_runtime import (
    MAX_BATCH,
    ExecuTorchClassifier,
    import_runtime,
    sidecar_path,
    write_sidecar,
)
from clothcli.backends.onnx_runtime import EXPORT_EXTRA, OnnxClassifier
from clothcli.backends.openvino_runtime import OpenVinoClassifier, convert_onnx, import_openvino, publish
from clothcli.backends.pytorch import torch_module
from clothcli.data.sources import available_splits
from clothcli.engines.evaluate import fold_run, model_outputs, own_split, split_of
from clothcli.engines.quantize import int8_path_for, quantize_int8, quiet, require_quantizer
from clothcli.errors import UserError, require_packages
from clothcli.formats import EXECUTORCH, ONNX, OPENVINO, export_path, model_format
from clothcli.io_utils import atomic_path
from clothcli.models.loading import WithFeatures

# ONNX Runtime and PyTorch sum in different orders: fp32 logits of these models differ by ~1e-5.
DEFAULT_TOLERANCE = 1e-3  # per unit of the largest logit, see Verification.allowed_diff
META_FIELDS = (
    "arch", "classes", "preprocess", "temperature", "temperature_fitted_on", "ood_threshold", "ood_method",
    "ood_recall", "ood_bank_sha256", "epoch", "metrics", "model_kwargs", "quantization", "schema_version",
)  # fmt: skip


@dataclass
class Verification:
    """The exported model on its runtime against PyTorch, on the same images."""

    images: int
    source: str  # the folder the images came from, or "generated"
    max_abs_diff: float  # largest absolute logit difference
    logit_scale: float  # largest absolute PyTorch logit
    top1_agreement: float
    # disagreements on images whose top two PyTorch logits are closer than the allowed difference
    near_ties: int
    tolerance: float
    runtime: str = ONNX  # the exported file's format (formats.ONNX, formats.OPENVINO, formats.EXECUTORCH)

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
    qat_epochs: int = 0  # quantization-aware fine-tuning after calibration (0: post-training only)
    seconds: float = 0.0  # quantizing (and fine-tuning), after the fp32 export


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
    require_packages(("onnx", "onnxruntime", "onnxscript"), "export", EXPORT_EXTRA)


def _check_output(output: Path) -> None:
    if model_format(output) not in (ONNX, OPENVINO, EXECUTORCH):
        raise UserError(
            f"the output must end in .onnx (ONNX Runtime), .xml (OpenVINO) or .pte (ExecuTorch), got '{output.name}'"
        )
    if not output.parent.is_dir():
        raise UserError(f"output folder not found: {output.parent}")


def _export_graph(model: torch.nn.Module, input_size: int, opset: int, path: Path, meta: dict[str, Any]) -> None:
    """The fp32 graph with a dynamic batch dimension and the checkpoint's metadata, written to `path`."""
    import onnx

    model = WithFeatures(model.to(memory_format=torch.contiguous_format))
    sample = torch.randn(2, 3, input_size, input_size)
    with warnings.catch_warnings(), quiet():
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
        runtime=exported.format,
    )
    differ = expected.argmax(1) != found.argmax(1)
    rows = np.arange(len(expected))[differ]
    margins = expected[rows, expected.argmax(1)[differ]] - expected[rows, found.argmax(1)[differ]]
    check.near_ties = int((margins <= 2 * check.allowed_diff).sum())
    return check


def _accuracy(path: Path, samples: list) -> tuple[float, np.ndarray]:
    """Top-1 accuracy of the exported model over labelled samples, and its predictions."""
    outputs = model_outputs(load_classifier(path), [p for p, _ in samples])
    predicted = outputs.logits.argmax(1)
    targets = np.array([samples[i][1] for i in outputs.rows], dtype=np.int64)
    return float((predicted == targets).mean()) if len(targets) else 0.0, predicted


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
    export_format: str | None = None,
    qat_epochs: int = 0,
) -> ExportReport:
    """Export, verify and (with `int8`) quantize the checkpoint at `checkpoint` to `output`, in the format its
    suffix names or `export_format` (`formats.export_path`).

    Nothing is written to `output` unless verification passes; the caller sees the failed
    verification in the report. With `int8`, the quantized model goes to `int8_path_for(output)`.
    With `qat_epochs`, an IR's int8 model is fine-tuned quantization-aware on the train split (`engines.qat`).
    A .pte output (ExecuTorch) needs only torch and executorch; the others need the export extra."""
    output = export_path(output, export_format)
    _check_output(output)
    if int8 and int8_data is None:
        raise UserError("--int8 needs --int8-data DATA (a dataset folder whose train split calibrates it)")
    if qat_epochs < 0:
        raise UserError(f"--qat-epochs must be 0 or more, got {qat_epochs}")
    if qat_epochs and (not int8 or model_format(output) != OPENVINO):
        raise UserError("--qat-epochs fine-tunes the int8 model of an OpenVINO IR: give --int8 and an .xml output")
    if model_format(output) == EXECUTORCH:
        if int8:
            raise UserError("--int8 is for .onnx and .xml outputs; a .pte program is exported in fp32")
        import_runtime()
    else:
        _require_export_packages()
    if model_format(output) == OPENVINO:
        import_openvino()
    if int8:
        require_quantizer(output)
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
        report.int8 = _int8(output, meta, loaded, data, samples, source, int8_images, model, qat_epochs)
    _copy_bank(loaded, [output] + ([Path(report.int8.path)] if report.int8 else []))
    return report


def _copy_bank(loaded: Classifier, outputs: list[Path]) -> None:
    """The checkpoint's out-of-distribution bank (`calibrate --ood`) beside each exported file, under the
    name its backend looks for, so that --min-confidence auto decides as the checkpoint does. The exported
    metadata names the bank by its digest, which the copy keeps."""
    if not loaded.meta.get("ood_bank_sha256") or not loaded.bank_path.is_file():
        return
    for output in outputs:
        exported = load_classifier(output)
        with atomic_path(exported.bank_path) as staged:
            shutil.copyfile(loaded.bank_path, staged)


def exported_files(output: Path) -> list[Path]:
    """The files an export consists of: the .onnx, the IR's .xml and .bin, or the .pte and its sidecar."""
    kind = model_format(output)
    if kind == OPENVINO:
        return [output, output.with_suffix(".bin")]
    return [output, sidecar_path(output)] if kind == EXECUTORCH else [output]


def _export_program(model: torch.nn.Module, input_size: int, path: Path) -> None:
    """The fp32 model as an ExecuTorch program lowered to XNNPACK, batch dimension 1 to MAX_BATCH."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    module = WithFeatures(model.to(memory_format=torch.contiguous_format)).eval()
    # a sample batch below the bound left the planned input buffer smaller than the bound (ExecuTorch 1.5)
    sample = torch.randn(MAX_BATCH, 3, input_size, input_size)
    with warnings.catch_warnings(), quiet():
        warnings.simplefilter("ignore")
        graph = torch.export.export(
            module, (sample,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)
        )
        program = to_edge_transform_and_lower(graph, partitioner=[XnnpackPartitioner()]).to_executorch()
    path.write_bytes(program.buffer)


def _write_verified(
    model: torch.nn.Module, loaded: Classifier, output: Path, opset: int, samples: list | None, source: str,
    tolerance: float,
) -> Verification:  # fmt: skip
    """Write the export at `output` only once it verifies against the PyTorch backend (else _Rejected).
    An OpenVINO IR is converted from the ONNX graph, in a scratch folder beside the output."""
    size = loaded.preprocess.input_size
    if model_format(output) == EXECUTORCH:
        with tempfile.TemporaryDirectory(dir=output.parent, prefix=".export-") as scratch:
            staged = Path(scratch) / output.name
            _export_program(model, size, staged)
            write_sidecar(staged, _kept_metadata(loaded.meta))
            checked = verify(loaded, ExecuTorchClassifier(staged), samples, source, tolerance)
            if not checked.passed:
                raise _Rejected(checked)
            os.replace(staged, output)
            os.replace(sidecar_path(staged), sidecar_path(output))
        return checked
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
    output: Path, meta: dict[str, Any], classifier: Classifier, data: Path, samples: list, folder: str, count: int,
    model: torch.nn.Module, qat_epochs: int,
) -> Int8Result:  # fmt: skip
    if "train" not in available_splits(data, own_split(classifier, data), own_first=fold_run(classifier)):
        raise UserError(f"{data}: no train split to calibrate int8 on")
    start = time.perf_counter()
    _, calibration = _labelled_images(classifier, data, "train", count, seed=1)
    files, kept = [p for p, _ in calibration], _kept_metadata(meta)
    if qat_epochs:
        from clothcli.engines.qat import quantize_aware

        train_samples = list(split_of(classifier, data, "train").samples)
        quantized = quantize_aware(
            model=model, preprocess=classifier.preprocess, calibration_files=files, train_samples=train_samples,
            epochs=qat_epochs, int8_path=int8_path_for(output), meta={**kept, "quantization": "int8 NNCF QAT"},
        )  # fmt: skip
    else:
        quantized = quantize_int8(output, files, classifier.preprocess, kept)
    fp32_accuracy, fp32_preds = _accuracy(output, samples)
    int8_accuracy, int8_preds = _accuracy(quantized, samples)
    agreement = float((fp32_preds == int8_preds).mean()) if len(fp32_preds) else 0.0
    return Int8Result(
        str(quantized),
        sum(p.stat().st_size for p in exported_files(quantized)),
        len(calibration),
        folder,
        len(samples),
        fp32_accuracy,
        int8_accuracy,
        agreement,
        qat_epochs,
        round(time.perf_counter() - start, 2),
    )
