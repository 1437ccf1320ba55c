"""Quantization-aware int8 for an OpenVINO IR (`export --int8 --qat-epochs N`).

NNCF's PyTorch quantizer places the same quantizers as its post-training pass (mixed preset, calibrated on
the same training images) in the checkpoint with its batch norms folded; the weights and quantizer ranges
are then fine-tuned for a few epochs on the training split, distilled from the fp32 model's own logits
(with the labels' cross-entropy at half weight, random flips). The result goes through ONNX, as every
export does, so that OpenVINO folds timm's explicit "same" padding into the convolutions and runs them
in int8."""

from __future__ import annotations

import copy
import math
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clothcli.backends.arrays import FEATURES_OUTPUT, image_batches
from clothcli.backends.openvino_runtime import convert_onnx, publish
from clothcli.data.preprocess import Preprocess
from clothcli.engines.quantize import calibration_batches, import_nncf, one_image_batches, quiet
from clothcli.errors import UserError
from clothcli.models.loading import WithFeatures

BATCH_SIZE = 64
LEARNING_RATE = 1e-4  # Adam, cosine to zero: 3 epochs kept fp32's accuracy on the CPU recipe
LABEL_WEIGHT = 0.5  # the cross-entropy with the labels, beside the distillation from fp32


def _training_batches(
    samples: list[tuple[Path, int]], preprocess: Preprocess, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The samples in a fresh order, decoded in threads; each image flipped at random, unreadable ones left out."""
    order = torch.randperm(len(samples), generator=generator).tolist()
    files = [samples[i][0] for i in order]
    targets = torch.tensor([samples[i][1] for i in order])
    for batch in image_batches(files, preprocess, BATCH_SIZE, 2):
        if batch.images is None:
            continue
        images = torch.from_numpy(batch.images)
        flip = torch.rand(len(images), generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
        yield images, targets[[batch.indices[pos] for pos in batch.readable]]


def quantize_aware(
    *,
    model: torch.nn.Module,
    preprocess: Preprocess,
    calibration_files: list[Path],
    train_samples: list[tuple[Path, int]],
    epochs: int,
    int8_path: Path,
    meta: dict[str, Any],
    seed: int = 0,
) -> Path:
    """`model` (fp32, batch norms folded, eval mode) quantized, fine-tuned for `epochs` and written as an IR
    at `int8_path` with `meta`; the path."""
    nncf = import_nncf()
    images = [torch.from_numpy(x) for x in one_image_batches(calibration_batches(calibration_files, preprocess))]
    if not images or not train_samples:
        raise UserError("no readable training images to quantize on")
    torch.manual_seed(seed)
    teacher = WithFeatures(model).eval()
    with quiet():
        student = nncf.quantize(
            WithFeatures(copy.deepcopy(model)), nncf.Dataset(images), subset_size=len(images),
            preset=nncf.QuantizationPreset.MIXED,
        )  # fmt: skip
    optimizer = torch.optim.Adam(student.parameters(), lr=LEARNING_RATE)
    steps, step = epochs * math.ceil(len(train_samples) / BATCH_SIZE), 0
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        student.train()
        for batch, targets in _training_batches(train_samples, preprocess, generator):
            for group in optimizer.param_groups:
                group["lr"] = LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * step / steps))
            with torch.no_grad():
                soft = F.softmax(teacher(batch)[0], dim=1)
            logits = student(batch)[0]
            loss = F.kl_div(F.log_softmax(logits, dim=1), soft, reduction="batchmean")
            loss = loss + LABEL_WEIGHT * F.cross_entropy(logits, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    _write_ir(student.eval(), preprocess.input_size, int8_path, meta)
    return int8_path


def _write_ir(student: torch.nn.Module, input_size: int, int8_path: Path, meta: dict[str, Any]) -> None:
    """The fine-tuned model through ONNX (TorchScript exporter, which NNCF's quantizers trace through) to an
    IR with a dynamic batch, staged beside `int8_path` and then moved there."""
    sample = torch.zeros(1, 3, input_size, input_size)
    with tempfile.TemporaryDirectory(dir=int8_path.parent, prefix=".int8-") as scratch:
        graph, staged = Path(scratch) / "qat.onnx", Path(scratch) / int8_path.name
        with warnings.catch_warnings(), quiet():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                student, (sample,), str(graph), dynamo=False, opset_version=17, input_names=["image"],
                output_names=["logits", FEATURES_OUTPUT],
                dynamic_axes={name: {0: "batch"} for name in ("image", "logits", FEATURES_OUTPUT)},
            )  # fmt: skip
        convert_onnx(graph, staged, meta)
        publish(staged, int8_path)
