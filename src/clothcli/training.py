"""Fine-tuning with HF Accelerate: one loop for CPU, one GPU and `accelerate launch`.

Reproducibility and exact resume rest on one rule: every epoch starts by reseeding all RNGs
(and, through the loader's `set_epoch`, the sampler's generator) from (seed, epoch), and each
sample drawn carries its own augmentation seed (`SeededDraws`), so epoch k does the same whether
or not the run was stopped before it, with any number of (persistent) workers. `last/` and
`state/` are written at each epoch end.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, set_seed
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn
from torch.utils.data import WeightedRandomSampler

from clothcli.checkpoint import save_checkpoint
from clothcli.config import Config, from_dict, save_config, to_dict
from clothcli.data.batch_augment import BatchAugment, TransformedBatches
from clothcli.data.layout import DatasetIndex, index_dataset
from clothcli.data.loading import (
    IGNORE_INDEX,
    CachedImages,
    ImageFiles,
    SeededDraws,
    crop_size,
    decode_size,
    eval_transform,
    make_loader,
    scale_size,
    sub_seed,
    tensor_eval_transform,
    tensor_train_transform,
    train_transform,
)
from clothcli.errors import UserError
from clothcli.io_utils import atomic_write_text, replace_dir
from clothcli.metrics import macro_f1
from clothcli.models import Preprocess, build_model, cpu_supports_bf16, resolve_preprocess

METRIC_FIELDS = [
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "val_f1",
    "lr",
    "seconds",
    "images_per_s",
    "data_wait",
    "val_seconds",
]
STATE_DIR = "state"
TRAINER_STATE = "trainer_state.json"


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


def resolve_precision(requested: str, device_type: str) -> str:
    """'auto' means bf16 where the hardware does it natively, else full precision."""
    if requested != "auto":
        return requested
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "no"


def make_accelerator(
    mixed_precision: str, grad_accum: int, cpu: bool, compile_backend: str | None = None
) -> Accelerator:
    """An Accelerator; a single-process caller may build several (tests, tune then train).

    With `compile_backend`, `prepare` wraps the model in torch.compile (Accelerate's dynamo plugin)."""
    if AcceleratorState._shared_state and AcceleratorState().num_processes == 1:
        AcceleratorState._reset_state()
    return Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        cpu=cpu,
        dataloader_config=DataLoaderConfiguration(even_batches=True, non_blocking=torch.cuda.is_available()),
        step_scheduler_with_optimizer=False,
        dynamo_backend=compile_backend or "no",
    )


def check_compile_backend(name: str | None) -> None:
    """UserError unless torch.compile knows backend `name` (checked before any work is done)."""
    if name is None:
        return
    import torch._dynamo

    if name not in torch._dynamo.list_backends(exclude_tags=()):
        usual = ", ".join(torch._dynamo.list_backends())  # without the debug and testing ones
        raise UserError(f"train.compile: unknown torch.compile backend '{name}' (e.g. {usual}; eager for debugging)")


