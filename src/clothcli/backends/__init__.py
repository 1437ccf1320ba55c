"""`load_classifier`: any model clothcli can run, behind one interface (`base.Classifier`).

The format is told by the path (`formats.model_format`); each backend is imported only when a model
of its format is loaded, so an exported file runs without PyTorch installed or imported.
"""

from __future__ import annotations

from pathlib import Path

from clothcli.backends.base import Classifier, OutputBatch
from clothcli.errors import UserError
from clothcli.formats import EXECUTORCH, ONNX, OPENVINO, PYTORCH, model_format

__all__ = ["Classifier", "OutputBatch", "load_classifier"]


def load_classifier(
    path: str | Path,
    *,
    device: str | None = None,
    calibrated: bool = True,
    threads: int | None = None,
    input_size: int | None = None,
    crop_pct: float | None = None,
    in_workers: bool | None = None,
    precision: str | None = None,
) -> Classifier:
    """The model at `path` (a run folder, a checkpoint folder, its model.safetensors, or an exported
    file), with the temperature `clothcli calibrate` stored unless not `calibrated`.

    `device`, `input_size`, `crop_pct` and `in_workers` apply to checkpoints only (an exported file has
    its preprocessing fixed in the graph's input and runs on the CPU); `threads` sets an exported
    model's intra-op threads; `precision` (f32 or bf16) an OpenVINO model's inference precision."""
    if precision not in (None, "f32") and model_format(path) != OPENVINO:
        raise UserError(f"--precision {precision} applies to OpenVINO models (.xml); {path} is not one")
    kind = model_format(path)
    if kind != PYTORCH:
        if device not in (None, "cpu") or in_workers:
            raise UserError(f"an exported {kind} model runs on the CPU: drop --device")
        if input_size or crop_pct:
            raise UserError(f"--input-size and --crop-pct need the checkpoint, not an exported {kind} file")
    if kind == ONNX:
        from clothcli.backends.onnx_runtime import OnnxClassifier

        return OnnxClassifier(path, calibrated=calibrated, threads=threads)
    if kind == OPENVINO:
        from clothcli.backends.openvino_runtime import OpenVinoClassifier

        return OpenVinoClassifier(path, calibrated=calibrated, threads=threads, precision=precision or "f32")
    if kind == EXECUTORCH:
        from clothcli.backends.executorch_runtime import ExecuTorchClassifier

        return ExecuTorchClassifier(path, calibrated=calibrated, threads=threads)
    from clothcli.backends.pytorch import TorchClassifier
    from clothcli.models.loading import load_for_inference

    loaded = load_for_inference(path, device, input_size=input_size, crop_pct=crop_pct, calibrated=calibrated)
    return TorchClassifier(loaded, calibrated=calibrated, in_workers=in_workers)
