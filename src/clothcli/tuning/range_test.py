"""Leslie Smith's learning-rate range test, its three suggestions, and carrying the suggestion over
to the batch that training will use."""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clothcli.config import Config
from clothcli.errors import UserError
from clothcli.runtime import plain_model
from clothcli.training.setup import Reporter, SilentReporter, prepare, training_step

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
            _, loss, _ = training_step(setup, images, targets, cfg.train.clip_grad)
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
