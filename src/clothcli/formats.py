"""Which kind of model file a path is: the one place that tells a checkpoint from an exported file."""

from __future__ import annotations

from pathlib import Path

PYTORCH = "pytorch"  # a clothcli run folder, checkpoint folder or its model.safetensors
ONNX = "onnx"  # an exported .onnx file, run on ONNX Runtime
OPENVINO = "openvino"  # an exported OpenVINO IR: model.xml beside model.bin
EXECUTORCH = "executorch"  # an ExecuTorch program for XNNPACK: model.pte beside model.pte.json
EXPORTED_SUFFIXES = {".onnx": ONNX, ".xml": OPENVINO, ".pte": EXECUTORCH}


def model_format(path: str | Path) -> str:
    """The format of the model at `path`, by its suffix: exported files have one, checkpoints are folders."""
    return EXPORTED_SUFFIXES.get(Path(path).suffix.lower(), PYTORCH)


def is_exported(path: str | Path) -> bool:
    """An exported file (runs without PyTorch) rather than a clothcli checkpoint."""
    return model_format(path) != PYTORCH
