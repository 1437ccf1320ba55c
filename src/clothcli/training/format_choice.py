"""`train.mixed_precision: auto` on a CPU, decided by timing rather than by the CPU's flags.

Whether bf16 autocast or channels_last pays on a CPU depends on the network as much as on the
instructions the CPU has (on a 2-core AMD EPYC with AVX512-BF16, bf16 trained MobileNetV3-Small
slower than fp32), so each candidate (fp32 and bf16; channels_last and contiguous where
`train.channels_last` is not set) is timed on a few real training steps of the configured model, batch
and crop, on a synthetic batch, interleaved so that the host's drift favours none. The choice is kept in
the user's cache folder per host, torch version, threads, model, crop and batch, so the measurement is
made once, and it is written into the run's config (resolved values, and `train.measured_format` with
the timings and the margin), so `--resume` reuses it. A candidate within `NOISE` of the fastest that
comes earlier in the order of preference (fp32 before bf16, the configured memory format first) is
chosen instead, so a choice inside the timing noise does not flip from host run to host run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clothcli.config import Config
from clothcli.io_utils import atomic_write_text, user_cache_dir
from clothcli.models.build import build_model, resolve_preprocess
from clothcli.runtime import cpu_description

NOISE = 0.05  # repeated timings of one step on these hosts differ by a few percent
WARMUP_STEPS = 2  # after one, EfficientNet-Lite0's next fp32 step still took 1.4-2.5x its settled time
ROUNDS = 3
CACHE_FILE = "formats.json"
CACHE_VERSION = 2  # 2: two warm-up steps and the fastest round, where 1 took one and the median


@dataclass(frozen=True)
class Candidate:
    precision: str  # "no" (fp32) or "bf16"
    channels_last: bool

    @property
    def label(self) -> str:
        layout = "channels_last" if self.channels_last else "contiguous"
        return f"{'fp32' if self.precision == 'no' else self.precision} {layout}"


@dataclass
class FormatChoice:
    chosen: Candidate
    images_per_s: dict[str, float]  # per candidate label
    margin: float  # the chosen one's speed over the best other candidate's (below 1: kept within the noise)
    cached: bool
    reason: str

    def record(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen.label,
            "images_per_s": {k: round(v, 1) for k, v in self.images_per_s.items()},
            "margin": round(self.margin, 3),
            "reason": self.reason,
        }


def candidates(cfg: Config) -> list[Candidate]:
    """What `auto` chooses among, in order of preference (the simpler and the configured first)."""
    precisions = ["no", "bf16"] if cfg.train.mixed_precision == "auto" else [cfg.train.mixed_precision]
    layouts = [True, False] if cfg.train.channels_last is None else [cfg.train.channels_last]
    return [Candidate(p, cl) for p in precisions for cl in layouts]


def cache_path() -> Path:
    return user_cache_dir() / CACHE_FILE


def cache_key(cfg: Config, crop: int) -> str:
    parts = [CACHE_VERSION, cpu_description(), torch.__version__, torch.get_num_threads(), cfg.model.name,
             sorted(cfg.model.kwargs.items()), cfg.model.freeze, cfg.model.freeze_bn, crop,
             cfg.train.batch_size]  # fmt: skip
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def time_candidates(cfg: Config, crop: int, options: list[Candidate], rounds: int = ROUNDS) -> dict[Candidate, float]:
    """images/s of a training step (forward, loss, backward, SGD step) of the configured model at `crop`
    px and the configured batch, per candidate: `WARMUP_STEPS` interleaved warm-up steps each, then `rounds`
    interleaved rounds of one timed step each, the fastest taken (the host's noise only ever slows a step)."""
    model_cfg = replace(copy.deepcopy(cfg.model), pretrained=False, weights=None)
    batch = cfg.train.batch_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, crop, crop, generator=generator)
    targets = torch.randint(0, 10, (batch,), generator=generator)
    models: dict[Candidate, tuple[nn.Module, torch.optim.Optimizer]] = {}
    for option in options:
        model = build_model(model_cfg, 10).train()
        if option.channels_last:
            model = model.to(memory_format=torch.channels_last)
        models[option] = (model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9))

    def step(option: Candidate) -> float:
        model, optimizer = models[option]
        x = images.contiguous(memory_format=torch.channels_last) if option.channels_last else images
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=option.precision == "bf16"):
            loss = nn.functional.cross_entropy(model(x).float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for _ in range(WARMUP_STEPS):
        for option in options:
            step(option)
    seconds: dict[Candidate, list[float]] = {option: [] for option in options}
    for round_number in range(rounds):
        for option in options if round_number % 2 == 0 else options[::-1]:
            seconds[option].append(step(option))
    return {option: batch / min(times) for option, times in seconds.items()}


def decide(speeds: dict[Candidate, float], options: list[Candidate], noise: float = NOISE) -> tuple[Candidate, float]:
    """The first candidate in order of preference within `noise` of the fastest, and its margin over the
    fastest of the others."""
    fastest = max(speeds.values())
    chosen = next(option for option in options if speeds[option] >= fastest * (1 - noise))
    others = [speed for option, speed in speeds.items() if option != chosen]
    return chosen, (speeds[chosen] / max(others)) if others else 1.0


def training_crop(cfg: Config) -> int:
    """The side of the training crops `cfg` gives (the model's own input size when not configured)."""
    if cfg.augment.crop_size:
        return cfg.augment.crop_size
    if cfg.preprocess.input_size:
        return cfg.preprocess.input_size
    model_cfg = replace(copy.deepcopy(cfg.model), pretrained=False, weights=None)
    return resolve_preprocess(build_model(model_cfg, 10), cfg.preprocess).input_size


def choose_format(cfg: Config, timer: Any = None) -> FormatChoice | None:
    """The measured (precision, memory format) for `cfg` on this CPU (by `timer`, `time_candidates` unless
    given), from the cache when it was measured before; None when there is nothing to choose."""
    options = candidates(cfg)
    if len(options) < 2:
        return None
    crop = training_crop(cfg)
    path, key = cache_path(), cache_key(cfg, crop)
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        cache = {}  # a cache this machine wrote and something cut short: measured again
    labels = {option.label: option for option in options}
    entry = cache.get(key) if isinstance(cache, dict) else None
    if isinstance(entry, dict) and set(entry.get("images_per_s", {})) == set(labels):
        speeds = {labels[label]: float(value) for label, value in entry["images_per_s"].items()}
        cached = True
    else:
        speeds = (timer or time_candidates)(cfg, crop, options)
        cached = False
        cache = cache if isinstance(cache, dict) else {}
        cache[key] = {"images_per_s": {o.label: s for o, s in speeds.items()}, "measured": time.time(),
                      "model": cfg.model.name, "crop": crop, "batch": cfg.train.batch_size}  # fmt: skip
        atomic_write_text(path, json.dumps(cache, indent=1) + "\n")
    chosen, margin = decide(speeds, options)
    fastest = max(speeds, key=speeds.get)
    if chosen == fastest:
        reason = f"fastest, {margin:.2f}x the next" if margin != 1.0 else "fastest"
    else:
        reason = f"within {NOISE:.0%} of the fastest ({fastest.label}), and preferred"
    return FormatChoice(chosen, {o.label: s for o, s in speeds.items()}, margin, cached, reason)


def resolve_auto_format(cfg: Config, device_type: str) -> tuple[Config, FormatChoice | None]:
    """`cfg` with `auto` (and an unset channels_last) replaced by the measured choice on a CPU, recorded in
    `train.measured_format`; unchanged on a GPU (bf16 or fp16 by the device's rule) and under a launcher
    with several processes (each would measure on its own and might choose differently: the rule then)."""
    several = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    if device_type != "cpu" or several:
        return cfg, None
    choice = choose_format(cfg)
    if choice is None:
        return cfg, None
    train = replace(cfg.train, mixed_precision=choice.chosen.precision, channels_last=choice.chosen.channels_last,
                    measured_format=choice.record())  # fmt: skip
    return replace(cfg, train=train), choice
