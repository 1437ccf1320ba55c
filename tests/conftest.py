"""Shared fixtures: tiny generated datasets (no real data or weights needed)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from PIL import Image

os.environ.setdefault("OMP_NUM_THREADS", "2")

CLASSES = ("red", "green", "blue")
# A tiny timm model on 32 px inputs: every training test runs in seconds on 2 cores.
TINY_OVERRIDES = [
    "model.name=test_efficientnet",
    "model.pretrained=false",
    "preprocess.input_size=32",
    "train.batch_size=8",
    "data.num_workers=0",
    "train.mixed_precision=no",
]
COLORS = {"red": (200, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 200)}


TIMING_FIELDS = ("seconds", "images_per_s", "data_wait", "val_seconds", "teacher_seconds")


def comparable(history: list[dict]) -> list[dict]:
    """A training history without its timings: what must match between equivalent runs."""
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in history]


def make_image(
    path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 32), seed: int = 0, fmt: str | None = None
) -> Path:
    """A noisy solid-colour image, so classes are learnable but images differ."""
    rng = random.Random(seed)
    img = Image.new("RGB", size, color)
    pixels = img.load()
    for _ in range(size[0] * size[1] // 4):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        pixels[x, y] = tuple(max(0, min(255, c + rng.randint(-60, 60))) for c in color)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def make_dataset(root: Path, per_class: dict[str, int] | None = None, classes: tuple[str, ...] = CLASSES) -> Path:
    """root/{train,validation,test}/<class>/<n>.jpg with distinct colours per class."""
    per_class = per_class or {"train": 8, "validation": 4, "test": 4}
    seed = 0
    for split, n in per_class.items():
        for cls in classes:
            for i in range(n):
                seed += 1
                make_image(root / split / cls / f"{cls}_{i}.jpg", COLORS.get(cls, (120, 120, 120)), seed=seed)
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")


@pytest.fixture
def forked_workers(monkeypatch):
    """Training loaders whose workers are forked from this process, so a monkeypatch made here reaches them
    (by default they start from a fork server that imports clothcli afresh)."""
    import multiprocessing

    from clothcli.data import pipeline

    monkeypatch.setattr(pipeline, "worker_context", lambda: multiprocessing.get_context("fork"))


@pytest.fixture(autouse=True)
def _no_hub_probe(monkeypatch):
    """Tests never touch the network: the hub probe says 'offline'."""
    monkeypatch.setattr("clothcli.models.build.hub_reachable", lambda *a, **k: False)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Decode caches go to a per-session temp folder, never the user's ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))


def train_tiny(root: Path, data: Path, epochs: int = 4) -> Path:
    """A tiny run on `data` (TINY_OVERRIDES, learning rate 0.05) in root/runs; its run folder."""
    from clothcli.config import load_config
    from clothcli.training import train

    overrides = [
        *TINY_OVERRIDES,
        f"train.epochs={epochs}",
        "optim.lr=0.05",
        f"data.root={data}",
        f"output_dir={root / 'runs'}",
    ]
    return train(load_config(None, overrides)).run_dir
