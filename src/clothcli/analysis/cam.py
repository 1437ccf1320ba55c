"""Class-activation maps: where a CNN looked when it chose a class, through pytorch-grad-cam.

A map is read at one layer: the one `--cam-layer NAME` names (a module path such as `blocks.5`), or,
for a timm CNN, its last feature stage: the last entry of timm's `feature_info`, the deepest map
`features_only` would return (stride 32 in the usual networks: 6 x 6 for MobileNetV3 at 192 px).
The layer must give a 4-D map (images, channels, height, width); a transformer's token outputs are
refused with one line naming --cam-layer. GradCAM, GradCAM++ and LayerCAM weigh that layer's
activations by one class's gradients, so they draw a map per class; EigenCAM takes the first
principal component of the activations and draws one map whatever the class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from clothcli.errors import UserError, require_packages

METHODS = ("gradcam", "gradcam++", "eigencam", "layercam")
CLASS_AGNOSTIC = frozenset({"eigencam"})
CAM_EXTRA = "pip install 'clothcli[explain]'"


def check_method(method: str) -> None:
    """A UserError for a method pytorch-grad-cam is not asked for here."""
    if method not in METHODS:
        raise UserError(f"unknown --cam-method '{method}': choose one of {', '.join(METHODS)}")


def require_grad_cam() -> None:
    require_packages(("pytorch_grad_cam",), "class-activation maps", CAM_EXTRA)


def _cam_class(method: str) -> Any:
    check_method(method)
    require_grad_cam()
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM

    return {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM, "layercam": LayerCAM}[method]


@dataclass(frozen=True)
class CamLayer:
    """The layer maps are read at, how it was chosen, and the size of its map at the model's input."""

    name: str
    how: str
    channels: int
    grid: tuple[int, int]


def _layer_output(model: nn.Module, module: nn.Module, input_size: int) -> Any:
    """What `module` returns in one forward pass of a zero image of the model's input size."""
    found: list[Any] = []
    handle = module.register_forward_hook(lambda _m, _i, output: found.append(output))
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        handle.remove()
    return found[0] if found else None


def find_layer(model: nn.Module, input_size: int, name: str | None = None, arch: str = "") -> CamLayer:
    """The layer to draw maps at: `name`, or the model's last feature stage (timm's `feature_info`)."""
    what = arch or type(model).__name__
    model.eval()
    if name:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            top = ", ".join(n for n, _ in model.named_children())
            raise UserError(f"--cam-layer: {what} has no module '{name}' (its top-level modules: {top})") from None
        how = "--cam-layer"
    else:
        info = getattr(model, "feature_info", None)
        stages = list(info) if info is not None else []
        if not stages or "module" not in stages[-1]:
            raise UserError(f"{what} lists no feature stages to draw maps at: name a layer with --cam-layer")
        name = str(stages[-1]["module"])
        module = model.get_submodule(name)
        how = "the last feature stage in timm's feature_info"
    output = _layer_output(model, module, input_size)
    if not isinstance(output, torch.Tensor) or output.dim() != 4 or min(output.shape[-2:]) < 1:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise UserError(
            f"{what}: layer '{name}' gives {shape}, not a map of (channels, height, width): "
            "name a convolutional layer with --cam-layer"
        )
    return CamLayer(name, how, int(output.shape[1]), (int(output.shape[2]), int(output.shape[3])))


class CamMaker:
    """One model, one layer, one method: maps of batches of normalised images, each scaled to [0, 1]
    at the input's size. The model is kept in eval mode; its parameters take gradients (the maps of
    gradient methods are built from them)."""

    def __init__(self, model: nn.Module, layer: str, method: str):
        cam_class = _cam_class(method)
        self.method = method
        self.model = model.eval().requires_grad_(True)
        self.cam = cam_class(model=self.model, target_layers=[self.model.get_submodule(layer)])

    def maps(self, images: torch.Tensor, classes: Sequence[int]) -> np.ndarray:
        """(N, H, W) float32 maps of `images` for `classes` (one per image; EigenCAM ignores them)."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        targets = None if self.method in CLASS_AGNOSTIC else [ClassifierOutputTarget(int(c)) for c in classes]
        with torch.enable_grad():
            found = self.cam(input_tensor=images, targets=targets)
        return np.nan_to_num(np.asarray(found, dtype=np.float32))

    def close(self) -> None:
        self.cam.activations_and_grads.release()

    def __enter__(self) -> CamMaker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
