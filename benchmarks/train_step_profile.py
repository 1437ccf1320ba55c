"""Where a training step's time goes, and whether the optimizer's multi-tensor paths pay on this CPU.

Part 1 times each phase of clothcli's own `training_step` (and the EMA update after it) over real
batches of a config: the wait for the loader, forward with the loss, backward, gradient clipping, the
optimizer's step and zero_grad, the EMA update. The phases are timed by wrapping the methods the step
calls, so the step timed is the one `train` runs. torch.profiler's top operators come beside it.

Part 2 takes the config's optimizer as timm builds it and runs it three ways from one state with the
same gradients: one tensor at a time (PyTorch's choice on a CPU), `foreach` (multi-tensor) and `fused`;
for each, the time of a step and whether the weights after the steps are bit-identical to the first
way's (a change that alters results on a host is not a free speed-up).

    python benchmarks/train_step_profile.py conf/mobilenet-cpu.yaml --data ../shared/datasets/clothing-dataset-small \\
        --weights ../shared/weights/tf_mobilenetv3_small_100.in1k.safetensors --json out.json
    python benchmarks/train_step_profile.py --tiny      # generated data, tiny model (CI)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's own start/stop and no-GPU lines, before torch loads

import numpy as np
import torch
from PIL import Image
from reference_outputs import host as cpu_description
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3

from clothcli.allocator import keep_freed_memory
from clothcli.config import load_config
from clothcli.training.setup import prepare, training_step

PHASES = ("data wait", "forward + loss", "backward", "clip", "optimizer step", "zero_grad", "EMA update")


def timed(owner: object, name: str, phase: str, seconds: dict[str, list[float]]) -> None:
    """Replace owner.name by a wrapper that adds its wall time to seconds[phase]."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            seconds[phase].append(time.perf_counter() - start)

    setattr(owner, name, wrapper)


def phase_times(setup, ema: ModelEmaV3 | None, clip: float | None, warmup: int, steps: int) -> dict:
    """Mean milliseconds per step of each phase over `steps` steps after `warmup`, and the top operators."""
    seconds: dict[str, list[float]] = defaultdict(list)
    timed(setup.task, "forward", "forward + loss", seconds)
    timed(setup.accelerator, "backward", "backward", seconds)
    timed(setup.accelerator, "clip_grad_norm_", "clip", seconds)
    timed(setup.optimizer, "step", "optimizer step", seconds)
    timed(setup.optimizer, "zero_grad", "zero_grad", seconds)
    setup.task.train()
    batches = iter(loop_forever(setup.train_loader))
    step_seconds: list[float] = []
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    for step in range(warmup + steps):
        if step == warmup:
            seconds.clear()
        if step == warmup + steps - 3:  # a few steps under the profiler, after the phases were timed
            profiler.start()
        start = time.perf_counter()
        images, targets, *_ = next(batches)
        seconds["data wait"].append(time.perf_counter() - start)
        training_step(setup, images, targets, clip)
        if ema is not None:
            update = time.perf_counter()
            ema.update(setup.model)
            seconds["EMA update"].append(time.perf_counter() - update)
        if step >= warmup:
            step_seconds.append(time.perf_counter() - start)
    profiler.stop()
    timed_steps = steps - 3
    per_step = {p: 1000 * sum(seconds[p][:timed_steps]) / timed_steps for p in PHASES if seconds[p]}
    step_ms = 1000 * statistics.fmean(step_seconds[:timed_steps])
    # shares of the profiled time, not milliseconds: the profiler slows what it records, unevenly
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    operators = [
        {"name": e.key, "share": round(e.self_cpu_time_total / total, 4), "calls_per_step": e.count // 3}
        for e in events[:12]
    ]
    return {"step_ms": round(step_ms, 1), "phases_ms": {k: round(v, 2) for k, v in per_step.items()},
            "top_operators": operators}  # fmt: skip


def loop_forever(loader):
    while True:
        yield from loader


def optimizer_ways(cfg, model: torch.nn.Module, steps: int = 5, repeats: int = 20) -> list[dict]:
    """The config's optimizer one tensor at a time, foreach and fused, from one state with one set of
    gradients: ms per step and whether the weights end bit-identical to the one-at-a-time way's."""
    gradients = {name: torch.randn_like(p) * 1e-2 for name, p in model.named_parameters()}
    rows, reference = [], None
    for way, options in (("one tensor at a time", {"foreach": False}), ("foreach", {"foreach": True}),
                         ("fused", {"fused": True})):  # fmt: skip
        copy_ = copy.deepcopy(model)
        try:
            optimizer = create_optimizer_v2(
                copy_,
                opt=cfg.optim.name,
                lr=cfg.optim.lr,
                weight_decay=cfg.optim.weight_decay,
                momentum=cfg.optim.momentum,
                **options,
            )
        except (TypeError, RuntimeError, ValueError) as error:
            rows.append({"way": way, "error": str(error).splitlines()[0]})
            continue
        for name, p in copy_.named_parameters():
            p.grad = gradients[name].clone()
        for _ in range(steps):
            optimizer.step()
        weights = [p.detach().clone() for p in copy_.parameters()]
        identical = None if reference is None else all(torch.equal(a, b) for a, b in zip(reference, weights))
        reference = reference or weights
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - start)
        rows.append({"way": way, "step_ms": round(1000 * statistics.median(times), 3),
                     "bit_identical_to_first": identical})  # fmt: skip
    return rows


