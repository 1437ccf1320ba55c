"""The PyTorch engine of `predict`: a clothcli checkpoint over a list of files.

Decoding runs in DataLoader workers (JPEGs much larger than the input are decoded at reduced
size), the model runs batched under inference_mode in channels_last with its batch norms folded
into the convolutions, with bf16 autocast on CPUs that do bf16 natively.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from clothcli.data.batch_augment import BatchAugment
from clothcli.data.loading import ImageFiles, collate, decode_size, eval_transform, make_loader
from clothcli.errors import UserError
from clothcli.inference import load_for_inference
from clothcli.predict import Prediction, label_row, resolve_min_confidence
from clothcli.runtime import cpu_supports_bf16, resolve_device


def classify(
    model: torch.nn.Module, images: torch.Tensor, top_k: int, use_bf16: bool, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k probabilities (of logits / `temperature`) and class indices for a normalised batch already
    on the model's device."""
    images = images.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        logits = model(images)
    return (logits.float() / temperature).softmax(1).topk(top_k, dim=1)


class ClassifyInWorker:
    """A collate_fn that also runs the model, so each CPU loader worker decodes and classifies its own
    batches. One-thread processes keep a CPU busier than one process that alternates between waiting
    for batches and running a model whose threads do not scale perfectly (1.29x measured with 2
    workers on 2 cores, see docs/performance.md)."""

    def __init__(self, model: torch.nn.Module, top_k: int, use_bf16: bool, temperature: float = 1.0):
        self.model, self.top_k, self.use_bf16, self.temperature = model, top_k, use_bf16, temperature

    def __call__(self, samples: list) -> tuple:
        images, targets, indices, errors = collate(samples)
        scores = classify(self.model, images, self.top_k, self.use_bf16, self.temperature)
        return (*scores, targets, indices, errors)


def predict_files_torch(
    checkpoint: str | Path,
    files: list[Path],
    batch_size: int = 64,
    workers: int = 2,
    top_k: int = 1,
    min_confidence: float | str = 0.0,
    device: str | None = None,
    uint8_transfer: bool | None = None,
    model_in_workers: bool | None = None,
    calibrated: bool = True,
) -> Iterator[Prediction]:
    """Yield one Prediction per file, in the order of `files`.

    `uint8_transfer` (default: on for CUDA) ships uint8 batches and normalises them on the device.
    `model_in_workers` runs the model inside the loader workers, one thread each. The default turns
    it on for a CPU with at least as many workers as torch has threads: workers are forked, and GNU
    OpenMP hangs in a forked child that asks for more than one thread once the parent has used its
    pool, so each worker keeps DataLoader's one thread, and fewer workers would leave cores idle."""
    target = resolve_device(device)
    on_gpu = target.type == "cuda"
    if model_in_workers is None:
        model_in_workers = not on_gpu and workers > 0 and workers >= torch.get_num_threads()
    if model_in_workers and (on_gpu or workers == 0):
        raise UserError("running the model in the loader workers needs a CPU device and at least one worker")
    loaded = load_for_inference(checkpoint, target, calibrated=calibrated)
    min_confidence = resolve_min_confidence(min_confidence, loaded.meta, loaded.temperature, loaded.directory)
    model, classes, pre = loaded.model, loaded.classes, loaded.preprocess
    top_k = min(top_k, len(classes))
    if uint8_transfer is None:
        uint8_transfer = on_gpu  # a quarter of the bytes over PCIe; on a CPU nothing to gain
    use_bf16 = on_gpu or cpu_supports_bf16()
    dataset = ImageFiles([(p, 0) for p in files], eval_transform(pre, uint8_out=uint8_transfer), decode_size(pre))
    normalise = BatchAugment(pre.mean, pre.std) if uint8_transfer else None
    if model_in_workers:
        batches: Iterator = iter(
            make_loader(
                dataset, batch_size, workers, collate_fn=ClassifyInWorker(model, top_k, use_bf16, loaded.temperature)
            )
        )
    else:
        loader = make_loader(dataset, batch_size, workers)
        batches = _classify_in_process(loader, model, target, normalise, top_k, use_bf16, loaded.temperature)
    for top_p, top_i, targets, indices, errors in batches:
        for row, (index, error) in enumerate(zip(indices.tolist(), errors)):
            path = files[index]
            if error or targets[row] < 0:
                yield Prediction(path, [], [], error or "unreadable")
                continue
            values = top_p[row].tolist()
            yield Prediction(path, label_row(values, top_i[row].tolist(), classes, min_confidence), values)


def _classify_in_process(
    loader: Iterable,
    model: torch.nn.Module,
    device: torch.device,
    normalise: BatchAugment | None,
    top_k: int,
    use_bf16: bool,
    temperature: float,
) -> Iterator[tuple]:
    """The loader's batches classified here, on `device` (the GPU path, and a CPU without workers)."""
    for images, targets, indices, errors in loader:
        images = images.to(device, non_blocking=True)
        if normalise is not None:
            images = normalise(images)
        yield (*classify(model, images, top_k, use_bf16, temperature), targets, indices, errors)
