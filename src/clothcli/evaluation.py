"""`evaluate`: run a checkpoint over a split (or any class-laid-out folder) and report."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from clothcli.calibration import calibration, plot_reliability
from clothcli.data.batch_augment import TransformedBatches
from clothcli.data.layout import index_folder
from clothcli.data.loading import IGNORE_INDEX, ImageFiles, decode_size, eval_transform, make_loader
from clothcli.errors import UserError
from clothcli.evaluation_report import EvalReport, resolve_eval_folder
from clothcli.inference import InferenceModel, load_for_inference
from clothcli.metrics import classification_report
from clothcli.ood import separation
from clothcli.runtime import make_accelerator, predict_batches, resolve_device


@dataclass
class SplitOutputs:
    """A checkpoint's raw logits over one folder laid out by class, and what could not be read."""

    folder: Path
    index: Any  # the folder's SplitIndex (samples, skipped files)
    logits: torch.Tensor
    targets: torch.Tensor
    indices: torch.Tensor
    errors: list[tuple[int, str]]
    flipped_logits: torch.Tensor | None = None


def predict_split(
    loaded: InferenceModel,
    accelerator: Any,
    data: str | Path,
    split: str,
    batch_size: int = 64,
    workers: int = 2,
    tta_flip: bool = False,
) -> SplitOutputs:
    """Run `loaded` over `data/<split>` (or `data` laid out by class); classes it does not know are an error."""
    folder = resolve_eval_folder(data, split)
    index = index_folder(folder, loaded.classes, name=split)
    if not index.samples:
        raise UserError(f"{folder}: no images to evaluate")
    pre = loaded.preprocess
    dataset = ImageFiles(index.samples, eval_transform(pre), decode_size(pre))
    loader = accelerator.prepare(make_loader(dataset, batch_size, workers))
    logits, targets, indices, errors = predict_batches(loaded.model, loader, accelerator, channels_last=True)
    flipped = None
    if tta_flip:
        mirrored = TransformedBatches(loader, lambda images: images.flip(-1))
        flipped = predict_batches(loaded.model, mirrored, accelerator, channels_last=True)[0]
    return SplitOutputs(folder, index, logits, targets, indices, errors, flipped)


def predict_folder(
    loaded: InferenceModel, accelerator: Any, folder: str | Path, batch_size: int = 64, workers: int = 2
):
    """Logits for every image under `folder` (any layout; no labels), and how many could not be read."""
    from clothcli.predict import collect_inputs

    found = collect_inputs([str(folder)])
    if found.missing or not found.files:
        raise UserError(f"{folder}: no images found")
    pre = loaded.preprocess
    dataset = ImageFiles([(path, 0) for path in found.files], eval_transform(pre), decode_size(pre))
    loader = accelerator.prepare(make_loader(dataset, batch_size, workers))
    logits, targets, _, errors = predict_batches(loaded.model, loader, accelerator, channels_last=True)
    return logits[targets != IGNORE_INDEX], len(errors)


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    split: str = "test",
    batch_size: int = 64,
    workers: int = 2,
    tta_flip: bool = False,
    mixed_precision: str = "auto",
    input_size: int | None = None,
    crop_pct: float | None = None,
    device: str | None = None,
    calibrated: bool = True,
    reliability_png: str | Path | None = None,
    ood: str | Path | None = None,
    ood_recall: float = 0.95,
) -> EvalReport:
    """The full classification report, calibration, and per-file predictions (for the errors list).

    `input_size` / `crop_pct` override the checkpoint's preprocessing, as timm's validate.py
    `--img-size` / `--crop-pct` do: a network trained with random-resized crops often scores higher
    when tested a little larger than it was trained ("FixRes" effect). Choose them on validation.
    Probabilities use the checkpoint's fitted temperature (`clothcli calibrate`) unless `calibrated`
    is False. With `ood`, a folder of images that belong to none of the classes, the report says how
    well the scores of `ood.py` tell the split's images from those.
    """
    accelerator = make_accelerator(mixed_precision, device=resolve_device(device))
    loaded = load_for_inference(
        checkpoint, accelerator.device, input_size=input_size, crop_pct=crop_pct, calibrated=calibrated
    )
    classes, pre, temperature = loaded.classes, loaded.preprocess, loaded.temperature
    out = predict_split(loaded, accelerator, data, split, batch_size, workers, tta_flip)
    probs = (out.logits / temperature).softmax(1)
    if out.flipped_logits is not None:
        probs = (probs + (out.flipped_logits / temperature).softmax(1)) / 2
    keep = out.targets != IGNORE_INDEX
    confidence, preds = probs.max(1)
    metrics = classification_report(preds[keep], out.targets[keep], classes)
    log_probs = probs[keep].clamp_min(1e-12).log()  # softmax of these is `probs`: calibration of what is shown
    if reliability_png is not None and keep.any():
        plot_reliability(log_probs, out.targets[keep], reliability_png)
    samples = out.index.samples
    files = []
    rows = zip(out.indices.tolist(), preds.tolist(), confidence.tolist(), out.targets.tolist(), keep.tolist())
    for i, p, c, t, k in rows:
        if k:
            files.append({"path": str(samples[i][0]), "true": classes[t], "predicted": classes[p], "confidence": c})
    separations = []
    if ood is not None:
        out_logits, _ = predict_folder(loaded, accelerator, ood, batch_size, workers)
        separations = [r.to_dict() for r in separation(out.logits[keep], out_logits, temperature, ood_recall)]
    accelerator.end_training()
    return EvalReport(
        **asdict(metrics),
        checkpoint=str(loaded.directory),
        arch=loaded.arch,
        folder=str(out.folder),
        split=split,
        tta_flip=tta_flip,
        preprocess=pre.to_dict(),
        temperature=temperature,
        calibration=calibration(log_probs, out.targets[keep]).to_dict() if keep.any() else {},
        ood=separations,
        files=files,
        unreadable=[{"path": str(samples[i][0]), "reason": r} for i, r in sorted(dict(out.errors).items())],
        skipped=[{"path": str(s.path), "reason": s.reason} for s in out.index.skipped],
    )
