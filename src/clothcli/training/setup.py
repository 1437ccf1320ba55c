"""What a training step needs, built one way for `train` and `tune`: the data, the model (with its
starting weights and preprocessing), the optimizer and the loss, handed to Accelerate; and the step."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.optim import create_optimizer_v2
from timm.task import ClassificationTask
from torch import nn
from torchmetrics.functional.classification import multiclass_f1_score

from clothcli.config import Config
from clothcli.data.batch_augment import BatchAugment, TransformedBatches
from clothcli.data.loading import IGNORE_INDEX, crop_size, sub_seed
from clothcli.data.pipeline import TrainingData, build_training_data
from clothcli.data.preprocess import Preprocess
from clothcli.data.sources import Source, describe_split, open_dataset
from clothcli.data.worker_server import start_worker_server
from clothcli.errors import UserError
from clothcli.models.build import build_model, check_model_config, resolve_preprocess
from clothcli.runtime import check_compile_backend, make_accelerator, predict_batches, resolve_device
from clothcli.training.distill import ResizedStudent, distillation_task, load_teacher, view_size
from clothcli.training.tracking import check_trackers, tracker_names

NO_VALIDATION = {"val_loss": math.nan, "val_acc": math.nan, "val_f1": math.nan}


class Reporter(Protocol):
    """What the training loop tells its caller (the CLI renders it; tests may ignore it)."""

    def message(self, text: str) -> None: ...
    def run_started(self, run_dir: Path) -> None: ...
    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self, done: int, loss: float, acc: float, lr: float, images_per_s: float) -> None: ...
    def epoch_end(self, row: dict[str, Any]) -> None: ...


class SilentReporter:
    def message(self, text: str) -> None:
        pass

    def run_started(self, run_dir: Path) -> None:
        pass

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        pass

    def step(self, done: int, loss: float, acc: float, lr: float, images_per_s: float) -> None:
        pass

    def epoch_end(self, row: dict[str, Any]) -> None:
        pass


def _loss_fn(cfg: Config, class_counts: list[int], device: torch.device) -> nn.Module:
    weight = None
    if cfg.train.imbalance == "loss":
        total, k = sum(class_counts), len(class_counts)
        weight = torch.tensor([total / (k * c) for c in class_counts], dtype=torch.float32, device=device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.train.label_smoothing, ignore_index=IGNORE_INDEX)


@dataclass
class Setup:
    """Everything a training step needs, built one way for `train` and `tune`."""

    accelerator: Accelerator
    model: nn.Module
    optimizer: Any
    train_loader: Any
    val_loader: Any | None
    loss_fn: nn.Module
    channels_last: bool
    data: TrainingData
    pre: Preprocess
    # timm's task around `model`: its forward gives the logits and the loss. ClassificationTask, or
    # with distill.teacher LogitDistillationTask (the teacher is not trained)
    task: nn.Module
    # with augment.mixup or augment.cutmix: timm's Mixup, applied to each training batch
    mix: Any | None = None
    # the dataset as found; its split when it was made here (written to the run folder as splits.csv)
    source: Source | None = None

    @property
    def distilling(self) -> bool:
        return not isinstance(self.task, ClassificationTask)


def _open_data(cfg: Config, reporter: Reporter) -> Source:
    """The dataset (downloaded first when asked), and what was decided about its splits, said."""
    if not cfg.data.root:
        raise UserError("no dataset given: pass --data PATH (or set data.root in the config)")
    root = Path(cfg.data.root)
    if not root.exists() and cfg.data.download:
        from clothcli.data.download import download_dataset

        reporter.message(f"downloading the dataset into {root}")
        download_dataset(root)
    source = open_dataset(root, cfg.data, workers=max(1, cfg.data.num_workers))
    if source.plan is not None:
        reporter.message(describe_split(source.plan, source.index, cfg.data.split.seed))
    if cfg.data.folds is not None:
        from clothcli.data.folds import hold_out_fold

        folds, fold = cfg.data.folds, cfg.data.fold
        index = hold_out_fold(source.index, folds, fold, cfg.data.split.seed, max(1, cfg.data.num_workers))
        source = Source(index, source.plan, source.bad_rows)
        held, kept = len(index.splits["validation"].samples), len(index.splits["train"].samples)
        reporter.message(f"fold {fold + 1} of {folds} held out as validation: {held} images, {kept} train")
    if "validation" not in source.index.splits:
        reporter.message(
            "warning: no validation images: no best/ checkpoint will be chosen (give a validation/ split, "
            "or set data.split.carve_validation=true to carve one out of train)"
        )
    return source


def open_training_data(cfg: Config, reporter: Reporter | None = None) -> Source:
    """The checks that need no built model (name, weights file, compile backend, trackers), then the
    dataset: what can fail in a second fails before anything is measured or built."""
    check_model_config(cfg.model)
    check_compile_backend(cfg.train.compile)
    check_trackers(cfg)
    return _open_data(cfg, reporter or SilentReporter())


def prepare(
    cfg: Config,
    reporter: Reporter | None = None,
    optimizer_lr: float | None = None,
    compile_model: bool = True,
    source: Source | None = None,
) -> Setup:
    """Index the data (unless `source` is given: `open_training_data`), build model, loaders, optimizer and
    loss, and hand them to Accelerate."""
    reporter = reporter or SilentReporter()
    source = source or open_training_data(cfg, reporter)
    index = source.index
    start_worker_server(cfg.data.num_workers)

    accelerator = make_accelerator(
        cfg.train.mixed_precision,
        cfg.train.grad_accum,
        resolve_device(),
        cfg.train.compile if compile_model else None,
        log_with=tracker_names(cfg),
        project_dir=cfg.output_dir,
    )
    if not accelerator.is_main_process:
        reporter = SilentReporter()
    channels_last = cfg.train.channels_last if cfg.train.channels_last is not None else True
    for warning in index.warnings:
        reporter.message(f"warning: {warning}")

    set_seed(cfg.train.seed)
    model = build_model(cfg.model, len(index.classes))
    pre = resolve_preprocess(model, cfg.preprocess)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_crop = crop_size(pre, cfg.augment)
    if train_crop != pre.input_size:
        reporter.message(f"training on {train_crop} px crops; validation and the checkpoint use {pre.input_size} px")
    teacher, data_cfg = None, cfg
    if cfg.distill.teacher:
        teacher, loaded = load_teacher(cfg, list(index.classes), pre, accelerator.device)
        views = view_size(cfg, train_crop, teacher.model.views)
        # the loaders draw the shared views at their side; the student gets them resized to train_crop
        data_cfg = replace(cfg, augment=replace(cfg.augment, crop_size=views))
        members = ", ".join(
            f"{t.directory} ({t.arch} at {view.input_size} px)" for t, view in zip(loaded, teacher.model.views)
        )
        reporter.message(
            f"distilling from {members}: alpha {cfg.distill.alpha}, temperature {cfg.distill.temperature}, "
            f"views drawn at {views} px"
        )
    data = build_training_data(data_cfg, index, pre, reporter, accelerator.device.type)
    optimizer = create_optimizer_v2(
        model,
        opt=cfg.optim.name,
        lr=optimizer_lr or cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        momentum=cfg.optim.momentum,
    )
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, data.train_loader)
    val_loader = accelerator.prepare(data.val_loader) if data.val_loader is not None else None
    if data.augment_on_device:
        # each process jitters its own share of the batch differently
        jitter_seed = sub_seed(cfg.train.seed, accelerator.process_index)
        train_loader = TransformedBatches(
            train_loader, BatchAugment(pre.mean, pre.std, cfg.augment.color_jitter, jitter_seed)
        )
        if val_loader is not None:
            val_loader = TransformedBatches(val_loader, BatchAugment(pre.mean, pre.std))
    loss_fn = _loss_fn(cfg, data.class_counts, accelerator.device)
    if teacher is not None:
        student = ResizedStudent(model, train_crop, pre, channels_last)
        task = distillation_task(cfg, student, teacher, loss_fn, accelerator.device)
    else:
        task = ClassificationTask(model, criterion=FloatLoss(loss_fn), verbose=False)
    mix = _mixer(cfg, len(index.classes))
    return Setup(
        accelerator, model, optimizer, train_loader, val_loader, loss_fn, channels_last, data, pre, task, mix, source
    )


class FloatLoss(nn.Module):
    """The loss on float32 logits: under bf16 autocast the model's logits are bf16, and the loss of
    those would round away what label smoothing and small margins contribute."""

    def __init__(self, loss_fn: nn.Module):
        super().__init__()
        self.loss_fn = loss_fn

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(logits.float(), targets)


def _mixer(cfg: Config, num_classes: int) -> Any | None:
    """timm's Mixup for `augment.mixup`/`augment.cutmix`, or None when both are 0. Label smoothing stays
    with the loss (cross-entropy smooths soft targets too)."""
    aug = cfg.augment
    if not aug.mixup and not aug.cutmix:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mix_prob, label_smoothing=0.0, num_classes=num_classes
    )


def mix_batch(mix: Any, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed images and their soft targets; unreadable images (IGNORE_INDEX) are left out first, and
    the last image too when that leaves an odd number (timm mixes each image with its mirror in the batch)."""
    keep = (targets != IGNORE_INDEX).nonzero().flatten()
    keep = keep[: len(keep) - len(keep) % 2]
    if len(keep) < len(targets):
        images, targets = images[keep], targets[keep]
    if not len(targets):
        return images, targets.new_zeros((0, mix.num_classes), dtype=torch.float32)
    return mix(images, targets)


