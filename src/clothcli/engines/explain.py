"""Class-activation maps of a model's predictions: the overlays `evaluate --cam` writes and the report
shows, and the randomisation check that says whether they depend on what the model learnt.

Maps need gradients, so they are drawn from the PyTorch checkpoint (rebuilt as trained: batch norms
not folded, float32), over the exact crop the model classified (`Preprocess.load`).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from clothcli.analysis.cam import CLASS_AGNOSTIC, CamLayer, CamMaker, check_method, find_layer, require_grad_cam
from clothcli.analysis.cam_check import randomisation_check
from clothcli.backends import Classifier
from clothcli.data.images import ImageReadError
from clothcli.errors import UserError
from clothcli.formats import PYTORCH
from clothcli.io_utils import atomic_path
from clothcli.models.loading import InferenceModel, load_for_inference
from clothcli.render.overlays import cam_picture

BATCH = 16
CHECK_IMAGES = 32  # images the randomisation check compares maps on


@dataclass
class CamSetup:
    """A checkpoint ready to draw maps: the float32 model with its batch norms, the layer, the method."""

    loaded: InferenceModel
    layer: CamLayer
    method: str


@dataclass
class CamReport:
    """What `draw_cams` wrote, and the randomisation check of its maps."""

    directory: str
    method: str
    layer: str
    layer_choice: str
    grid: list[int]
    written: int
    mistakes: int
    index: str  # cams.csv: each overlay with its image, true and predicted class
    check: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prepare_cams(classifier: Classifier, method: str = "gradcam", layer: str | None = None) -> CamSetup:
    """Every check before anything is evaluated: the method, the extra, a checkpoint (not an export),
    a layer that gives a map."""
    check_method(method)
    if classifier.format != PYTORCH:
        raise UserError(
            f"--cam needs the PyTorch checkpoint: class-activation maps need gradients, which an exported "
            f"{classifier.format} file does not keep ({classifier.source.name})"
        )
    require_grad_cam()
    pre = classifier.preprocess
    device = getattr(classifier, "device", None)
    loaded = load_for_inference(
        classifier.source, device, input_size=pre.input_size, crop_pct=pre.crop_pct, fold=False, calibrated=False
    )
    return CamSetup(loaded, find_layer(loaded.model, pre.input_size, layer, classifier.arch), method)


def _safe(text: str, limit: int = 40) -> str:
    """A file-name fragment: letters, digits, '.', '_' and '-' only (a class or file name never makes a
    path of its own)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:limit] or "x"


def _crops(setup: CamSetup, rows: list[dict[str, Any]]) -> Iterator[tuple[list[dict[str, Any]], np.ndarray]]:
    """Batches of (rows, uint8 NHWC crops) of the readable images among `rows`."""
    pre = setup.loaded.preprocess
    for start in range(0, len(rows), BATCH):
        kept, crops = [], []
        for row in rows[start : start + BATCH]:
            try:
                crops.append(pre.load(row["path"]))
            except (ImageReadError, OSError):
                continue
            kept.append(row)
        if kept:
            yield kept, np.stack(crops)


def _tensor(setup: CamSetup, crops: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(setup.loaded.preprocess.normalise(crops)).to(setup.loaded.device)


def cam_pictures(setup: CamSetup, rows: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], Image.Image]]:
    """Each row (path, true, predicted, confidence) with its picture: the crop, the predicted class's
    map and, for a mistake, the true class's beside it (EigenCAM: one map)."""
    index = {name: i for i, name in enumerate(setup.loaded.classes)}
    agnostic = setup.method in CLASS_AGNOSTIC
    with CamMaker(setup.loaded.model, setup.layer.name, setup.method) as maker:
        for kept, crops in _crops(setup, rows):
            images = _tensor(setup, crops)
            predicted = maker.maps(images, [index[r["predicted"]] for r in kept])
            wrong = [r["true"] != r["predicted"] for r in kept]
            true = maker.maps(images, [index[r["true"]] for r in kept]) if any(wrong) and not agnostic else None
            for i, row in enumerate(kept):
                caption = f"true: {row['true']}   predicted: {row['predicted']} {row['confidence']:.0%}"
                if agnostic:
                    maps = [(setup.method, predicted[i])]
                elif wrong[i] and true is not None:
                    maps = [(f"predicted: {row['predicted']}", predicted[i]), (f"true: {row['true']}", true[i])]
                else:
                    maps = [(f"{row['predicted']}", predicted[i])]
                yield row, cam_picture(crops[i], maps, caption, wrong[i])


def check_maps(setup: CamSetup, rows: list[dict[str, Any]], images: int = CHECK_IMAGES, seed: int = 0) -> dict:
    """The randomisation check (`analysis.cam_check`) on a seeded sample of `rows`, with the maps of the
    trained model's predicted classes."""
    rng = np.random.default_rng(seed)
    chosen = [rows[i] for i in sorted(rng.choice(len(rows), min(images, len(rows)), replace=False))]
    batches = list(_crops(setup, chosen))
    if not batches:
        raise UserError("no readable image to check the maps on")
    index = {name: i for i, name in enumerate(setup.loaded.classes)}
    kept = [row for batch, _ in batches for row in batch]
    tensor = _tensor(setup, np.concatenate([crops for _, crops in batches]))
    classes = [index[row["predicted"]] for row in kept]
    return randomisation_check(setup.loaded.model, setup.layer.name, setup.method, tensor, classes, seed).to_dict()


def draw_cams(
    setup: CamSetup,
    rows: list[dict[str, Any]],
    directory: str | Path,
    *,
    every: bool = False,
    check_images: int = CHECK_IMAGES,
) -> CamReport:
    """An overlay per mistake in `rows` (every row with `every`) written into `directory` as JPEG, most
    confident mistakes first, with `cams.csv` naming each one's image; then the randomisation check."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"--cam: {directory} is a file, not a folder")
    directory.mkdir(parents=True, exist_ok=True)
    mistakes = sorted((r for r in rows if r["true"] != r["predicted"]), key=lambda r: -r["confidence"])
    chosen = mistakes + ([r for r in rows if r["true"] == r["predicted"]] if every else [])
    listed = []
    for number, (row, picture) in enumerate(cam_pictures(setup, chosen), 1):
        labels = _safe(row["true"]) + ("" if row["true"] == row["predicted"] else "_as_" + _safe(row["predicted"]))
        name = f"{number:04d}_{labels}_{_safe(Path(str(row['path'])).stem)}.jpg"
        with atomic_path(directory / name) as tmp:
            picture.save(tmp, format="JPEG", quality=85)
        listed.append({**{k: row[k] for k in ("path", "true", "predicted", "confidence")}, "overlay": name})
    index = directory / "cams.csv"
    with atomic_path(index) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["overlay", "path", "true", "predicted", "confidence"])
        writer.writeheader()
        writer.writerows(listed)
    return CamReport(
        directory=str(directory),
        method=setup.method,
        layer=setup.layer.name,
        layer_choice=setup.layer.how,
        grid=list(setup.layer.grid),
        written=len(listed),
        mistakes=sum(1 for r in listed if r["true"] != r["predicted"]),
        index=str(index),
        check=check_maps(setup, rows, check_images) if rows and check_images else None,
    )
