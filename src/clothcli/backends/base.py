"""The one interface every model format runs behind (the pattern of Ultralytics' AutoBackend).

A `Classifier` knows its classes, its preprocessing, its calibration (temperature and rejection
threshold) and its metadata, and turns image files into logits and penultimate features in batches,
decoding included: each backend decodes the way its runtime is fastest, and a backend without
PyTorch never imports it. Everything above (predict, evaluate, calibrate, compare, report) works on
the NumPy arrays it yields, so each metric and each output is computed once for every format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clothcli.data.preprocess import Preprocess

# 1: classes, preprocess, temperature, ood_threshold, arch; the exported graph has a features output
SCHEMA_VERSION = 1


@dataclass
class OutputBatch:
    """One batch of files through a model: rows for the files that could be read, reasons for the rest."""

    indices: list[int]  # every file of the batch, as positions in the list given, in order
    rows: list[int]  # the files the rows of `logits` belong to, in order
    logits: np.ndarray  # float32 (len(rows), classes)
    errors: dict[int, str] = field(default_factory=dict)  # file position -> why it could not be read
    features: np.ndarray | None = None  # float32 (len(rows), width): penultimate features, when asked
    flipped_logits: np.ndarray | None = None  # of the mirrored images, when asked


class Classifier(ABC):
    """A loaded model of any format. `source` is the path it was loaded from (run folder, checkpoint
    folder or exported file), `format` its kind (`formats.PYTORCH`, `formats.ONNX`, ...)."""

    format: str
    source: Path
    classes: list[str]
    preprocess: Preprocess
    arch: str
    meta: dict[str, Any]
    temperature: float  # what logits are divided by: the fitted one, or 1.0 when not calibrated
    ood_threshold: float | None  # the calibrated top-1 probability below which an image is "unknown"

    @property
    def schema_version(self) -> int:
        return int(self.meta.get("schema_version", SCHEMA_VERSION))

    @property
    def stored_temperature(self) -> float:
        """The temperature stored with the model, whether or not it is used."""
        return float(self.meta.get("temperature") or 1.0)

    @property
    def bank_path(self) -> Path:
        """Where `calibrate --ood` keeps the feature bank of this model: beside an exported file as
        NAME.ood.safetensors (checkpoints put it in their folder)."""
        return self.source.with_name(self.source.name + ".ood.safetensors")

    @property
    def quantization(self) -> str:
        return str(self.meta.get("quantization") or "")

    @property
    @abstractmethod
    def threads(self) -> int:
        """CPU threads the model runs on."""

    @abstractmethod
    def run(
        self,
        files: list[Path],
        batch_size: int = 64,
        workers: int = 2,
        flip: bool = False,
        features: bool = False,
    ) -> Iterator[OutputBatch]:
        """The files decoded, preprocessed and classified, in batches in the order given."""

    @abstractmethod
    def forward(self, images: np.ndarray) -> np.ndarray:
        """Logits of an already preprocessed float32 NCHW batch (verification and latency)."""

    @abstractmethod
    def infer(self, images: np.ndarray, features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits of an already preprocessed float32 NCHW batch, and its penultimate features when asked."""

    @abstractmethod
    def prepare(self, image: Image.Image) -> np.ndarray:
        """A decoded RGB image as the float32 CHW array `run` would feed the model for it: what a caller
        that holds images rather than files (the server) batches and passes to `infer`."""

    @abstractmethod
    def store(self, **values: Any) -> None:
        """Record `values` (a fitted temperature, a threshold) in the model's own metadata, atomically."""

    def describe(self) -> dict[str, Any]:
        """What a user asks of a model: its format, classes, preprocessing, calibration and metrics."""
        return {
            "source": str(self.source),
            "format": self.format,
            "arch": self.arch,
            "classes": list(self.classes),
            "preprocess": self.preprocess.to_dict(),
            "temperature": self.temperature,
            "ood_threshold": self.ood_threshold,
            "quantization": self.quantization,
            "metrics": self.meta.get("metrics"),
            "schema_version": self.schema_version,
            "threads": self.threads,
        }
