"""`tune`: which precision and memory format train fastest, Leslie Smith's learning-rate range test,
and a batch-size search.

All three reuse `training.prepare` and `training.training_step`, so they see exactly the model, data,
augmentation, precision and optimizer that `train` would. The range test restores the model,
optimizer and RNG states afterwards: tuning changes a following `train` only through the value
it writes.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clothcli.config import Config, load_config
from clothcli.errors import UserError
from clothcli.training import Reporter, SilentReporter, plain_model, prepare, resolve_precision, training_step

DEFAULT_SUGGESTION = "valley"


@dataclass
class RangeTest:
    lrs: list[float]
    losses: list[float]  # smoothed, bias-corrected
    raw_losses: list[float]
    suggestions: dict[str, float]
    default: str
    stopped_early: bool
    seconds: float
    batch_size: int

    @property
    def suggested_lr(self) -> float:
        return self.suggestions[self.default]

    def to_dict(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in ("lrs", "losses", "raw_losses", "suggestions", "default", "stopped_early", "seconds", "batch_size")
        } | {"suggested_lr": self.suggested_lr}


def steepest(lrs: list[float], losses: list[float], skip_begin: int = 10, skip_end: int = 5) -> float:
    """LR where the smoothed loss falls fastest against log LR (Lightning's suggestion)."""
    lo, hi = min(skip_begin, len(lrs) // 4), max(len(lrs) - skip_end, len(lrs) // 2 + 1)
    grads = np.gradient(np.array(losses[lo:hi]), np.log10(np.array(lrs[lo:hi])))
    return lrs[lo + int(np.argmin(grads))]


def valley(lrs: list[float], losses: list[float], plateau: float = 0.05) -> float:
    """fastai's 'valley': the middle of the longest descending stretch of the loss curve.

    Two guards fastai's version lacks. Only the part of the curve before the minimum counts (past it the
    loss is diverging). And the initial plateau is cut off: with a zero-initialised head the loss creeps
    down by 1e-5 per step at tiny learning rates, and that creep would otherwise be the "longest
    descending stretch" (on the clothing data it made valley suggest 1.7e-4 instead of ~1e-2). The
    curve starts where the loss has fallen by `plateau` of its total drop.
    """
    bottom = int(np.argmin(losses))
    drop = losses[0] - losses[bottom]
    begin = next((i for i in range(bottom + 1) if losses[0] - losses[i] >= plateau * drop), 0)
    window = losses[begin : bottom + 1]
    n = len(window)
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if window[i] < window[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return lrs[begin + max_start + int(sections) + int(sections / 2)]


def min_loss_over_10(lrs: list[float], losses: list[float]) -> float:
    return lrs[int(np.argmin(losses))] / 10


def suggest(lrs: list[float], losses: list[float]) -> dict[str, float]:
    return {
        "valley": valley(lrs, losses),
        "steepest": steepest(lrs, losses),
        "min_loss/10": min_loss_over_10(lrs, losses),
    }


def _rng_state() -> tuple:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _restore_rng(state: tuple) -> None:
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


def lr_range_test(
    cfg: Config,
    min_lr: float = 1e-7,
    max_lr: float = 10.0,
    steps: int = 100,
    beta: float = 0.98,
    diverge: float = 4.0,
    reporter: Reporter | None = None,
    setup: Any = None,
) -> RangeTest:
    """Exponentially increasing LR over `steps` optimizer steps; smoothed loss; stop on divergence."""
    if not 0 < min_lr < max_lr:
        raise UserError(f"need 0 < --min-lr < --max-lr, got {min_lr} and {max_lr}")
    if steps < 10:
        raise UserError(f"--steps must be at least 10, got {steps}")
    reporter = reporter or SilentReporter()
    setup = setup or prepare(cfg, reporter, compile_model=False)
    model, optimizer = setup.model, setup.optimizer
    saved_model = copy.deepcopy(plain_model(setup.accelerator, model).state_dict())
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    saved_rng = _rng_state()
    lrs: list[float] = []
    losses: list[float] = []
    raw: list[float] = []
    avg, best = 0.0, math.inf
    stopped = False
    start = time.perf_counter()
    ratio = (max_lr / min_lr) ** (1 / (steps - 1))
    model.train()
    reporter.epoch_start(0, 1, steps)
    try:
        batches = _cycle(setup.train_loader)
        for step in range(steps):
            lr = min_lr * ratio**step
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, targets, _, _ = next(batches)
            _, loss = training_step(
                setup.accelerator,
                model,
                optimizer,
                setup.loss_fn,
                images,
                targets,
                setup.channels_last,
                cfg.train.clip_grad,
            )
            value = float(loss.detach())
            if not math.isfinite(value):
                stopped = True
                break
            avg = beta * avg + (1 - beta) * value
            smoothed = avg / (1 - beta ** (step + 1))
            lrs.append(lr)
            losses.append(smoothed)
            raw.append(value)
            best = min(best, smoothed)
            reporter.step(step + 1, smoothed, 0.0, lr, 0.0)
            if step > 0 and smoothed > diverge * best:
                stopped = True
                break
    finally:
        plain_model(setup.accelerator, model).load_state_dict(saved_model)
        optimizer.load_state_dict(saved_optimizer)
        _restore_rng(saved_rng)
    if len(losses) < 10 or int(np.argmin(losses)) == 0:
        raise UserError(
            f"the loss diverged at once (after {len(losses)} steps, from lr {min_lr:g}); the range test has "
            "nothing to suggest: lower --min-lr, check the data and labels, or enable clipping (train.clip_grad)"
        )
    return RangeTest(
        lrs,
        losses,
        raw,
        suggest(lrs, losses),
        DEFAULT_SUGGESTION,
        stopped,
        time.perf_counter() - start,
        cfg.train.batch_size,
    )


def _cycle(loader: Any):
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise UserError("the training loader yields no batches (fewer images than one batch?)")


# -- precision and memory format -------------------------------------------------------------------


@dataclass
class FormatSearch:
    """Training-step speed of each (precision, memory format) for this model on this machine."""

    device: str
    batch_size: int
    trials: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "batch_size": self.batch_size, "trials": self.trials, "best": self.best}


def format_candidates(on_gpu: bool) -> list[tuple[str, bool]]:
    """(mixed_precision, channels_last) pairs worth timing: full precision and the device's half type."""
    half = resolve_precision("auto", "cuda") if on_gpu else "bf16"  # on a CPU, timed even without native bf16
    return [(precision, cl) for precision in ("no", half) for cl in (False, True)]


def _timed_steps(setup: Any, batch: int, steps: int) -> float:
    """Seconds for `steps` training steps on a synthetic batch (the model's speed, not the loader's)."""
    acc = setup.accelerator
    size = setup.pre.input_size
    x = torch.randn(batch, 3, size, size, device=acc.device)
    y = torch.randint(0, len(setup.data.index.classes), (batch,), device=acc.device)
    if acc.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        training_step(acc, setup.model, setup.optimizer, setup.loss_fn, x, y, setup.channels_last, None)
    if acc.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def format_search(
    cfg: Config, steps: int = 3, give_up_ratio: float = 3.0, reporter: Reporter | None = None
) -> FormatSearch:
    """Time `steps` training steps (after one warm-up) of the configured model and batch in every
    precision and memory format, and pick the fastest. Whether channels_last or bf16 pays depends on
    the model and the hardware (on a CPU without native bf16, bf16 autocast is several times slower),
    so it is measured, not assumed. A candidate whose warm-up step takes `give_up_ratio` times the
    fastest warm-up so far is not timed further: it would only cost minutes to confirm it loses."""
    reporter = reporter or SilentReporter()
    on_gpu = torch.cuda.is_available()
    search = FormatSearch(device="cuda" if on_gpu else "cpu", batch_size=cfg.train.batch_size)
    fastest_warmup = math.inf
    for precision, channels_last in format_candidates(on_gpu):
        trial_cfg = copy.deepcopy(cfg)
        trial_cfg.data.cache = "none"
        trial_cfg.train.mixed_precision = precision
        trial_cfg.train.channels_last = channels_last
        trial_cfg.train.grad_accum = 1
        label = f"{'fp32' if precision == 'no' else precision} {'channels_last' if channels_last else 'contiguous'}"
        reporter.message(f"timing {label}")
        setup = prepare(trial_cfg, reporter, compile_model=False)
        warmup = _timed_steps(setup, cfg.train.batch_size, 1)
        trial: dict[str, Any] = {"mixed_precision": precision, "channels_last": channels_last, "label": label}
        if warmup > give_up_ratio * fastest_warmup:
            trial.update(images_per_s=cfg.train.batch_size / warmup, stopped_after_warmup=True)
        else:
            trial["images_per_s"] = cfg.train.batch_size * steps / _timed_steps(setup, cfg.train.batch_size, steps)
        fastest_warmup = min(fastest_warmup, warmup)
        search.trials.append(trial)
        del setup
    search.best = max(search.trials, key=lambda t: t["images_per_s"])
    return search


# -- batch size ------------------------------------------------------------------------------------


@dataclass
class BatchSearch:
    device: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    best: int | None = None
    rule: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "trials": self.trials, "best": self.best, "rule": self.rule}


def binsearch_max_batch(
    fits: Callable[[int], bool], start: int = 2, limit: int = 65536, margin: float = 0.9
) -> tuple[int, list[dict[str, Any]]]:
    """Largest batch for which `fits` holds: double until it fails, then binary search between the
    last success and the failure (Lightning's 'binsearch'); the answer is scaled by `margin`."""
    trials: list[dict[str, Any]] = []
    low, high = 0, None
    size = start
    while size <= limit:
        ok = fits(size)
        trials.append({"batch_size": size, "fits": ok})
        if not ok:
            high = size
            break
        low = size
        size *= 2
    if low == 0:
        raise UserError(f"even batch size {start} does not fit in memory")
    if high is not None:
        while high - low > 1:
            mid = (low + high) // 2
            ok = fits(mid)
            trials.append({"batch_size": mid, "fits": ok})
            low, high = (mid, high) if ok else (low, mid)
    return max(1, int(low * margin)), trials


def _rss_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * 4096
    except (OSError, ValueError, IndexError):
        return 0


def batch_size_search(
    cfg: Config,
    candidates: list[int] | None = None,
    memory_budget_gb: float | None = None,
    steps: int = 3,
    reporter: Reporter | None = None,
) -> BatchSearch:
    """GPU: the largest batch that fits (binsearch, 10% margin). CPU: images/s per batch size within a
    memory budget, and the fastest. Synthetic inputs of the configured size: this measures the model."""
    reporter = reporter or SilentReporter()
    small = copy.deepcopy(cfg)
    small.data.cache = "none"
    setup = prepare(small, reporter, compile_model=False)
    model, optimizer, acc = setup.model, setup.optimizer, setup.accelerator
    saved_model = copy.deepcopy(plain_model(acc, model).state_dict())
    saved_optimizer = copy.deepcopy(optimizer.state_dict())

    def run(batch: int, repeats: int) -> float:
        _timed_steps(setup, batch, 1)  # warm-up
        return batch * repeats / _timed_steps(setup, batch, repeats)

    search = BatchSearch(device=acc.device.type)
    try:
        if acc.device.type == "cuda":

            def fits(batch: int) -> bool:
                try:
                    run(batch, 1)
                    return True
                except torch.cuda.OutOfMemoryError:
                    return False
                finally:
                    optimizer.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()

            search.best, search.trials = binsearch_max_batch(fits)
            search.rule = "largest batch that fits, x0.9 safety margin"
        else:
            budget = (memory_budget_gb or _available_gb() / 2) * 2**30
            base = _rss_bytes()
            for batch in candidates or [8, 16, 32, 64, 128, 256]:
                reporter.message(f"batch {batch}: timing {steps} steps")
                ips = run(batch, steps)
                used = _rss_bytes() - base
                search.trials.append({"batch_size": batch, "images_per_s": ips, "rss_growth_mb": used / 2**20})
                if used > budget:
                    search.trials[-1]["over_budget"] = True
                    break
            ok = [t for t in search.trials if not t.get("over_budget")]
            search.best = max(ok, key=lambda t: t["images_per_s"])["batch_size"] if ok else None
            search.rule = "fastest images/s within the memory budget"
    finally:
        plain_model(acc, model).load_state_dict(saved_model)
        optimizer.load_state_dict(saved_optimizer)
    return search


def _available_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 8.0


def scale_lr(lr: float, from_batch: int, to_batch: int, optimizer: str) -> float:
    """Linear scaling for SGD-like optimizers (Goyal et al.), square root for adaptive ones."""
    ratio = to_batch / from_batch
    adaptive = any(name in optimizer.lower() for name in ("adam", "lamb", "lion", "adan", "rmsprop"))
    return lr * (math.sqrt(ratio) if adaptive else ratio)


def lr_for_training(
    result: RangeTest, per_step_batch: int, grad_accum: int, optimizer: str, chosen_batch: int | None = None
) -> float:
    """The range test's suggestion carried over to the batch `train` will use.

    The test runs at the per-step batch without accumulation; training's effective batch is
    batch x accumulation (and the batch search may change the batch). The scaled value is capped at
    the LR where the test's loss was lowest: beyond it the test saw the loss rise, whatever a scaling
    rule extrapolates (a tiny dataset whose batch search jumps 32x would otherwise be told lr > 100).
    """
    effective = (chosen_batch or per_step_batch) * grad_accum
    scaled = scale_lr(result.suggested_lr, result.batch_size, effective, optimizer)
    return min(scaled, result.lrs[int(np.argmin(result.losses))])


# -- writing the suggestion ------------------------------------------------------------------------


def write_suggestion(
    path: str | Path,
    lr: float,
    batch_size: int | None = None,
    mixed_precision: str | None = None,
    channels_last: bool | None = None,
) -> None:
    """Set optim.lr (and each train.* value given) in a YAML config in place, keeping comments and layout."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    text = _set_key(text, "optim", "lr", f"{lr:.3g}")
    if batch_size is not None:
        text = _set_key(text, "train", "batch_size", str(batch_size))
    if mixed_precision is not None:
        text = _set_key(text, "train", "mixed_precision", json.dumps(mixed_precision))  # bare `no` is YAML false
    if channels_last is not None:
        text = _set_key(text, "train", "channels_last", str(channels_last).lower())
    from clothcli.io_utils import atomic_write_text

    atomic_write_text(path, text)
    load_config(path)  # the written file must still load


def _set_key(text: str, section: str, key: str, value: str) -> str:
    lines = text.splitlines(keepends=True)
    head = re.compile(rf"^{section}:\s*(#.*)?$")
    for i, line in enumerate(lines):
        if head.match(line.rstrip("\n")):
            indent = None
            for j in range(i + 1, len(lines)):
                stripped = lines[j].strip()
                if not stripped or stripped.startswith("#"):
                    continue
                current = len(lines[j]) - len(lines[j].lstrip())
                if current == 0:
                    break
                indent = indent if indent is not None else current
                match = re.match(rf"^(\s*){key}:\s*([^#\n]*?)(\s*#.*)?$", lines[j].rstrip("\n"))
                if match and len(match.group(1)) == indent:
                    comment = match.group(3) or ""
                    lines[j] = f"{match.group(1)}{key}: {value}{comment}\n"
                    return "".join(lines)
            lines.insert(i + 1, f"{' ' * (indent or 2)}{key}: {value}\n")
            return "".join(lines)
    suffix = "" if text.endswith("\n") or not text else "\n"
    return text + f"{suffix}{section}:\n  {key}: {value}\n"


def plot_range_test(result: RangeTest, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(result.lrs, result.raw_losses, color="0.8", lw=0.8, label="loss")
    ax.plot(result.lrs, result.losses, color="C0", label="smoothed loss")
    for i, (name, lr) in enumerate(result.suggestions.items()):
        idx = int(np.argmin(np.abs(np.log(result.lrs) - np.log(lr))))
        ax.scatter(
            [lr],
            [result.losses[idx]],
            color=f"C{i + 1}",
            zorder=3,
            label=f"{name}: {lr:.2e}" + (" (default)" if name == result.default else ""),
        )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_ylim(min(result.losses) * 0.9, min(max(result.losses), result.losses[0] * 1.5) * 1.05)
    ax.legend()
    ax.set_title(f"LR range test, batch {result.batch_size}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
