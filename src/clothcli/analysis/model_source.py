"""Resolving what `flops` and `rf` analyse: a timm or torchvision name, a config, or a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import timm
from torch import nn

from clothcli.errors import UserError


@dataclass
class ModelSpec:
    model: nn.Module
    input_size: tuple[int, int, int]
    description: str


def _torchvision(name: str) -> ModelSpec:
    import torchvision

    if name not in torchvision.models.list_models():
        raise UserError(f"unknown torchvision model '{name}'")
    model = torchvision.models.get_model(name)
    size = 224
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        size = int(weights.transforms().crop_size[0])
    except (ValueError, AttributeError, TypeError):
        pass
    return ModelSpec(model, (3, size, size), f"torchvision {name}")


def load_model_spec(source: str, input_size: int | None = None) -> ModelSpec:
    """`source`: timm name, `torchvision:NAME` (or a name only torchvision has), a YAML config, or a
    checkpoint (run folder, checkpoint folder, model.safetensors)."""
    path = Path(source)
    if path.exists():
        if path.suffix.lower() in (".yaml", ".yml"):
            from clothcli.config import load_config
            from clothcli.models.build import build_model

            cfg = load_config(path)
            # the architecture as checkpoints hold it: no starting weights, nothing frozen
            arch = replace(cfg.model, pretrained=False, weights=None, freeze=[], freeze_bn=False)
            model = build_model(arch, num_classes=None)
            default = cfg.preprocess.input_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
            spec = ModelSpec(model, (3, int(default), int(default)), f"{cfg.model.name} (from {path.name})")
        else:
            from clothcli.models.loading import load_for_inference

            loaded = load_for_inference(path, "cpu", fold=False)
            size = loaded.preprocess.input_size
            spec = ModelSpec(loaded.model, (3, size, size), f"{loaded.arch} (checkpoint {loaded.directory})")
    elif source.startswith(("torchvision:", "tv:")):
        spec = _torchvision(source.split(":", 1)[1])
    elif timm.is_model(source):
        model = timm.create_model(source, pretrained=False)
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))
        spec = ModelSpec(model, tuple(int(v) for v in size), f"timm {source}")
    else:
        import torchvision

        if source in torchvision.models.list_models():
            spec = _torchvision(source)
        else:
            from clothcli.models.build import check_architecture

            check_architecture(source)  # raises with the closest timm names
            raise AssertionError("unreachable")
    if input_size is not None:
        spec.input_size = (spec.input_size[0], input_size, input_size)
    spec.model.eval()
    return spec