def validate(
    model: nn.Module, loader: Any, accelerator: Accelerator, channels_last: bool, num_classes: int
) -> dict[str, float]:
    logits, targets, _, _ = predict_batches(model, loader, accelerator, channels_last)
    keep = targets != IGNORE_INDEX
    logits, targets = logits[keep], targets[keep]
    if targets.numel() == 0:
        return dict(NO_VALIDATION)
    preds = logits.argmax(1)
    return {
        "val_loss": float(nn.functional.cross_entropy(logits, targets)),
        "val_acc": float((preds == targets).float().mean()),
        "val_f1": float(multiclass_f1_score(preds, targets, num_classes=num_classes, average="macro", zero_division=0)),
    }


def is_better(value: float, best: float | None, monitor: str) -> bool:
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best if monitor == "val_loss" else value > best


def training_step(
    setup: Setup, images: torch.Tensor, targets: torch.Tensor, clip_grad: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward through the setup's timm task, backward, clip and (when accumulation allows) step: the one
    step of train, the learning-rate range test and the speed search. With a distillation task the loss
    includes the teacher's term; with `setup.mix` (timm's Mixup) the batch is mixed first and the
    teacher sees the mixed images.

    Returns the logits, the loss and the class each row of the logits counts as for training accuracy
    (under mixing, the image with the larger weight)."""
    accelerator, model = setup.accelerator, setup.model
    if setup.mix is not None:
        images, soft = mix_batch(setup.mix, images, targets)
        targets, counted = soft, soft.argmax(1)
    else:
        counted = targets
    if setup.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with accelerator.accumulate(model):
        with accelerator.autocast():
            out = setup.task(images, targets)
            logits, loss = out["output"], out["loss"]
        accelerator.backward(loss)
        if accelerator.sync_gradients and clip_grad:
            accelerator.clip_grad_norm_(model.parameters(), clip_grad)
        setup.optimizer.step()
        setup.optimizer.zero_grad(set_to_none=True)
    return logits, loss, counted
