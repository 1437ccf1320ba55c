"""`clothcli benchmark`: one checkpoint in every format, side by side on one split and one CPU.

Each format is exported from the run (into a scratch folder), verified as `export` verifies, and
measured through its own backend: file size, accuracy on the split, top-1 agreement with the PyTorch
model and McNemar's exact test against it, latency at batch 1 and throughput at batch 64 on the same
threads, and the whole prediction pipeline's images/s over the split (decoding included). Two last rows
run no model: decoding alone (at the reduced JPEG scale the pipeline decodes at), the physical ceiling
of this pipeline on this CPU, and decoding with the crop, resize and normalisation.

Several splits (`validation,test`) are measured as one set of images: McNemar's test then counts the
disagreements over all of them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clothcli.backends import Classifier, load_classifier
from clothcli.backends.arrays import image_batches
from clothcli.data.images import ImageReadError, load_rgb
from clothcli.data.preprocess import Preprocess
from clothcli.engines.compare import latency_ms
from clothcli.engines.comparison import mcnemar_exact
from clothcli.engines.evaluate import labelled_outputs, split_of
from clothcli.engines.export import export_onnx, exported_files
from clothcli.engines.quantize import int8_path_for
from clothcli.errors import UserError

FORMATS = ("pytorch", "onnx", "onnx-int8", "openvino", "openvino-bf16", "openvino-int8", "executorch")
SUFFIX = {"onnx": ".onnx", "openvino": ".xml", "executorch": ".pte"}
RUNTIME_MODULE = {"onnx": "onnxruntime", "openvino": "openvino", "executorch": "executorch"}


def installed_formats() -> list[str]:
    """The formats whose runtime is installed here: what `benchmark` measures when not told."""
    family = {kind: kind.partition("-")[0] for kind in FORMATS}
    return [k for k in FORMATS if k == "pytorch" or importlib.util.find_spec(RUNTIME_MODULE[family[k]]) is not None]


@dataclass
class FormatRow:
    name: str
    bytes: int | None
    n: int
    accuracy: float
    agreement: float  # top-1 agreement with the PyTorch model on the same images
    p_value: float  # McNemar's exact test against the PyTorch model
    ms_batch1: float
    images_per_s_batch64: float
    predict_images_per_s: float  # decoding, preprocessing and the model, over the split


@dataclass
class BenchmarkReport:
    run: str
    data: str
    split: str
    threads: int
    rows: list[FormatRow] = field(default_factory=list)
    decode_images_per_s: float = 0.0  # decoding alone: the pipeline's ceiling
    preprocess_images_per_s: float = 0.0  # decoding, cropping, resizing and normalising, no model

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parse_formats(formats: list[str] | None) -> list[str]:
    chosen = list(formats or installed_formats())
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown:
        raise UserError(f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    return ["pytorch", *[f for f in chosen if f != "pytorch"]]  # the reference comes first


def _export(run: Path, kind: str, folder: Path, int8_data: Path) -> Classifier:
    """The run exported as `kind` (a format, `-int8` or `-bf16` after it) into `folder`, loaded. A format's
    variants share its fp32 export."""
    family, _, variant = kind.partition("-")
    path = folder / f"model-{family}{SUFFIX[family]}"
    int8 = variant == "int8"
    if not path.exists() or (int8 and not int8_path_for(path).exists()):
        report = export_onnx(checkpoint=run, output=path, int8=int8, int8_data=int8_data)
        if not report.verification.passed:
            raise UserError(f"the {kind} export of {run} did not verify: not benchmarked")
    return load_classifier(
        int8_path_for(path) if int8 else path, calibrated=False, precision="bf16" if variant == "bf16" else None
    )


def _predict_rate(classifier: Classifier, files: list[Path], workers: int) -> float:
    start = time.perf_counter()
    for _ in classifier.run(files, 64, workers):
        pass
    return len(files) / (time.perf_counter() - start)


def decode_rate(files: list[Path], preprocess: Preprocess, workers: int) -> float:
    """Images/s of decoding alone, at the JPEG draft scale the pipeline decodes at, on `workers` threads."""

    def decode(path: Path) -> None:
        with contextlib.suppress(ImageReadError, OSError):
            load_rgb(path, min_size=preprocess.decode_size)

    start = time.perf_counter()
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        for _ in pool.map(decode, files):
            pass
    return len(files) / (time.perf_counter() - start)


def _preprocess_rate(files: list[Path], preprocess: Preprocess, workers: int) -> float:
    start = time.perf_counter()
    for _ in image_batches(files, preprocess, 64, workers):
        pass
    return len(files) / (time.perf_counter() - start)


def _labelled(model: Classifier, data: Path, splits: list[str], workers: int) -> tuple[np.ndarray, np.ndarray]:
    """The model's top-1 predictions and the true classes over the splits, in order."""
    found = [labelled_outputs(model, data, split, workers=workers) for split in splits]
    return np.concatenate([f.logits.argmax(1) for f in found]), np.concatenate([f.targets for f in found])


def benchmark(
    *,
    run: str | Path,
    data: str | Path,
    split: str = "validation",
    formats: list[str] | None = None,
    workers: int = 2,
) -> BenchmarkReport:
    """Every format of `run` measured on the `split` of `data` (which must also have a train split, for
    the int8 calibration)."""
    import torch

    kinds, run, data = _parse_formats(formats), Path(run), Path(data)
    splits = [name.strip() for name in split.split(",") if name.strip()]
    reference = load_classifier(run, calibrated=False, in_workers=False)
    files = [path for name in splits for path, _ in split_of(reference, data, name).samples]
    report = BenchmarkReport(str(run), str(data), ",".join(splits), torch.get_num_threads())
    base = None
    with tempfile.TemporaryDirectory(prefix="clothcli-benchmark-") as scratch:
        for kind in kinds:
            model = reference if kind == "pytorch" else _export(run, kind, Path(scratch), data)
            predicted, targets = _labelled(model, data, splits, workers)
            right = predicted == targets
            if base is None:
                base = (predicted, right)
            side = 3, model.preprocess.input_size, model.preprocess.input_size
            only_reference, only_this = int((base[1] & ~right).sum()), int((right & ~base[1]).sum())
            report.rows.append(
                FormatRow(
                    name=kind,
                    bytes=None if kind == "pytorch" else sum(p.stat().st_size for p in exported_files(model.source)),
                    n=len(right),
                    accuracy=float(right.mean()) if len(right) else 0.0,
                    agreement=float((predicted == base[0]).mean()) if len(right) else 0.0,
                    p_value=mcnemar_exact(only_reference, only_this),
                    ms_batch1=latency_ms(model, side, 1),
                    images_per_s_batch64=1000.0 / latency_ms(model, side, 64),
                    predict_images_per_s=_predict_rate(model, files, workers),
                )
            )
    report.decode_images_per_s = decode_rate(files, reference.preprocess, workers)
    report.preprocess_images_per_s = _preprocess_rate(files, reference.preprocess, workers)
    return report