def tiny_data(root: Path, classes: int = 3, per_class: int = 24) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("validation", 4)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--precision", default="no", help="train.mixed_precision for the timed steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tiny", action="store_true", help="CI: generated images, a tiny timm model")
    args = parser.parse_args()
    keep_freed_memory()  # as the clothcli command does at start-up: else every step page-faults its activations
    scratch = tempfile.TemporaryDirectory()
    overrides = [f"train.mixed_precision={args.precision}", f"output_dir={scratch.name}", *args.overrides]
    if args.tiny:
        args.data = tiny_data(Path(scratch.name) / "data")
        args.warmup, args.steps = 2, 6
        overrides += ["model.name=test_efficientnet", "model.pretrained=false", "preprocess.input_size=32",
                      "train.batch_size=8", "data.num_workers=0", "train.ema.enabled=true"]  # fmt: skip
    if args.data:
        overrides.append(f"data.root={args.data}")
    if args.weights:
        overrides.append(f"model.weights={args.weights}")
    cfg = load_config(args.config, overrides)
    setup = prepare(cfg, compile_model=False)
    ema = ModelEmaV3(setup.model, decay=cfg.train.ema.decay) if cfg.train.ema.enabled else None
    phases = phase_times(setup, ema, cfg.train.clip_grad, args.warmup, args.steps)
    ways = optimizer_ways(cfg, setup.model)
    print(f"{cfg.model.name}, batch {cfg.train.batch_size}, {cfg.train.mixed_precision}, {torch.get_num_threads()} "
          f"threads: {phases['step_ms']} ms per step")  # fmt: skip
    for phase, ms in phases["phases_ms"].items():
        print(f"  {phase:15} {ms:8.2f} ms  {100 * ms / phases['step_ms']:5.1f}%")
    print("top operators (share of the profiled steps' CPU time):")
    for op in phases["top_operators"]:
        print(f"  {op['name'][:48]:48} {100 * op['share']:5.1f}%  x{op['calls_per_step']} per step")
    print(f"optimizer ({cfg.optim.name}):")
    for row in ways:
        print("  " + ", ".join(f"{k} {v}" for k, v in row.items()))
    if args.json:
        result = {"host": {"cpu": cpu_description(), "torch": torch.__version__, "threads": torch.get_num_threads()},
                  "config": str(args.config), "model": cfg.model.name, "batch": cfg.train.batch_size,
                  "precision": cfg.train.mixed_precision, **phases, "optimizer": ways}  # fmt: skip
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
