"""The float half of the input pipeline, run on whole batches where the model runs.

With `data.augment_on: device` the DataLoader workers only crop, flip and auto-augment uint8 images
(cheap integer work on the CPU, a quarter of the bytes to copy to the GPU), and the rest happens here
on the device, batched: uint8 -> float, per-image colour jitter, normalisation. The arithmetic is
torchvision's (`to_dtype`, `adjust_brightness/contrast/saturation`, `normalize`) with one factor per
image (factors and order of the adjustments) instead of one per call, so an image comes out as the
per-image pipeline would make it (up to rounding: the per-image pipeline works on uint8).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torchvision.transforms.v2 import functional as F

from clothcli.data.loading import sub_seed

BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2


def color_jitter(images: torch.Tensor, factors: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation of float images in [0, 1] (N,3,H,W), torchvision's blend
    and clamp. `factors` is (3, N): one factor per adjustment and image; `orders` is (N, 3): the
    order in which each image gets the three (torchvision's ColorJitter draws one per image).

    Each adjustment blends the image with something: zeros (brightness), the mean of its grey image
    (contrast) or the grey image (saturation). So every step is one blend of the whole batch, each
    image with its own partner and factor: no per-order grouping, no shapes that depend on the draw,
    nothing that makes a GPU wait for the host.
    """
    for step in range(orders.shape[1]):
        op = orders[:, step]
        f = factors.gather(0, op.view(1, -1)).view(-1, 1, 1, 1)
        op = op.view(-1, 1, 1, 1)
        gray = F.rgb_to_grayscale(images, num_output_channels=1)
        mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
        other = torch.where(op == SATURATION, gray, torch.where(op == CONTRAST, mean, 0.0))
        images = images.mul(f).add_(other.mul(1 - f)).clamp_(0, 1)
    return images


class BatchAugment:
    """uint8 batch -> jittered (training only), normalised float batch, on the batch's device.

    The jitter draws from its own generators, reseeded from (seed, epoch) by `set_epoch`, so that
    like the per-image augmentation it depends on nothing but the epoch: not on what the loader's
    workers took from the global generator, and a resumed run draws what an uninterrupted one did.
    The factors come from a generator on the batch's device, so a GPU step never waits for a copy.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], jitter: float = 0.0, seed: int = 0):
        self.mean = list(mean)
        self.std = list(std)
        self.jitter = jitter
        self.seed = seed
        self._epoch_seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def set_epoch(self, epoch: int) -> None:
        self._epoch_seed = sub_seed(self.seed, epoch)
        self._generators.clear()

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self._epoch_seed)
        return self._generators[device]

    def draw(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """ColorJitter's draws for n images: factors uniform in [max(0, 1 - j), 1 + j] (3, N) and a
        random order of the three adjustments per image (N, 3)."""
        generator = self._generator(device)
        low = max(0.0, 1 - self.jitter)
        factors = torch.rand(3, n, generator=generator, device=device).mul_(1 + self.jitter - low).add_(low)
        orders = torch.rand(n, 3, generator=generator, device=device).argsort(dim=1)
        return factors, orders

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = F.to_dtype(images, torch.float32, scale=True)
        if self.jitter:
            x = color_jitter(x, *self.draw(len(x), x.device))
        return F.normalize(x, self.mean, self.std)


class TransformedBatches:
    """A loader whose image batches get `transform` applied as they come out of it (after the
    device copy when it is an Accelerate loader): batched augmentation, or a mirror for TTA."""

    def __init__(self, loader: Any, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.loader = loader
        self.transform = transform

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)
        if hasattr(self.transform, "set_epoch"):
            self.transform.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any, Any, Any]]:
        for images, targets, indices, errors in self.loader:
            yield self.transform(images), targets, indices, errors
