"""Checkpoints: `model.safetensors` (timm key layout) plus `checkpoint.json` describing it.

Plain timm loads the weights file directly:
`timm.create_model(arch, num_classes=N, checkpoint_path=".../model.safetensors", **model_kwargs)`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clothcli import __version__
from clothcli.data.preprocess import Preprocess
from clothcli.errors import UserError
from clothcli.io_utils import fault_point, readable_dir, recover_dir, replace_dir, staging_dir
from clothcli.names import check_class_names
from clothcli.safe_files import refuse_links
from clothcli.untrusted import read_json

WEIGHTS_FILE = "model.safetensors"
META_FILE = "checkpoint.json"


def state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors in plain timm layout (channels_last weights are not contiguous).

    Batch norm frozen by `model.freeze` has no `num_batches_tracked`; the counter is put back so the
    file loads into the unfrozen architecture, where eval-mode batch norm computes the same thing.
    """
    from timm.layers import FrozenBatchNormAct2d
    from torchvision.ops.misc import FrozenBatchNorm2d

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, (FrozenBatchNorm2d, FrozenBatchNormAct2d)):
            state.setdefault(f"{name}.num_batches_tracked", torch.tensor(0))
    return state


def save_checkpoint(model: nn.Module, directory: str | Path, meta: dict[str, Any]) -> Path:
    """Write weights and metadata to a staging folder, then swap it in (atomic per folder)."""
    directory = Path(directory)
    recover_dir(directory)
    staging = staging_dir(directory)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    meta = {**meta, "clothcli_version": __version__}
    try:
        save_file(state_dict_for_saving(model), str(staging / WEIGHTS_FILE), metadata=_file_metadata(meta))
        fault_point()
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a full disk gets its space back
        raise
    replace_dir(staging, directory)
    return directory


def _file_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """The safetensors header's metadata as one entry: safetensors keeps it in a hash map whose order
    changes from process to process, so with several entries identical weights made different files."""
    described = {"arch": str(meta.get("arch", "")), "num_classes": str(meta.get("num_classes", ""))}
    return {"clothcli": json.dumps(described, sort_keys=True)}


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder for a run folder (best/, else last/), a checkpoint folder or its files."""
    path = readable_dir(Path(path))
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_file():
        path = path.parent
    for candidate in (path, readable_dir(path / "best"), readable_dir(path / "last")):
        if (candidate / META_FILE).is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate
    raise UserError(
        f"{path}: no clothcli checkpoint here (expected {META_FILE} and {WEIGHTS_FILE}, "
        "or a run folder with best/ or last/)"
    )


def read_meta(path: str | Path) -> dict[str, Any]:
    directory = find_checkpoint(path)
    source = directory / META_FILE
    meta = read_json(source)
    if not isinstance(meta, dict):
        raise UserError(f"{source}: not a clothcli checkpoint description (expected a JSON object)")
    for key in ("arch", "classes", "preprocess"):
        if key not in meta:
            raise UserError(f"{source}: missing '{key}'")
    if not isinstance(meta["arch"], str) or not isinstance(meta.get("model_kwargs", {}), dict):
        raise UserError(f"{source}: 'arch' must be a timm name and 'model_kwargs' a mapping")
    check_class_names(meta["classes"], str(source))
    try:
        Preprocess.from_dict(meta["preprocess"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{source}: 'preprocess' is not a preprocessing description") from None
    meta["directory"] = str(directory)
    return meta


def architecture(meta: dict[str, Any]) -> nn.Module:
    """The untrained network a checkpoint's or an export's metadata describes (eval mode): its structure
    (MACs, receptive field) without its weights."""
    import timm

    return timm.create_model(
        meta["arch"], pretrained=False, num_classes=len(meta["classes"]), **meta.get("model_kwargs", {})
    ).eval()


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model recorded in a checkpoint and load its weights (eval mode)."""
    meta = read_meta(path)
    directory = Path(meta["directory"])
    model = architecture(meta)
    try:
        state = load_file(str(directory / WEIGHTS_FILE))
        model.load_state_dict(state)
    except Exception as exc:  # corrupt file or wrong shapes: both are bad input
        raise UserError(f"{directory / WEIGHTS_FILE}: cannot load weights ({str(exc).splitlines()[0][:200]})") from None
    return model.to(device).eval(), meta


def update_meta(path: str | Path, **values: Any) -> Path:
    """Record `values` in a checkpoint's checkpoint.json (atomically; the weights are not touched)."""
    from clothcli.io_utils import atomic_write_text

    meta = read_meta(path)
    directory = Path(meta.pop("directory"))
    refuse_links(directory, directory / META_FILE)
    meta.update(values)
    atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2) + "\n")
    return directory
