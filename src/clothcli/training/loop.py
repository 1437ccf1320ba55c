"""Fine-tuning with HF Accelerate: one loop for CPU, one GPU and `accelerate launch`.

`train` reads top to bottom: open (or resume) the run, set up, run the epochs, finish SWA.
Reproducibility and exact resume rest on one rule: every epoch starts by reseeding all RNGs
(and, through the loader's `set_epoch`, the sampler's generator) from (seed, epoch), and each
sample drawn carries its own augmentation seed (`SeededDraws`), so epoch k does the same whether
or not the run was stopped before it, with any number of (persistent) workers. `last/` and
`state/` are written at each epoch end (`run_folder`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

from clothcli.config import Config, save_config
from clothcli.data.loading import IGNORE_INDEX
from clothcli.data.sources import Source, dataset_root, split_rows
from clothcli.data.splits import SPLITS_FILE, splits_csv
from clothcli.io_utils import atomic_write_text
from clothcli.models.checkpoint import save_checkpoint
from clothcli.models.fusion import fuse_batchnorm
from clothcli.runtime import describe_hardware, plain_model, resolve_device
from clothcli.training.distill import teacher_seconds
from clothcli.training.format_choice import cache_path as format_cache_path
from clothcli.training.format_choice import resolve_auto_format
from clothcli.training.run_folder import (
    CONFIG_FILE,
    TrainerState,
    checkpoint_meta,
    create_run_dir,
    disk_full_is_a_user_error,
    load_state,
    metrics_row,
    read_resume_point,
    save_epoch,
    save_state,
    without_nan,
)
from clothcli.training.setup import (
    NO_VALIDATION,
    Reporter,
    Setup,
    SilentReporter,
    is_better,
    open_training_data,
    prepare,
    training_step,
    validate,
)
from clothcli.training.tracking import flush as flush_trackers
from clothcli.training.tracking import numeric, start_tracking


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict[str, Any]]
    best: dict[str, Any]
    stopped_early: bool = False
    unreadable: list[dict[str, str]] = field(default_factory=list)
    # with train.compile: the first training step, which includes compiling the model
    compile_seconds: float | None = None
    # False in the other processes of a distributed run, which leave reporting to the main one
    main_process: bool = True
    # train.time_limit ended the run before its last epoch
    stopped_by_time: bool = False


def train(
    cfg: Config | None,
    resume: str | Path | None = None,
    reporter: Reporter | None = None,
    run_dir: str | Path | None = None,
) -> TrainResult:
    """Train `cfg` (or continue the run at `resume`); returns the history and the best epoch."""
    reporter = reporter or SilentReporter()
    point = read_resume_point(resume) if resume is not None else None
    if point is not None:
        cfg = point.config
    assert cfg is not None, "train() needs a config or a run to resume"
    source = open_training_data(cfg, reporter)
    if point is None:  # a resumed run's config holds the choice made when it started
        cfg, choice = resolve_auto_format(cfg, resolve_device().type)
        if choice is not None:
            speeds = ", ".join(f"{label} {speed:.0f}" for label, speed in choice.images_per_s.items())
            where = "measured before on this host" if choice.cached else "measured now on this host"
            reporter.message(f"precision and memory format: {choice.chosen.label} ({choice.reason}; images/s {speeds}, "
                             f"{where}: {format_cache_path()})")  # fmt: skip
    setup = prepare(cfg, reporter, source=source)
    accelerator = setup.accelerator
    if not accelerator.is_main_process:
        reporter = SilentReporter()
    loop = _Loop(cfg, setup, reporter)
    if point is None:
        loop.run_path = _open_run(cfg, accelerator, run_dir, setup.source)
        start_tracking(accelerator, cfg, loop.run_path, resume_step=None)
    else:
        loop.run_path, loop.state = Path(resume), point.state
        load_state(accelerator, loop.run_path, loop.averaged, loop.scheduler)
        start_tracking(accelerator, cfg, loop.run_path, resume_step=loop.updates_done(loop.state.epoch))
        reporter.message(f"resuming {loop.run_path} at epoch {loop.state.epoch + 2}")
    if accelerator.num_processes > 1:
        reporter.message(
            f"{accelerator.num_processes} processes ({accelerator.distributed_type.value}): batch "
            f"{cfg.train.batch_size} per process, {cfg.train.batch_size * accelerator.num_processes} per step in all"
        )
    reporter.run_started(loop.run_path)
    stopped_early = stopped_by_time = False
    for epoch in range(loop.state.epoch + 1, cfg.train.epochs):
        if cfg.train.time_limit is not None:  # the main process decides, so every process stops together
            over = [accelerator.is_main_process and over_time_limit(
                loop.state.history, cfg.train.time_limit, epoch, cfg.train.epochs, reporter)]  # fmt: skip
            if broadcast_object_list(over, from_process=0)[0]:
                stopped_by_time = True
                break
        stopped_early = loop.run_epoch(epoch)
        if stopped_early:
            break
    loop.finish_swa()
    accelerator.wait_for_everyone()
    if loop.state.best:
        accelerator.log(numeric(loop.state.best, "best"), step=loop.updates_done(loop.state.epoch))
    accelerator.end_training()
    train_samples = setup.data.index.splits["train"].samples
    return TrainResult(
        loop.run_path,
        loop.state.history,
        loop.state.best or {},
        stopped_early,
        [{"path": str(train_samples[i][0]), "reason": r} for i, r in sorted(loop.unreadable.items())],
        loop.compile_seconds,
        accelerator.is_main_process,
        stopped_by_time,
    )


def over_time_limit(
    history: list[dict[str, Any]], limit_min: float | None, epoch: int, epochs: int, reporter: Reporter
) -> bool:
    """True (and says so) when the epochs so far plus one more of their mean length would pass
    `limit_min` minutes (as Ultralytics' `time=`; the schedule is not compressed to fit)."""
    done = [row for row in history if row.get("epoch") != "swa"]
    if limit_min is None or not done:
        return False
    lengths = [float(row.get("seconds", 0)) + float(row.get("val_seconds", 0)) for row in done]
    spent, predicted = sum(lengths), sum(lengths) + sum(lengths) / len(lengths)
    if predicted <= limit_min * 60:
        return False
    reporter.message(
        f"time limit: stopped before epoch {epoch + 1} of {epochs} ({spent / 60:.1f} min spent, one more epoch "
        f"would end at {predicted / 60:.1f} min, past the {limit_min:g} min limit); the schedule was not "
        f"compressed, so the learning rate had not finished its decay"
    )
    return True


def _open_run(cfg: Config, accelerator: Accelerator, run_dir: str | Path | None, source: Source | None) -> Path:
    """Create the run folder and record the config. The main process creates the folder and tells the
    others its name: each choosing its own free name would give them different folders."""
    chosen = [""]
    if accelerator.is_main_process:
        if run_dir:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            chosen = [str(run_dir)]
        else:
            chosen = [str(create_run_dir(Path(cfg.output_dir), cfg.name))]
    run_path = Path(broadcast_object_list(chosen, from_process=0)[0])
    if accelerator.is_main_process:
        save_config(cfg, run_path / CONFIG_FILE)
        if source is not None:  # the images each split held, so evaluate and compare use the same ones
            atomic_write_text(run_path / SPLITS_FILE, splits_csv(split_rows(source), dataset_root(cfg.data.root)))
    return run_path


class _Loop:
    """The per-epoch work of one run: schedule, averaged weights (EMA, SWA), validation, checkpoints."""

    def __init__(self, cfg: Config, setup: Setup, reporter: Reporter):
        self.cfg, self.setup, self.reporter = cfg, setup, reporter
        self.run_path = Path()
        self.state = TrainerState()
        self.unreadable: dict[int, str] = {}
        self.compile_seconds: float | None = None
        self.num_classes = len(setup.data.index.classes)
        self.meta_base = checkpoint_meta(cfg, setup.data.index.classes, setup.pre)
        self.meta_base["trained_on"] = describe_hardware(setup.accelerator)
        # Per optimizer step, as timm's --sched-on-updates: a one-epoch warm-up then climbs within that
        # epoch instead of spending it all at warmup_lr. accelerate syncs on a loader's last batch too.
        self.updates_per_epoch = math.ceil(len(setup.train_loader) / cfg.train.grad_accum)
        self.scheduler, _ = create_scheduler_v2(
            setup.optimizer,
            sched=cfg.schedule.name if cfg.schedule.name != "none" else "constant",
            num_epochs=cfg.train.epochs,
            decay_epochs=cfg.schedule.decay_epochs,
            decay_rate=cfg.schedule.decay_rate,
            warmup_epochs=cfg.schedule.warmup_epochs,
            warmup_lr=cfg.schedule.warmup_lr,
            min_lr=cfg.schedule.min_lr,
            step_on_epochs=False,
            updates_per_epoch=self.updates_per_epoch,
        )
        unwrapped = plain_model(setup.accelerator, setup.model)
        self.ema = ModelEmaV3(unwrapped, decay=cfg.train.ema.decay) if cfg.train.ema.enabled else None
        swa = cfg.train.swa
        self.swa_start = int(cfg.train.epochs * swa.start) if swa.enabled else None
        self.swa_model = AveragedModel(unwrapped) if swa.enabled else None
        # the EMA and SWA models live beside accelerate's state as safetensors (`run_folder.save_state`)
        self.averaged = {name: m for name, m in (("ema", self.ema), ("swa", self.swa_model)) if m is not None}
        self.eval_model = self.ema.module if self.ema is not None else setup.model

    def updates_done(self, epoch: int) -> int:
        """Optimizer updates at the end of epoch `epoch` (0-based): the step axis of every tracker."""
        return (epoch + 1) * self.updates_per_epoch

    def _validate(self, model: nn.Module) -> dict[str, float]:
        s = self.setup
        if s.val_loader is None:
            return dict(NO_VALIDATION)
        return validate(self._folded(model), s.val_loader, s.accelerator, s.channels_last, self.num_classes)

    def _folded(self, model: nn.Module) -> nn.Module:
        """A copy of `model` with each batch norm folded into its convolution, as `evaluate` and `predict` run
        a checkpoint: validation measures what they will, and on a CPU runs faster (EfficientNet-Lite0's 341
        images in 3.1 s instead of 3.6). Never compiled, so a compiled run does not compile an eval graph too."""
        s = self.setup
        size = s.pre.input_size
        sample = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(s.accelerator.device)
        if s.channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        return fuse_batchnorm(plain_model(s.accelerator, model), sample)[0]

    def _record(self, row: dict[str, Any], weights: str) -> bool:
        """Append `row` to the history and keep it as the best if the monitored metric improved."""
        monitor, state = self.cfg.train.monitor, self.state
        state.history.append(row)
        improved = is_better(row[monitor], state.best[monitor] if state.best else None, monitor)
        if improved:
            state.best = {**row, "weights": weights}
        return improved

    def run_epoch(self, epoch: int) -> bool:
        """Train, validate and save one epoch; True when early stopping ends the run here."""
        cfg, s, state = self.cfg, self.setup, self.state
        set_seed(cfg.train.seed + epoch)
        s.train_loader.set_epoch(epoch)
        in_swa = self.swa_start is not None and epoch >= self.swa_start
        if in_swa and cfg.train.swa.lr:
            # A constant SWA learning rate (what SWALR settles to), set per epoch: stateless, so resume is exact.
            for group in s.optimizer.param_groups:
                group["lr"] = cfg.train.swa.lr
        scheduler = None if in_swa and cfg.train.swa.lr else self.scheduler
        teacher_before = teacher_seconds(s.task)
        row, first_step = _train_one_epoch(
            epoch, cfg, s, self.ema, scheduler, self.updates_done(epoch - 1), self.reporter, self.unreadable
        )
        if s.distilling:
            row["teacher_seconds"] = round(teacher_seconds(s.task) - teacher_before, 3)
            self.reporter.message(f"teacher: {row['teacher_seconds']:.1f}s of the epoch's {row['seconds']:.1f}s")
        if cfg.train.compile and self.compile_seconds is None and first_step is not None:
            self.compile_seconds = first_step
            self.reporter.message(
                f"torch.compile ({cfg.train.compile}): the first training step took {first_step:.1f}s, "
                f"compilation included (it is part of epoch {epoch + 1}'s time)"
            )
        if in_swa:
            self.swa_model.update_parameters(plain_model(s.accelerator, s.model))
        val_start = time.perf_counter()
        row.update(self._validate(self.eval_model))
        row["val_seconds"] = round(time.perf_counter() - val_start, 2)
        improved = self._record(row, "ema" if self.ema is not None else "model")
        state.stale = 0 if improved else state.stale + 1
        state.epoch = epoch
        patience = cfg.train.early_stopping.patience
        stop = patience is not None and state.stale >= patience and epoch + 1 < cfg.train.epochs
        s.accelerator.wait_for_everyone()
        monitor = cfg.train.monitor
        s.accelerator.log(numeric(row, "epoch"), step=self.updates_done(epoch))
        flush_trackers(s.accelerator)
        with disk_full_is_a_user_error(self.run_path, f"epoch {epoch + 1}"):
            save_epoch(
                s.accelerator, self.run_path, self.eval_model, self.meta_base, row, monitor, improved, state.history
            )
            save_state(s.accelerator, self.run_path, state, self.averaged, self.scheduler)
        self.reporter.epoch_end(row)
        if stop:
            self.reporter.message(f"early stopping: {monitor} did not improve for {patience} epochs")
        return stop

    def finish_swa(self) -> None:
        """Recompute the SWA model's batch-norm statistics, validate it, and save it to swa/."""
        cfg, s = self.cfg, self.setup
        if self.swa_model is None or self.swa_start is None or len(self.state.history) <= self.swa_start:
            return
        self.reporter.message("SWA: recomputing batch-norm statistics over the training data")
        set_seed(cfg.train.seed + cfg.train.epochs)
        s.train_loader.set_epoch(cfg.train.epochs)
        with s.accelerator.autocast():
            update_bn(_images_only(s.train_loader, s.channels_last), self.swa_model, device=s.accelerator.device)
        metrics = self._validate(self.swa_model.module)
        row = metrics_row(epoch="swa", **metrics)
        improved = self._record(row, "swa")
        s.accelerator.log(numeric(metrics, "swa"), step=self.updates_done(cfg.train.epochs - 1))
        flush_trackers(s.accelerator)
        monitor, model = cfg.train.monitor, self.swa_model.module
        with disk_full_is_a_user_error(self.run_path, "the SWA model"):
            save_epoch(
                s.accelerator, self.run_path, model, self.meta_base, row, monitor, improved, self.state.history,
                also_last=False,
            )  # fmt: skip
            if s.accelerator.is_main_process:
                meta = {**self.meta_base, "epoch": "swa", "metrics": without_nan(metrics)}
                save_checkpoint(model, self.run_path / "swa", meta)
        self.reporter.epoch_end(row)


def _images_only(loader: Any, channels_last: bool) -> Iterator[torch.Tensor]:
    for images, *_ in loader:
        yield images.contiguous(memory_format=torch.channels_last) if channels_last else images


def _train_one_epoch(
    epoch: int,
    cfg: Config,
    setup: Setup,
    ema: ModelEmaV3 | None,
    scheduler: Scheduler | None,
    updates: int,
    reporter: Reporter,
    unreadable: dict[int, str],
) -> tuple[dict[str, Any], float | None]:
    """One epoch's metrics row, and how long its first step took (the compile time, when compiling).

    `updates` counts the optimizer updates before this epoch: the scheduler's position and the
    trackers' step. A None `scheduler` keeps the learning rate as it is (SWA's constant rate)."""
    model, optimizer, loader, accelerator = setup.model, setup.optimizer, setup.train_loader, setup.accelerator
    model.train()
    reporter.epoch_start(epoch, cfg.train.epochs, len(loader))
    loss_sum = torch.zeros((), device=accelerator.device)
    correct = torch.zeros((), device=accelerator.device)
    seen = torch.zeros((), device=accelerator.device)
    wait = 0.0
    first_step_seconds: float | None = None
    start = time.perf_counter()
    mark = start
    for step, (images, targets, indices, errors) in enumerate(loader, 1):
        wait += time.perf_counter() - mark
        for i, e in zip(indices.tolist(), errors):
            if e:
                unreadable[i] = e
        step_start = time.perf_counter()
        logits, loss, targets = training_step(setup, images, targets, cfg.train.clip_grad)
        if first_step_seconds is None:
            first_step_seconds = time.perf_counter() - step_start
        if accelerator.sync_gradients:
            updates += 1
            if ema is not None:
                ema.update(plain_model(accelerator, model))
            if updates % cfg.train.log_every == 0:
                step_lr = optimizer.param_groups[0]["lr"]  # the rate this update used
                accelerator.log({"step/train_loss": float(loss.detach()), "step/lr": step_lr}, step=updates)
            if scheduler is not None:
                scheduler.step_update(updates)
        valid = targets != IGNORE_INDEX
        n = valid.sum()
        loss_sum += loss.detach() * n
        correct += (logits.detach().argmax(1) == targets)[valid].sum()
        seen += n
        elapsed = time.perf_counter() - start
        if step % 5 == 0 or step == len(loader):
            count = max(float(seen), 1.0)
            reporter.step(
                step,
                float(loss_sum) / count,
                float(correct) / count,
                optimizer.param_groups[0]["lr"],
                float(seen) * accelerator.num_processes / elapsed,
            )
        mark = time.perf_counter()
    totals = accelerator.reduce(torch.stack([loss_sum, correct, seen]), reduction="sum")
    seconds = time.perf_counter() - start
    count = max(float(totals[2]), 1.0)
    return {
        "epoch": epoch + 1,
        "train_loss": float(totals[0]) / count,
        "train_acc": float(totals[1]) / count,
        "lr": optimizer.param_groups[0]["lr"],
        "seconds": round(seconds, 2),
        "images_per_s": round(float(totals[2]) / seconds, 1),
        "data_wait": round(wait / seconds, 3),
    }, first_step_seconds