def plain_model(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """The model without Accelerate's or torch.compile's wrappers: what EMA, SWA and checkpoints use."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def unique_run_dir(output_dir: Path, name: str) -> Path:
    candidate = output_dir / name
    suffix = 1
    while candidate.exists():
        suffix += 1
        candidate = output_dir / f"{name}-{suffix}"
    return candidate


def _loss_fn(cfg: Config, class_counts: list[int], device: torch.device) -> nn.Module:
    weight = None
    if cfg.train.imbalance == "loss":
        total, k = sum(class_counts), len(class_counts)
        weight = torch.tensor([total / (k * c) for c in class_counts], dtype=torch.float32, device=device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.train.label_smoothing, ignore_index=IGNORE_INDEX)


@dataclass
class _Data:
    index: DatasetIndex
    train_loader: Any
    val_loader: Any | None
    class_counts: list[int]
    augment_on_device: bool


def augment_on_device(cfg: Config, device_type: str) -> bool:
    """Whether colour jitter and normalisation run batched on the training device."""
    if cfg.data.augment_on == "device" and cfg.data.cache == "none":
        raise UserError("data.augment_on=device needs the decode cache (data.cache: auto, memory or disk)")
    if cfg.data.augment_on == "auto":
        return device_type == "cuda" and cfg.data.cache != "none"
    return cfg.data.augment_on == "device"


def _datasets(
    cfg: Config, index: DatasetIndex, pre: Preprocess, reporter: Reporter, on_device: bool
) -> tuple[Any, Any]:
    """Train and validation datasets: from the decode cache, or decoding files every epoch."""
    train = index.splits["train"]
    val = index.splits.get("validation")
    val_samples = val.samples if val is not None else []
    if cfg.data.cache == "none":
        return (
            ImageFiles(train.samples, train_transform(pre, cfg.augment), decode_size(pre, cfg.augment)),
            ImageFiles(val_samples, eval_transform(pre), decode_size(pre)) if val_samples else None,
        )
    from clothcli.data.cache import build_or_open

    out = []
    for name, samples, transform, short_side in (
        ("train", train.samples, tensor_train_transform(pre, cfg.augment, on_device), scale_size(pre, cfg.augment)),
        ("validation", val_samples, tensor_eval_transform(pre, uint8_out=on_device), scale_size(pre)),
    ):
        if not samples:
            out.append(None)
            continue
        start = time.perf_counter()
        images = build_or_open(
            [p for p, _ in samples],
            short_side,
            pre.interpolation,
            cfg.data.cache_dir,
            cfg.data.cache,
            workers=max(1, cfg.data.num_workers),
        )
        where = "in memory" if images.in_memory else "memory-mapped"
        reporter.message(
            f"decoded {name} images: {len(images)} at short side {short_side} px, "
            f"{images.nbytes / 2**20:.0f} MB {where} ({time.perf_counter() - start:.1f}s)"
        )
        out.append(CachedImages(images, [t for _, t in samples], transform))
    return out[0], out[1]


def _build_data(cfg: Config, index: DatasetIndex, pre: Preprocess, reporter: Reporter, device_type: str) -> _Data:
    train = index.splits["train"]
    counts = train.class_counts(len(index.classes))
    on_device = augment_on_device(cfg, device_type)
    train_ds, val_ds = _datasets(cfg, index, pre, reporter, on_device)
    generator = torch.Generator()
    if cfg.train.imbalance == "sampler":
        weights = [1.0 / counts[t] for t in train.targets]
        sampler = WeightedRandomSampler(weights, num_samples=len(weights), replacement=True, generator=generator)
    else:
        sampler = torch.utils.data.RandomSampler(train_ds, generator=generator)
    train_loader = make_loader(
        train_ds,
        cfg.train.batch_size,
        cfg.data.num_workers,
        sampler=SeededDraws(sampler, generator, cfg.train.seed),
        drop_last=len(train_ds) > cfg.train.batch_size,
    )
    val_loader = None
    if val_ds is not None:
        val_loader = make_loader(val_ds, cfg.train.eval_batch_size or cfg.train.batch_size, cfg.data.num_workers)
    return _Data(index, train_loader, val_loader, counts, on_device)


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
    data: _Data
    pre: Preprocess


def prepare(
    cfg: Config, reporter: Reporter | None = None, optimizer_lr: float | None = None, compile_model: bool = True
) -> Setup:
    """Index the data, build model, loaders, optimizer and loss, and hand them to Accelerate."""
    reporter = reporter or SilentReporter()
    check_compile_backend(cfg.train.compile)
    if not cfg.data.root:
        raise UserError("no dataset given: pass --data PATH (or set data.root in the config)")
    root = Path(cfg.data.root)
    if not root.exists() and cfg.data.download:
        from clothcli.data.download import download_dataset

        reporter.message(f"downloading the dataset into {root}")
        download_dataset(root)
    index = index_dataset(root)

    cpu = not torch.cuda.is_available()
    precision = resolve_precision(cfg.train.mixed_precision, "cpu" if cpu else "cuda")
    accelerator = make_accelerator(precision, cfg.train.grad_accum, cpu, cfg.train.compile if compile_model else None)
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
    data = _build_data(cfg, index, pre, reporter, accelerator.device.type)
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
    return Setup(accelerator, model, optimizer, train_loader, val_loader, loss_fn, channels_last, data, pre)


def predict_batches(
    model: nn.Module, loader: Any, accelerator: Accelerator, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    """Logits, targets and dataset indices over `loader`, gathered from all processes.

    gather_for_metrics drops the samples accelerate duplicated to even out the last batch.
    """
    model.eval()
    outputs, targets, indices, errors = [], [], [], []
    with torch.inference_mode():
        for images, target, index, errs in loader:
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with accelerator.autocast():
                logits = model(images)
            logits, target, index = accelerator.gather_for_metrics((logits.float(), target, index))
            outputs.append(logits.cpu())
            targets.append(target.cpu())
            indices.append(index.cpu())
            errors.extend((int(i), e) for i, e in zip(index.tolist(), errs) if e)
    if not outputs:
        empty = torch.empty(0)
        return empty, empty.long(), empty.long(), errors
    return torch.cat(outputs), torch.cat(targets), torch.cat(indices), errors


def validate(
    model: nn.Module, loader: Any, accelerator: Accelerator, channels_last: bool, num_classes: int
) -> dict[str, float]:
    logits, targets, _, _ = predict_batches(model, loader, accelerator, channels_last)
    keep = targets != IGNORE_INDEX
    logits, targets = logits[keep], targets[keep]
    if targets.numel() == 0:
        return {"val_loss": math.nan, "val_acc": math.nan, "val_f1": math.nan}
    preds = logits.argmax(1)
    return {
        "val_loss": float(nn.functional.cross_entropy(logits, targets)),
        "val_acc": float((preds == targets).float().mean()),
        "val_f1": macro_f1(preds, targets, num_classes),
    }


def _is_better(value: float, best: float | None, monitor: str) -> bool:
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best if monitor == "val_loss" else value > best


def _write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(run_dir / "metrics.csv", buffer.getvalue())


def train(
    cfg: Config,
    resume: str | Path | None = None,
    reporter: Reporter | None = None,
    run_dir: str | Path | None = None,
) -> TrainResult:
    """Train `cfg` (or continue the run at `resume`); returns the history and the best epoch."""
    reporter = reporter or SilentReporter()
    trainer_state: dict[str, Any] = {}
    if resume is not None:
        run_path = Path(resume)
        if not (run_path / STATE_DIR / TRAINER_STATE).is_file():
            raise UserError(f"{run_path}: nothing to resume (no {STATE_DIR}/{TRAINER_STATE})")
        import yaml

        cfg = from_dict(yaml.safe_load((run_path / "config.yaml").read_text()), str(run_path / "config.yaml"))
        trainer_state = json.loads((run_path / STATE_DIR / TRAINER_STATE).read_text())

    setup = prepare(cfg, reporter)
    accelerator, model, optimizer, train_loader = setup.accelerator, setup.model, setup.optimizer, setup.train_loader
    val_loader, loss_fn, channels_last, data, pre = (
        setup.val_loader,
        setup.loss_fn,
        setup.channels_last,
        setup.data,
        setup.pre,
    )
    index, num_classes = data.index, len(data.index.classes)
    if not accelerator.is_main_process:
        reporter = SilentReporter()
    sched_name = "step" if cfg.schedule.name == "step" else cfg.schedule.name
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=sched_name if sched_name != "none" else "constant",
        num_epochs=cfg.train.epochs,
        decay_epochs=cfg.schedule.decay_epochs,
        decay_rate=cfg.schedule.decay_rate,
        warmup_epochs=cfg.schedule.warmup_epochs,
        warmup_lr=cfg.schedule.warmup_lr,
        min_lr=cfg.schedule.min_lr,
    )

    unwrapped = plain_model(accelerator, model)
    ema = ModelEmaV3(unwrapped, decay=cfg.train.ema.decay) if cfg.train.ema.enabled else None
    swa_start = int(cfg.train.epochs * cfg.train.swa.start) if cfg.train.swa.enabled else None
    swa_model = AveragedModel(unwrapped) if cfg.train.swa.enabled else None
    for obj in (scheduler, ema, swa_model):
        if obj is not None:
            accelerator.register_for_checkpointing(obj)

    if resume is None:
        # The main process picks the folder and tells the others: each choosing its own free name
        # would give them different folders once the main one has created its folder.
        chosen = [str(Path(run_dir) if run_dir else unique_run_dir(Path(cfg.output_dir), cfg.name))]
        run_path = Path(broadcast_object_list(chosen, from_process=0)[0])
        if accelerator.is_main_process:
            run_path.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_path / "config.yaml")
        start_epoch, history, best, stale = 0, [], None, 0
    else:
        accelerator.load_state(str(run_path / STATE_DIR))
        start_epoch = trainer_state["epoch"] + 1
        history = trainer_state["history"]
        best = trainer_state["best"]
        stale = trainer_state["stale"]
        reporter.message(f"resuming {run_path} at epoch {start_epoch + 1}")

    meta_base = {
        "arch": cfg.model.name,
        "model_kwargs": dict(cfg.model.kwargs),
        "num_classes": num_classes,
        "classes": index.classes,
        "preprocess": pre.to_dict(),
        "config": to_dict(cfg),
    }
    unreadable: dict[int, str] = {}
    monitor = cfg.train.monitor
    stopped_early = False
    eval_model = ema.module if ema is not None else model
    compile_seconds: float | None = None
    if accelerator.num_processes > 1:
        reporter.message(
            f"{accelerator.num_processes} processes ({accelerator.distributed_type.value}): batch "
            f"{cfg.train.batch_size} per process, {cfg.train.batch_size * accelerator.num_processes} per step in all"
        )
    reporter.run_started(run_path)
    for epoch in range(start_epoch, cfg.train.epochs):
        set_seed(cfg.train.seed + epoch)
        train_loader.set_epoch(epoch)
        in_swa = swa_start is not None and epoch >= swa_start
        if in_swa and cfg.train.swa.lr:
            # A constant SWA learning rate (what SWALR settles to), set per epoch: stateless, so resume is exact.
            for group in optimizer.param_groups:
                group["lr"] = cfg.train.swa.lr
        row, first_step = _train_one_epoch(
            epoch,
            cfg,
            model,
            optimizer,
            train_loader,
            loss_fn,
            accelerator,
            ema,
            channels_last,
            reporter,
            unreadable,
        )
        if cfg.train.compile and compile_seconds is None and first_step is not None:
            compile_seconds = first_step
            reporter.message(
                f"torch.compile ({cfg.train.compile}): the first training step took {first_step:.1f}s, "
                f"compilation included (it is part of epoch {epoch + 1}'s time)"
            )
        if in_swa:
            swa_model.update_parameters(plain_model(accelerator, model))
        if not (in_swa and cfg.train.swa.lr):
            scheduler.step(epoch + 1)
        val_start = time.perf_counter()
        if val_loader is not None:
            row.update(validate(eval_model, val_loader, accelerator, channels_last, num_classes))
        else:
            row.update(val_loss=math.nan, val_acc=math.nan, val_f1=math.nan)
        row["val_seconds"] = round(time.perf_counter() - val_start, 2)
        history.append(row)
        improved = _is_better(row[monitor], best[monitor] if best else None, monitor)
        stale = 0 if improved else stale + 1
        if improved:
            best = {**row, "weights": "ema" if ema is not None else "model"}
        patience = cfg.train.early_stopping.patience
        stopped_early = patience is not None and stale >= patience and epoch + 1 < cfg.train.epochs
        accelerator.wait_for_everyone()
        _save_epoch(accelerator, run_path, eval_model, meta_base, row, monitor, improved, history)
        _save_state(accelerator, run_path, {"epoch": epoch, "history": history, "best": best, "stale": stale})
        reporter.epoch_end(row)
        if stopped_early:
            reporter.message(f"early stopping: {monitor} did not improve for {patience} epochs")
            break

    if swa_model is not None and swa_start is not None and len(history) > swa_start:
        reporter.message("SWA: recomputing batch-norm statistics over the training data")
        set_seed(cfg.train.seed + cfg.train.epochs)
        train_loader.set_epoch(cfg.train.epochs)
        with accelerator.autocast():
            update_bn(_images_only(train_loader, channels_last), swa_model, device=accelerator.device)
        metrics = (
            validate(swa_model.module, val_loader, accelerator, channels_last, num_classes)
            if val_loader is not None
            else {"val_loss": math.nan, "val_acc": math.nan, "val_f1": math.nan}
        )
        row = {
            "epoch": "swa",
            **{k: "" for k in METRIC_FIELDS[1:5]},
            **metrics,
            "lr": "",
            "seconds": "",
            "images_per_s": "",
            "data_wait": "",
            "val_seconds": "",
        }
        history.append(row)
        improved = _is_better(metrics[monitor], best[monitor] if best else None, monitor)
        if improved:
            best = {**row, "weights": "swa"}
        _save_epoch(
            accelerator, run_path, swa_model.module, meta_base, row, monitor, improved, history, also_last=False
        )
        if accelerator.is_main_process:
            save_checkpoint(
                swa_model.module, run_path / "swa", {**meta_base, "epoch": "swa", "metrics": _clean(metrics)}
            )
        reporter.epoch_end(row)

    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(
        run_path,
        history,
        best or {},
        stopped_early,
        [{"path": str(data.index.splits["train"].samples[i][0]), "reason": r} for i, r in sorted(unreadable.items())],
        compile_seconds,
        accelerator.is_main_process,
    )


def _images_only(loader: Any, channels_last: bool) -> Iterator[torch.Tensor]:
    for images, *_ in loader:
        yield images.contiguous(memory_format=torch.channels_last) if channels_last else images


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def training_step(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: Any,
    loss_fn: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    channels_last: bool,
    clip_grad: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, backward, clip and (when accumulation allows) step: shared by train and tune."""
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with accelerator.accumulate(model):
        with accelerator.autocast():
            logits = model(images)
            loss = loss_fn(logits.float(), targets)
        accelerator.backward(loss)
        if accelerator.sync_gradients and clip_grad:
            accelerator.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return logits, loss


def _train_one_epoch(
    epoch: int,
    cfg: Config,
    model: nn.Module,
    optimizer: Any,
    loader: Any,
    loss_fn: nn.Module,
    accelerator: Accelerator,
    ema: ModelEmaV3 | None,
    channels_last: bool,
    reporter: Reporter,
    unreadable: dict[int, str],
) -> tuple[dict[str, Any], float | None]:
    """One epoch's metrics row, and how long its first step took (the compile time, when compiling)."""
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
        logits, loss = training_step(
            accelerator, model, optimizer, loss_fn, images, targets, channels_last, cfg.train.clip_grad
        )
        if first_step_seconds is None:
            first_step_seconds = time.perf_counter() - step_start
        if ema is not None and accelerator.sync_gradients:
            ema.update(plain_model(accelerator, model))
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


def _save_epoch(
    accelerator: Accelerator,
    run_path: Path,
    model: nn.Module,
    meta_base: dict[str, Any],
    row: dict[str, Any],
    monitor: str,
    improved: bool,
    history: list[dict[str, Any]],
    also_last: bool = True,
) -> None:
    if not accelerator.is_main_process:
        return
    weights = plain_model(accelerator, model)
    meta = {
        **meta_base,
        "epoch": row["epoch"],
        "metric": {"name": monitor, "value": _clean(row).get(monitor)},
        "metrics": _clean({k: row[k] for k in ("val_loss", "val_acc", "val_f1") if k in row}),
    }
    if also_last:
        save_checkpoint(weights, run_path / "last", meta)
    if improved:
        save_checkpoint(weights, run_path / "best", meta)
    _write_metrics(run_path, history)


def _save_state(accelerator: Accelerator, run_path: Path, trainer_state: dict[str, Any]) -> None:
    """accelerate's full state (model, optimizer, scheduler, EMA, SWA, RNG) swapped in atomically."""
    staging = run_path / f".{STATE_DIR}.staging"
    accelerator.save_state(str(staging), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(staging / TRAINER_STATE, json.dumps(trainer_state, default=str))
        replace_dir(staging, run_path / STATE_DIR)
    accelerator.wait_for_everyone()
