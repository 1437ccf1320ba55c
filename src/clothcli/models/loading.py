"""Loading a checkpoint to run it: the one path `evaluate`, `predict`, `flops` and `rf` share.

A checkpoint carries everything inference needs: the architecture, the class names and the
preprocessing. `load_for_inference` rebuilds the model, puts it on the device in eval mode and, for
running it (not for analysing its structure), in channels_last with each batch norm folded into the
convolution that feeds it (`fusion.prepare_for_inference`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clothcli.data.preprocess import Preprocess
from clothcli.models.checkpoint import load_checkpoint
from clothcli.models.fusion import prepare_for_inference
from clothcli.runtime import resolve_device


@dataclass
class InferenceModel:
    """A checkpoint ready to classify: the model, its classes and how to preprocess its input."""

    model: nn.Module
    classes: list[str]
    preprocess: Preprocess
    arch: str
    device: torch.device
    directory: Path
    meta: dict[str, Any]  # the whole checkpoint.json
    # logits are divided by this before softmax: fitted by `clothcli calibrate`, 1.0 until then
    temperature: float = 1.0


def load_for_inference(
    checkpoint: str | Path,
    device: str | torch.device | None = None,
    input_size: int | None = None,
    crop_pct: float | None = None,
    fold: bool = True,
    calibrated: bool = True,
) -> InferenceModel:
    """The checkpoint at `checkpoint` (run folder, checkpoint folder or its weights file) on `device`.

    `input_size` / `crop_pct` override the recorded preprocessing (timm validate.py's `--img-size` /
    `--crop-pct`). With `fold` the model is made fast to run (channels_last, batch norm folded and
    checked against the unfolded model); without it the module structure stays as trained, which is
    what counting MACs or tracing receptive fields needs. With `calibrated` the temperature stored by
    `clothcli calibrate` is used; without it, 1.0 (the raw probabilities).
    """
    device = resolve_device(device)
    model, meta = load_checkpoint(checkpoint, device)
    pre = Preprocess.from_dict(meta["preprocess"])
    pre = replace(pre, input_size=input_size or pre.input_size, crop_pct=crop_pct or pre.crop_pct)
    if fold:
        model = prepare_for_inference(model, pre.input_size)
    return InferenceModel(
        model=model,
        classes=list(meta["classes"]),
        preprocess=pre,
        arch=str(meta["arch"]),
        device=device,
        directory=Path(meta["directory"]),
        meta=meta,
        temperature=float(meta.get("temperature") or 1.0) if calibrated else 1.0,
    )


def logits_and_features(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and the penultimate features (timm's pre-logits: pooled, before the classifier) of one
    forward pass; in eval mode the logits equal `model(images)`."""
    pre_logits = model.forward_head(model.forward_features(images), pre_logits=True)
    return model.get_classifier()(pre_logits), pre_logits


class WithFeatures(nn.Module):
    """A timm classifier whose forward returns (logits, features): the graph an export writes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_and_features(self.model, images)
