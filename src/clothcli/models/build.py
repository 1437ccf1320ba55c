"""Building timm models with their starting weights, and the preprocessing they expect."""

from __future__ import annotations

import difflib
import socket
from pathlib import Path
from typing import Any

import timm
from torch import nn

from clothcli.config import ModelConfig, PreprocessConfig
from clothcli.data.preprocess import Preprocess
from clothcli.errors import UserError

HUB_HOST = "huggingface.co"


def check_architecture(name: str) -> None:
    """UserError with the closest names when timm has no such architecture."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"
    raise UserError(f"unknown timm model '{name}'{hint}")


def check_model_config(cfg: ModelConfig) -> None:
    """The model checks that need no network and no building (architecture name, weights file), made
    before anything slow (the format timing, the data index) so a typo fails in a second."""
    check_architecture(cfg.name)
    if cfg.weights and not Path(cfg.weights).is_file():
        raise UserError(f"weights file not found: {cfg.weights}")


def hub_reachable(host: str = HUB_HOST, timeout: float = 3.0) -> bool:
    """A quick TCP probe, so an offline user waits seconds rather than a minute of retries."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_message(name: str, reason: str) -> str:
    return (
        f"cannot get pretrained weights for '{name}' ({reason}); pass a local file with "
        "--weights PATH (config key model.weights), or set model.pretrained=false"
    )


def build_model(cfg: ModelConfig, num_classes: int | None) -> nn.Module:
    """A timm model with a head for `num_classes` (None: the architecture's own), its starting weights,
    and `cfg.freeze` applied.

    Freezing happens here rather than in training, so a resumed run rebuilds the same module
    structure (frozen batch norm has no `num_batches_tracked`) before loading its state; checkpoints
    for evaluate and predict are saved in the plain layout (`checkpoint.state_dict_for_saving`).
    `cfg.freeze_bn` fixes every batch norm at its pretrained statistics and scale: a training step
    then skips the batch statistics and their backward pass (MobileNetV3-Small at 192 px on a
    2-core CPU: 72-91 img/s against 64-70).
    """
    model = freeze_modules(_with_weights(cfg, num_classes), cfg.freeze)
    return timm.utils.model.freeze_batch_norm_2d(model) if cfg.freeze_bn else model


def freeze_modules(model: nn.Module, names: list[str]) -> nn.Module:
    """Stop training the named submodules: no gradients, batch norm statistics fixed (timm's freeze).

    Freezing the first stages of a pretrained network is the cheap end of fine-tuning: autograd
    records nothing before the first trainable layer, so the high-resolution early layers cost a
    forward pass only.
    """
    if not names:
        return model
    known = dict(model.named_modules())
    for name in names:
        if name not in known or not name:
            close = difflib.get_close_matches(name, [n for n in known if n], n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"model.freeze: '{name}' is not a module of this model{hint}")
    timm.utils.freeze(model, list(names))
    return model


def _with_weights(cfg: ModelConfig, num_classes: int | None) -> nn.Module:
    """A timm model with a head for `num_classes`, weights from `cfg.weights` or the hub.

    A local weights file goes through timm's own pretrained loader (`pretrained_cfg_overlay`),
    which drops the ImageNet head when the class count differs and adapts input channels.
    """
    check_architecture(cfg.name)
    kwargs: dict[str, Any] = dict(cfg.kwargs)
    kwargs.setdefault("drop_rate", cfg.drop_rate)
    if cfg.weights:
        weights = Path(cfg.weights)
        if not weights.is_file():
            raise UserError(f"weights file not found: {weights}")
        try:
            model = timm.create_model(
                cfg.name,
                pretrained=True,
                num_classes=num_classes,
                pretrained_cfg_overlay={"file": str(weights)},
                **kwargs,
            )
            return zero_init_head(model)
        except (RuntimeError, KeyError, ValueError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{weights}: cannot load into '{cfg.name}': {first[:300]}") from None
    if not cfg.pretrained:
        return _create(cfg.name, num_classes, kwargs, pretrained=False)
    if not hub_reachable():
        import huggingface_hub.constants

        # Cached weights still load; missing ones fail at once instead of after retries.
        huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        return zero_init_head(_create(cfg.name, num_classes, kwargs, pretrained=True))
    except UserError:
        raise
    except (OSError, RuntimeError, ConnectionError) as exc:
        reason = "offline and not in the local cache" if not hub_reachable() else type(exc).__name__
        raise UserError(_offline_message(cfg.name, reason)) from None


def zero_init_head(model: nn.Module) -> nn.Module:
    """Start a fresh classifier at zero on top of pretrained features.

    timm initialises a new head for training from scratch (e.g. uniform +-1/sqrt(10) on
    MobileNetV3), which on 1280 pretrained features gives logits large enough to spend the first
    epoch undoing; a zero head starts from uniform predictions and the loss at log(classes).
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
    return model


def _create(name: str, num_classes: int | None, kwargs: dict[str, Any], pretrained: bool) -> nn.Module:
    if num_classes is not None:
        kwargs = {**kwargs, "num_classes": num_classes}
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise UserError(f"model.kwargs not accepted by '{name}': {exc}") from None
    except RuntimeError as exc:
        if "No pretrained weights exist" in str(exc) or "pretrained" in str(exc).lower():
            raise UserError(_offline_message(name, str(exc).splitlines()[0])) from None
        raise


def resolve_preprocess(model: nn.Module, cfg: PreprocessConfig) -> Preprocess:
    """The model's pretrained data config, with any value the config sets taking precedence."""
    data_cfg = timm.data.resolve_data_config({}, model=model)
    size = cfg.input_size or int(data_cfg["input_size"][-1])
    interpolation = cfg.interpolation or data_cfg.get("interpolation", "bilinear")
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        interpolation = "bilinear"
    mean = tuple(cfg.mean or data_cfg["mean"])
    std = tuple(cfg.std or data_cfg["std"])
    if len(mean) != 3 or len(std) != 3:
        raise UserError("preprocess.mean and preprocess.std need 3 values (R, G, B)")
    crop_pct = cfg.crop_pct or float(data_cfg.get("crop_pct", 0.875))
    return Preprocess(size, interpolation, mean, std, crop_pct)  # type: ignore[arg-type]
