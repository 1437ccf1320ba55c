"""Datasets and loaders: decode robustly, transform with timm, never let one bad file stop a run.

A file that cannot be decoded yields a blank image with target -1 (ignored by the loss and the
metrics) plus its reason, so batches keep their shape across processes and the file is reported.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, Sampler

from clothcli.config import AugmentConfig
from clothcli.data.images import ImageReadError, load_rgb
from clothcli.data.preprocess import Preprocess
from clothcli.processes import process_alive
from clothcli.runtime import resolve_device

IGNORE_INDEX = -1


def crop_size(pre: Preprocess, aug: AugmentConfig) -> int:
    """Side of the training crops: `augment.crop_size`, else the evaluation input size."""
    return aug.crop_size or pre.input_size


def train_transform(pre: Preprocess, aug: AugmentConfig) -> Callable:
    return create_transform(
        input_size=crop_size(pre, aug),
        is_training=True,
        scale=tuple(aug.scale),
        ratio=tuple(aug.ratio),
        hflip=aug.hflip,
        color_jitter=aug.color_jitter or None,
        auto_augment=aug.auto_augment,
        interpolation=pre.interpolation,
        mean=pre.mean,
        std=pre.std,
    )


class ResizeShortSide:
    """PIL image -> uint8 CHW tensor whose short side is `short_side` (torchvision's Resize(int) sizes).

    The resize runs on the uint8 tensor in channels-last layout, where torch has a vectorised
    antialiased kernel: 2-3x faster than PIL's resize for the same sizes, within 1 level of it
    (bilinear; 2 for bicubic). Evaluation, prediction and the decode cache all resize here, so
    validation from the cache equals decoding the files exactly.
    """

    def __init__(self, short_side: int, interpolation: str):
        self.short_side = short_side
        self.interpolation = interpolation

    def __call__(self, image: Image.Image) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        hwc = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
        chw = hwc.permute(2, 0, 1)
        return F.resize(chw, [self.short_side], InterpolationMode(self.interpolation), antialias=True)


def eval_transform(pre: Preprocess, uint8_out: bool = False) -> Callable:
    """timm's eval preprocessing (resize the short side to input/crop_pct, centre crop, normalise)
    on a PIL image; with `uint8_out` normalisation is left to `BatchAugment` on the device."""
    from torchvision.transforms import v2

    return v2.Compose([ResizeShortSide(scale_size(pre), pre.interpolation), tensor_eval_transform(pre, uint8_out)])


def _largest_side(pre: Preprocess, aug: AugmentConfig | None) -> int:
    """The evaluation input, or the training crops when `aug` is given and they are larger."""
    return max(pre.input_size, crop_size(pre, aug)) if aug is not None else pre.input_size


def decode_size(pre: Preprocess, aug: AugmentConfig | None = None) -> int:
    """Shortest side worth decoding: what the eval resize needs (JPEG draft may go no lower), or
    the same margin around training crops larger than the evaluation size."""
    return math.ceil(_largest_side(pre, aug) / pre.crop_pct)


def scale_size(pre: Preprocess, aug: AugmentConfig | None = None) -> int:
    """The short side timm's eval transform resizes to before its centre crop; with `aug`, what the
    training images are cached at (larger when the training crops are larger than the input)."""
    return math.floor(_largest_side(pre, aug) / pre.crop_pct)


def tensor_train_transform(pre: Preprocess, aug: AugmentConfig, uint8_out: bool = False) -> Callable:
    """The training augmentation on uint8 CHW tensors (torchvision.transforms.v2).

    With `uint8_out` it stops before colour jitter and normalisation, which `BatchAugment` then does
    on the device."""
    from torchvision.transforms import InterpolationMode, v2

    interpolation = InterpolationMode(pre.interpolation)
    steps: list = [
        v2.RandomResizedCrop(
            crop_size(pre, aug),
            scale=tuple(aug.scale),
            ratio=tuple(aug.ratio),
            interpolation=interpolation,
            antialias=True,
        ),
    ]
    if aug.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.color_jitter and not uint8_out:
        steps.append(v2.ColorJitter(aug.color_jitter, aug.color_jitter, aug.color_jitter))
    if aug.auto_augment:
        name = aug.auto_augment.split("-")[0]
        # rotations and shears of tensors support nearest and bilinear only (PIL's bicubic is not there)
        geometric = InterpolationMode.NEAREST if pre.interpolation == "nearest" else InterpolationMode.BILINEAR
        if name == "rand":
            steps.append(v2.RandAugment(interpolation=geometric))
        elif name in ("trivialaugment", "ta_wide", "trivial"):
            steps.append(v2.TrivialAugmentWide(interpolation=geometric))
        else:
            steps.append(v2.AutoAugment(interpolation=geometric))
    if not uint8_out:
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(pre.mean), list(pre.std))]
    return v2.Compose(steps)


def tensor_eval_transform(pre: Preprocess, uint8_out: bool = False) -> Callable:
    """Centre crop and normalise an image already resized to `scale_size` (equals `eval_transform`);
    with `uint8_out` only the crop (`BatchAugment` normalises on the device)."""
    from torchvision.transforms import v2

    steps: list = [v2.CenterCrop(pre.input_size)]
    if not uint8_out:
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(pre.mean), list(pre.std))]
    return v2.Compose(steps)


def sub_seed(seed: int, salt: int) -> int:
    """The seed of one sub-stream of a run's randomness (an epoch, a process): distinct for every
    (seed, salt) pair with a salt below a million, and a valid `manual_seed` for any seed."""
    return (seed * 1_000_003 + salt) % 2**63


class SeededDraws(Sampler):
    """Yields (index, seed) pairs: the order comes from `sampler`, the seed from (seed, epoch, position).

    The dataset seeds its random transforms with each draw's own seed, so an epoch's augmentation
    depends on nothing but (seed, epoch): not on which worker decodes an item, nor on the number of
    workers, nor on what earlier epochs drew. That lets workers persist across epochs while resume
    stays exact. `set_epoch` (which Accelerate's loader calls) also reseeds the order's generator.
    """

    def __init__(self, sampler: Sampler, generator: torch.Generator, seed: int):
        self.sampler = sampler
        self.generator = generator
        self.seed = seed
        self.epoch = 0

    def _epoch_seed(self) -> int:
        return sub_seed(self.seed, self.epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.generator.manual_seed(self._epoch_seed())

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = self._epoch_seed() * 1_000_000_007
        for position, index in enumerate(self.sampler):
            yield int(index), (base + position) % 2**63


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Run with the CPU generators of torch, Python and NumPy (timm's RandAugment draws from NumPy)
    seeded to `seed`. In the training process (a loader without workers) all three are restored
    afterwards, so its RNG is not disturbed; a worker's own state matters to no one, and skipping the
    restore saves about 100 us an item. (`torch.manual_seed` would also seed every accelerator, at
    140 us a call here; the CPU generator alone takes about 1 us.)"""
    if seed is None:
        yield
        return
    cpu = torch.default_generator
    in_worker = torch.utils.data.get_worker_info() is not None
    saved = None if in_worker else (cpu.get_state(), random.getstate(), np.random.get_state())
    cpu.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        if saved is not None:
            cpu.set_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


def _split_key(key: int | tuple[int, int]) -> tuple[int, int | None]:
    return (key[0], key[1]) if isinstance(key, tuple) else (key, None)


class ImageFiles(Dataset):
    """(path, target) pairs decoded to upright RGB and transformed."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Callable, decode_min: int | None):
        self.samples = list(samples)
        self.transform = transform
        self.decode_min = decode_min
        self._blank: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int, str]:
        index, seed = _split_key(key)
        path, target = self.samples[index]
        try:
            decoded = load_rgb(path, min_size=self.decode_min)
            with _seeded(seed):
                image = self.transform(decoded)
            if self._blank is None:
                self._blank = torch.zeros_like(image)
            return image, target, index, ""
        except ImageReadError as exc:
            return self._blank_like(), IGNORE_INDEX, index, str(exc)

    def _blank_like(self) -> torch.Tensor:
        if self._blank is None:
            from PIL import Image

            self._blank = torch.zeros_like(self.transform(Image.new("RGB", (64, 64))))
        return self._blank


class CachedImages(Dataset):
    """The same items as ImageFiles, read from a DecodedImages cache instead of the files."""

    def __init__(self, images: Any, targets: Sequence[int], transform: Callable):
        self.images = images
        self.targets = list(targets)
        self.transform = transform
        self._blank: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int, str]:
        index, seed = _split_key(key)
        image = self.images.get(index)
        if image is None:
            if self._blank is None:
                self._blank = torch.zeros_like(self.transform(torch.zeros(3, 64, 64, dtype=torch.uint8)))
            return self._blank, IGNORE_INDEX, index, self.images.errors[index]
        with _seeded(seed):
            return self.transform(image), self.targets[index], index, ""


def collate(
    batch: list[tuple[torch.Tensor, int, int, str]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    images, targets, indices, errors = zip(*batch)
    return (torch.stack(images), torch.tensor(targets), torch.tensor(indices), list(errors))


class ExitWithOwner:
    """worker_init_fn for workers that are not the loader's own children: end the worker when the process that
    owns the loader has gone.

    PyTorch's workers watch their parent process, which for a worker from the fork server is the server, and the
    server lives as long as any worker does: a trainer killed by SIGKILL or the OOM killer left the server and
    its workers behind for good (measured: still there after minutes)."""

    def __init__(self, owner: int | None = None):
        self.owner = owner or os.getpid()

    def __call__(self, worker_id: int) -> None:
        threading.Thread(target=_exit_when_gone, args=(self.owner,), daemon=True, name="owner-watch").start()


def _exit_when_gone(pid: int, interval: float = 1.0) -> None:
    while process_alive(pid):
        time.sleep(interval)
    os._exit(0)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    shuffle: bool = False,
    sampler: Any = None,
    drop_last: bool = False,
    collate_fn: Callable = collate,
    context: Any = None,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        drop_last=drop_last,
        # Worker RNG state does not matter (see SeededDraws), so workers live as long as the loader.
        persistent_workers=workers > 0,
        multiprocessing_context=context if workers > 0 else None,
        worker_init_fn=ExitWithOwner() if workers > 0 and context is not None else None,
        # Creating an iterator draws the workers' base seed from this generator. Left to the global RNG,
        # that draw happened only in the epoch that started the persistent workers, so a resumed run
        # (whose workers start in a later epoch) saw a shifted stream in that epoch's dropout.
        generator=torch.Generator(),
        pin_memory=resolve_device().type == "cuda",  # page-locked batches only where they go to a GPU
    )
