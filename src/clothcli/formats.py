"""Which kind of model file a path is: the one place that tells a checkpoint from an exported file."""

from __future__ import annotations

from pathlib import Path

from clothcli.errors import UserError

PYTORCH = "pytorch"  # a clothcli run folder, checkpoint folder or its model.safetensors
ONNX = "onnx"  # an exported .onnx file, run on ONNX Runtime
OPENVINO = "openvino"  # an exported OpenVINO IR: model.xml beside model.bin
EXECUTORCH = "executorch"  # an ExecuTorch program for XNNPACK: model.pte beside model.pte.json
EXPORTED_SUFFIXES = {".onnx": ONNX, ".xml": OPENVINO, ".pte": EXECUTORCH}
SUFFIX_OF = {fmt: suffix for suffix, fmt in EXPORTED_SUFFIXES.items()}


def model_format(path: str | Path) -> str:
    """The format of the model at `path`, by its suffix: exported files have one, checkpoints are folders."""
    return EXPORTED_SUFFIXES.get(Path(path).suffix.lower(), PYTORCH)


def is_exported(path: str | Path) -> bool:
    """An exported file (runs without PyTorch) rather than a clothcli checkpoint."""
    return model_format(path) != PYTORCH


def export_path(path: str | Path, fmt: str | None) -> Path:
    """Where an export of format `fmt` goes: `path` when its suffix names that format (or when no format is
    asked, the suffix deciding), with the format's suffix added when it has none of the three."""
    path = Path(path)
    if fmt is None:
        return path
    if fmt not in SUFFIX_OF:
        raise UserError(f"unknown export format '{fmt}'; choose from {', '.join(SUFFIX_OF)}")
    named = EXPORTED_SUFFIXES.get(path.suffix.lower())
    if named is None:
        return path.with_name(path.name + SUFFIX_OF[fmt])
    if named != fmt:
        raise UserError(f"--format {fmt} writes a {SUFFIX_OF[fmt]} file, but the output ends in {path.suffix}")
    return path
