"""How fast the configured model trains here: per precision and memory format, and per batch size.

Both time training steps on a synthetic batch of the configured input size: they measure the model
and the device, not the loader.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clothcli.config import Config
from clothcli.errors import UserError
from clothcli.runtime import plain_model, resolve_device, resolve_precision
from clothcli.training.setup import Reporter, SilentReporter, prepare, training_step

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
        # with a teacher, its forward pass is part of every step
        training_step(setup, x, y)
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
    on_gpu = resolve_device().type == "cuda"
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
        trial: dict[str, Any] = {
            "mixed_precision": precision,
            "channels_last": channels_last,
            "label": label,
            "warmup_seconds": warmup,
        }
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

CPU_CANDIDATES = (8, 16, 32, 64, 128, 256)
# A batch counts as fast as the fastest when its median throughput is within this fraction of it.
# Repeated runs on the same CPU differ by about 5%, so a smaller margin would let noise pick the batch.
SPEED_MARGIN = 0.10
# Batches that leave fewer optimizer steps than this per epoch are not suggested: on a small dataset a
# large batch means few updates, and scaling the learning rate with the batch cannot make up for them.
MIN_STEPS_PER_EPOCH = 40


@dataclass
class BatchSearch:
    device: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    best: int | None = None
    rule: str = ""
    largest_for_dataset: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "trials": self.trials,
            "best": self.best,
            "rule": self.rule,
            "largest_for_dataset": self.largest_for_dataset,
        }


def largest_batch_for_dataset(train_images: int, grad_accum: int = 1, min_steps: int = MIN_STEPS_PER_EPOCH) -> int:
    """The largest per-step batch that still gives `min_steps` optimizer steps per epoch."""
    return max(1, train_images // (min_steps * grad_accum))


def choose_batch(trials: list[dict[str, Any]], margin: float = SPEED_MARGIN, current: int | None = None) -> int | None:
    """The batch to suggest from timed `trials`: the `current` batch when it was timed and its median
    images/s is within `margin` of the fastest median, else the smallest batch that is.

    On a CPU throughput is flat over a wide range of batches, and repeated timings differ by about 5%:
    picking the single fastest would let that noise move the batch (and with it the learning rate) by
    a factor of four. Keeping a batch that is already about as fast changes nothing that need not
    change; otherwise the smallest of the about-as-fast ones gives the most updates per epoch and the
    least learning-rate scaling."""
    usable = [t for t in trials if not t.get("over_budget")]
    if not usable:
        return None
    fastest = max(t["images_per_s"] for t in usable)
    as_fast = sorted(t["batch_size"] for t in usable if t["images_per_s"] >= (1 - margin) * fastest)
    return current if current in as_fast else as_fast[0]


def binsearch_max_batch(
    fits: Callable[[int], bool], start: int = 2, limit: int = 65536, margin: float = 0.9
) -> tuple[int, list[dict[str, Any]]]:
    """Largest batch up to `limit` for which `fits` holds: double until it fails, then binary search
    between the last success and the failure (Lightning's 'binsearch'). An answer found below a failure
    is scaled by `margin`: memory use varies a little from step to step."""
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
    if high is None:
        return low, trials
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
    repeats: int = 3,
    margin: float = SPEED_MARGIN,
    reporter: Reporter | None = None,
) -> BatchSearch:
    """GPU: the largest batch that fits (binsearch, 10% margin). CPU: images/s per batch size within a
    memory budget, `repeats` timings of `steps` steps each (median and spread), and the smallest batch
    within `margin` of the fastest (`choose_batch`). Either way no batch that leaves fewer than
    MIN_STEPS_PER_EPOCH steps per epoch on this dataset. Synthetic inputs of the configured size: this
    measures the model."""
    reporter = reporter or SilentReporter()
    small = copy.deepcopy(cfg)
    small.data.cache = "none"
    setup = prepare(small, reporter, compile_model=False)
    model, optimizer, acc = setup.model, setup.optimizer, setup.accelerator
    saved_model = copy.deepcopy(plain_model(acc, model).state_dict())
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    train_images = len(setup.data.index.splits["train"].samples)
    cap = largest_batch_for_dataset(train_images, cfg.train.grad_accum)

    def images_per_s(batch: int, n_steps: int) -> float:
        return batch * n_steps / _timed_steps(setup, batch, n_steps)

    search = BatchSearch(device=acc.device.type, largest_for_dataset=cap)
    try:
        if acc.device.type == "cuda":

            def fits(batch: int) -> bool:
                try:
                    _timed_steps(setup, batch, 1)
                    return True
                except torch.cuda.OutOfMemoryError:
                    return False
                finally:
                    optimizer.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()

            search.best, search.trials = binsearch_max_batch(fits, limit=cap)
            search.rule = f"largest batch that fits (x0.9 below a failure), at most {cap} for this dataset"
        else:
            budget = (memory_budget_gb or _available_gb() / 2) * 2**30
            base = _rss_bytes()
            allowed = [b for b in (candidates or CPU_CANDIDATES) if b <= cap] or [min(candidates or CPU_CANDIDATES)]
            for batch in allowed:
                reporter.message(f"batch {batch}: {repeats} timings of {steps} steps")
                _timed_steps(setup, batch, 1)  # warm-up
                runs = [images_per_s(batch, steps) for _ in range(repeats)]
                used = _rss_bytes() - base
                trial = {
                    "batch_size": batch,
                    "images_per_s": statistics.median(runs),
                    "spread": [min(runs), max(runs)],
                    "rss_growth_mb": used / 2**20,
                }
                search.trials.append(trial)
                if used > budget:
                    trial["over_budget"] = True
                    break
            search.best = choose_batch(search.trials, margin, cfg.train.batch_size)
            search.rule = (
                f"the configured batch ({cfg.train.batch_size}) if within {margin:.0%} of the fastest median "
                f"images/s, else the smallest that is; within the memory budget, at most {cap} "
                f"({MIN_STEPS_PER_EPOCH}+ steps per epoch over {train_images} images)"
            )
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
