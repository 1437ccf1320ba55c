"""`evaluate` for an exported .onnx model: the same report as the PyTorch path, without PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clothcli.data.layout import index_folder
from clothcli.errors import UserError
from clothcli.evaluation_report import EvalReport, resolve_eval_folder
from clothcli.numpy_metrics import calibration, classification_report, separation
from clothcli.onnx_inference import OnnxClassifier, batch_probabilities, image_batches, load_onnx


def _logits_and_probs(
    model: OnnxClassifier, files: list[Path], batch_size: int, workers: int, tta_flip: bool
) -> tuple[np.ndarray, np.ndarray, list[int], dict[int, str]]:
    """Logits and probabilities of the readable files, their indices, and the unreadable ones' reasons."""
    logits, probs, readable, errors = [], [], [], {}
    for batch in image_batches(files, model.preprocess, batch_size, workers):
        batch_probs, batch_logits = batch_probabilities(model, batch, tta_flip)
        probs.append(batch_probs)
        logits.append(batch_logits)
        readable += [batch.indices[pos] for pos in batch.readable]
        errors.update(batch.errors)
    k = len(model.classes)
    return np.concatenate(logits or [np.zeros((0, k))]), np.concatenate(probs or [np.zeros((0, k))]), readable, errors


def evaluate_onnx(
    path: str | Path,
    data: str | Path,
    split: str = "test",
    batch_size: int = 64,
    workers: int = 2,
    tta_flip: bool = False,
    calibrated: bool = True,
    ood: str | Path | None = None,
    ood_recall: float = 0.95,
) -> EvalReport:
    """The classification report, calibration and per-file predictions of the exported model at `path`
    over `data/<split>` (or `data` laid out by class); with `ood`, how well its images are told apart."""
    model = load_onnx(path, calibrated)
    folder = resolve_eval_folder(data, split)
    index = index_folder(folder, model.classes, name=split)
    if not index.samples:
        raise UserError(f"{folder}: no images to evaluate")
    files = [p for p, _ in index.samples]
    logits, probs, readable, errors = _logits_and_probs(model, files, batch_size, workers, tta_flip)
    targets = np.array([index.samples[i][1] for i in readable], dtype=np.int64)
    preds, confidence = probs.argmax(1), probs.max(1)
    report = classification_report(preds, targets, model.classes)
    classes = model.classes
    separations = []
    if ood is not None:
        from clothcli.predict import collect_inputs

        found = collect_inputs([str(ood)])
        if found.missing or not found.files:
            raise UserError(f"{ood}: no images found")
        out_logits, _, _, _ = _logits_and_probs(model, found.files, batch_size, workers, False)
        separations = separation(logits, out_logits, model.temperature, ood_recall)
    return EvalReport(
        **report.to_dict(),
        checkpoint=str(model.path),
        arch=model.arch,
        folder=str(folder),
        split=split,
        tta_flip=tta_flip,
        preprocess=dict(model.meta["preprocess"]),
        temperature=model.temperature,
        calibration=calibration(np.log(np.clip(probs, 1e-12, None)), targets) if len(targets) else {},
        ood=separations,
        files=[
            {"path": str(files[i]), "true": classes[t], "predicted": classes[p], "confidence": float(c)}
            for i, t, p, c in zip(readable, targets.tolist(), preds.tolist(), confidence.tolist())
        ],
        unreadable=[{"path": str(files[i]), "reason": r} for i, r in sorted(errors.items())],
        skipped=[{"path": str(s.path), "reason": s.reason} for s in index.skipped],
    )
