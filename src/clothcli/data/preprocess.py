"""What a model needs done to an image before it sees it: one description for every backend.

A checkpoint and every exported file carry this description (`to_dict`). The PyTorch backend runs it
with torchvision on uint8 tensors (`data.loading.eval_transform`); backends without PyTorch run it
here, with PIL and NumPy: resize the short side to input_size / crop_pct, centre crop, scale to
[0, 1], normalise. The two agree within a level or two of 255 (different resampling kernels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clothcli.data.images import load_rgb

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


@dataclass(frozen=True)
class Preprocess:
    """The evaluation transform: short side to `scale_size`, centre crop of `input_size`, normalise."""

    input_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        return cls(
            int(data["input_size"]),
            str(data["interpolation"]),
            tuple(data["mean"]),
            tuple(data["std"]),
            float(data["crop_pct"]),
        )

    @property
    def scale_size(self) -> int:
        """The short side before the centre crop (timm's eval transform)."""
        return math.floor(self.input_size / self.crop_pct)

    @property
    def decode_size(self) -> int:
        """The smallest short side worth decoding a JPEG at (its draft mode may go no lower)."""
        return math.ceil(self.input_size / self.crop_pct)

    def crop(self, image: Image.Image) -> np.ndarray:
        """An RGB image -> the uint8 HWC centre crop the model sees (torchvision's Resize and CenterCrop sizes).

        Only the source region that survives the crop is resampled (PIL's `box`, whose filter still reads
        the pixels around it): the same image as resizing it all and cropping, within one level, in 60%
        of the time for a portrait photo."""
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.scale_size, int(self.scale_size * long / short)
        new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
        side = self.input_size
        top, left = round((new_height - side) / 2.0), round((new_width - side) / 2.0)
        sx, sy = width / new_width, height / new_height
        box = (left * sx, top * sy, (left + side) * sx, (top + side) * sy)
        resample = RESAMPLING.get(self.interpolation, Image.Resampling.BICUBIC)
        return np.asarray(image.resize((side, side), resample, box=box), dtype=np.uint8)

    def load(self, path: str | Path) -> np.ndarray:
        """The uint8 HWC crop of the file at `path`; ImageReadError when it cannot be decoded."""
        return self.crop(load_rgb(path, min_size=self.decode_size))

    def normalise(self, batch: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 NHWC -> float32 NCHW, scaled to [0, 1] and normalised with the model's mean and std,
        into `out` when given (a slice of the batch being assembled: no copy afterwards).

        One multiply and one add per channel, in place: (x / 255 - mean) / std = x * a + b."""
        mean, std = np.asarray(self.mean, dtype=np.float32), np.asarray(self.std, dtype=np.float32)
        planes = batch.transpose(0, 3, 1, 2)
        out = np.empty(planes.shape, dtype=np.float32) if out is None else out
        scale = (1.0 / (255.0 * std)).astype(np.float32)
        shift = (-mean / std).astype(np.float32)
        for c in range(3):
            np.multiply(planes[:, c], scale[c], out=out[:, c], dtype=np.float32)
            out[:, c] += shift[c]
        return out
