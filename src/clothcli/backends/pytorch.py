"""The PyTorch backend: a clothcli checkpoint (run folder, checkpoint folder or model.safetensors).

Decoding runs in DataLoader workers (JPEGs much larger than the input are decoded at reduced size,
resized on uint8 tensors), the model runs batched under inference_mode in channels_last with its
batch norms folded into the convolutions. On a CPU it runs in the precision the run was trained and
selected in (bf16 autocast only for a run trained in bf16, and only on a CPU with native bf16), so
evaluate gives the numbers training measured and the same scores as the fp32 exports; on a GPU in the
precision `auto` picks there. On a CPU with a worker per thread the model runs inside the workers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from clothcli.backends.base import Classifier, OutputBatch
from clothcli.data.batch_augment import BatchAugment
from clothcli.data.loading import ImageFiles, collate, decode_size, eval_transform, make_loader
from clothcli.errors import UserError
from clothcli.formats import PYTORCH
from clothcli.models.checkpoint import update_meta
from clothcli.models.loading import InferenceModel, logits_and_features
from clothcli.runtime import cpu_supports_bf16, resolve_precision

AUTOCAST_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def inference_precision(meta: dict[str, Any], device_type: str) -> str:
    """The precision a checkpoint runs in: the device's rule on a GPU; on a CPU the run's own training
    precision where this CPU does it natively, else fp32 (bf16 emulated is several times slower); `auto`
    is what a run trained on a GPU records."""
    if device_type != "cpu":
        return resolve_precision("auto", device_type)
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    trained = train.get("mixed_precision", "no")
    return "bf16" if trained in ("bf16", "auto") and cpu_supports_bf16() else "no"


class ModelPass:
    """Logits (and penultimate features, and the mirrored images' logits) of a normalised batch already
    on the model's device; picklable, so a loader worker can run it."""

    def __init__(self, model: nn.Module, autocast: torch.dtype | None, flip: bool, features: bool):
        self.model, self.autocast, self.flip, self.features = model, autocast, flip, features

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return logits_and_features(self.model, images) if self.features else (self.model(images), None)

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        images = images.contiguous(memory_format=torch.channels_last)
        enabled = self.autocast is not None
        with torch.inference_mode(), torch.autocast(images.device.type, dtype=self.autocast, enabled=enabled):
            logits, features = self._forward(images)
            flipped = self.model(images.flip(-1)) if self.flip else None

        def host(t: torch.Tensor | None) -> np.ndarray | None:
            return None if t is None else t.float().cpu().numpy()

        return host(logits), host(features), host(flipped)


class PassInWorker:
    """A collate_fn that also runs the model, so each CPU loader worker decodes and classifies its own
    batches. One-thread processes keep a CPU busier than one process that alternates between waiting
    for batches and running a model whose threads do not scale perfectly (1.29x measured with 2
    workers on 2 cores, see docs/performance.md)."""

    def __init__(self, model_pass: ModelPass):
        self.model_pass = model_pass

    def __call__(self, samples: list) -> tuple:
        images, targets, indices, errors = collate(samples)
        return (*self.model_pass(images), targets, indices, errors)


class TorchClassifier(Classifier):
    """A checkpoint on a device, ready to classify."""

    format = PYTORCH

    def __init__(
        self,
        loaded: InferenceModel,
        calibrated: bool = True,
        in_workers: bool | None = None,
        uint8_transfer: bool | None = None,
    ):
        self.loaded = loaded
        self.model, self.device = loaded.model, loaded.device
        self.source = loaded.directory
        self.classes, self.preprocess, self.arch = loaded.classes, loaded.preprocess, loaded.arch
        self.meta = loaded.meta
        self.temperature = loaded.temperature if calibrated else 1.0
        threshold = self.meta.get("ood_threshold")
        self.ood_threshold = None if threshold is None else float(threshold)
        self.in_workers, self.uint8_transfer = in_workers, uint8_transfer
        self.autocast = AUTOCAST_TYPES.get(inference_precision(self.meta, self.device.type))
        self._transform: Any = None  # the eval transform `prepare` applies, made on first use

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    def run(
        self, files: list[Path], batch_size: int = 64, workers: int = 2, flip: bool = False, features: bool = False
    ) -> Iterator[OutputBatch]:
        """`in_workers` (default: on for a CPU with at least as many workers as torch has threads) runs
        the model inside the loader workers, one thread each: workers are forked, and GNU OpenMP hangs
        in a forked child that asks for more than one thread once the parent has used its pool, so each
        worker keeps DataLoader's one thread, and fewer workers would leave cores idle.
        `uint8_transfer` (default: on for CUDA) ships uint8 batches and normalises them on the device."""
        on_gpu = self.device.type == "cuda"
        in_workers = self.in_workers
        if in_workers is None:
            in_workers = not on_gpu and workers > 0 and workers >= torch.get_num_threads()
        if in_workers and (on_gpu or workers == 0):
            raise UserError("running the model in the loader workers needs a CPU device and at least one worker")
        uint8 = on_gpu if self.uint8_transfer is None else self.uint8_transfer
        pre = self.preprocess
        dataset = ImageFiles([(p, 0) for p in files], eval_transform(pre, uint8_out=uint8), decode_size(pre))
        model_pass = ModelPass(self.model, self.autocast, flip, features)
        if in_workers:
            batches: Iterable = make_loader(dataset, batch_size, workers, collate_fn=PassInWorker(model_pass))
        else:
            normalise = BatchAugment(pre.mean, pre.std) if uint8 else None
            batches = self._in_process(make_loader(dataset, batch_size, workers), model_pass, normalise)
        for logits, feats, flipped, targets, indices, errors in batches:
            positions = indices.tolist()
            failed = {p: e or "unreadable" for p, e, t in zip(positions, errors, targets.tolist()) if e or t < 0}
            keep = [row for row, p in enumerate(positions) if p not in failed]
            if failed:
                logits, feats, flipped = (None if a is None else a[keep] for a in (logits, feats, flipped))
            yield OutputBatch(positions, [positions[r] for r in keep], logits, failed, feats, flipped)

    def _in_process(self, loader: Iterable, model_pass: ModelPass, normalise: BatchAugment | None) -> Iterator:
        """The loader's batches classified here, on the device (the GPU path, and a CPU without workers)."""
        for images, targets, indices, errors in loader:
            images = images.to(self.device, non_blocking=True)
            if normalise is not None:
                images = normalise(images)
            yield (*model_pass(images), targets, indices, errors)

    def forward(self, images: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(images).to(self.device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self.model(batch).float().cpu().numpy()

    def infer(self, images: np.ndarray, features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        batch = torch.from_numpy(images).to(self.device)
        logits, found, _ = ModelPass(self.model, self.autocast, False, features)(batch)
        return logits, found

    def prepare(self, image: Image.Image) -> np.ndarray:
        if self._transform is None:
            self._transform = eval_transform(self.preprocess)
        return self._transform(image).numpy()

    @property
    def bank_path(self) -> Path:
        return self.source / "ood_bank.safetensors"

    def store(self, **values: Any) -> None:
        update_meta(self.source, **values)
        self.meta = {**self.meta, **json.loads(json.dumps(values))}


def torch_module(classifier: Classifier) -> nn.Module:
    """The PyTorch model behind a classifier of this backend (for export and analysis)."""
    if not isinstance(classifier, TorchClassifier):
        raise UserError(f"{classifier.source}: this needs a clothcli checkpoint, not a {classifier.format} file")
    return classifier.model
