"""Training throughput: clothcli's loop against a plain PyTorch pipeline, side by side in one run.

The baseline is what a tutorial writes: torchvision ImageFolder + PIL + transforms +
DataLoader(num_workers) + a hand-written fp32 loop. clothcli runs its own `train()` with the
same model, batch size, augmentation and epochs; the decode cache is built before timing
(its one-off cost is reported separately).

    python benchmarks/train_throughput.py --data ../shared/datasets/clothing-dataset-small \\
        --weights ../shared/weights/tf_mobilenetv3_small_100.in1k.safetensors --epochs 2
    python benchmarks/train_throughput.py --tiny      # generated data, tiny model, a few steps (CI)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from clothcli.allocator import OPT_OUT_ENV, keep_freed_memory
from clothcli.config import load_config
from clothcli.training import train


def peak_rss_mb() -> float:
    """Peak resident memory of this process and, separately counted, its largest worker."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + workers) / 1024


def isolated(fn, *args) -> dict:
    """Run one pipeline in a fresh (non-daemonic, so it may start DataLoader workers) process, so that
    its peak memory is its own."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measured, args=(queue, multiprocessing.get_start_method(), fn, *args))
    proc.start()
    result = queue.get()
    proc.join()
    if isinstance(result, BaseException):
        raise result
    return result


def _measured(queue, start_method: str, fn, *args) -> None:
    # A spawned child defaults to starting its own children (the DataLoader workers) by spawn too;
    # give it the start method a process launched from the shell has on this platform, as
    # `clothcli train` has. (Left as spawn, every worker re-imported torch each epoch.)
    import multiprocessing

    multiprocessing.set_start_method(start_method, force=True)
    try:
        result = fn(*args)
        result["peak_rss_mb"] = peak_rss_mb()
        queue.put(result)
    except BaseException as exc:
        queue.put(RuntimeError(f"{fn.__name__} failed: {exc!r}"))


@dataclass
class Workload:
    """What every pipeline trains: the same data, model, size, batch, epochs and worker count."""

    data: Path
    model: str
    weights: str | None
    size: int
    batch: int
    epochs: int
    workers: int


def plain_baseline(w: Workload) -> dict:
    """The tutorial pipeline, timed the same way clothcli times itself (per epoch, waits measured)."""
    torch.manual_seed(0)
    tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(w.size, scale=(0.25, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(0.2, 0.2, 0.2),
            transforms.ToTensor(),
            transforms.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )
    dataset = datasets.ImageFolder(str(w.data / "train"), transform=tf)
    loader = DataLoader(
        dataset, batch_size=w.batch, shuffle=True, num_workers=w.workers, drop_last=len(dataset) > w.batch
    )
    kwargs = {"pretrained_cfg_overlay": {"file": w.weights}, "pretrained": True} if w.weights else {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = timm.create_model(w.model, num_classes=len(dataset.classes), **kwargs).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    epochs_timed = []
    for _ in range(w.epochs):
        images, wait = 0, 0.0
        start = mark = time.perf_counter()
        for x, y in loader:
            wait += time.perf_counter() - mark
            x, y = x.to(device), y.to(device)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            images += len(x)
            mark = time.perf_counter()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        epochs_timed.append({"seconds": seconds, "images_per_s": images / seconds, "data_wait": wait / seconds})
    return {
        "pipeline": "plain (ImageFolder+PIL, fp32)",
        **summarize(epochs_timed),
        "dtype": "fp32",
        "memory_format": "contiguous",
    }


def summarize(epochs: list[dict]) -> dict:
    """images/s over the epochs after the first (steady state) when there are several, and the first
    epoch on its own: it also pays for worker start-up and warm-up."""
    steady = epochs[1:] or epochs
    seconds = sum(e["seconds"] for e in steady)
    return {
        "images_per_s": sum(e["images_per_s"] * e["seconds"] for e in steady) / seconds,
        "first_epoch_images_per_s": epochs[0]["images_per_s"],
        "seconds_per_epoch": seconds / len(steady),
        "data_wait": sum(e["data_wait"] * e["seconds"] for e in steady) / seconds,
        "epochs": epochs,
    }


@dataclass(frozen=True)
class Variant:
    """One clothcli configuration to time: decode cache, memory format, precision, where colour
    jitter and normalisation run (per image in the loader workers, or batched in the training process),
    and whether freed memory stays in the process (`clothcli.allocator`, on in every `clothcli` command)."""

    cache: str
    channels_last: bool
    precision: str
    augment_on: str
    keep_freed_memory: bool = True

    def name(self, processes: int = 1) -> str:
        jitter = ", jitter batched" if self.augment_on == "device" else ""
        malloc = ", system malloc" if not self.keep_freed_memory else ""
        return f"clothcli (cache={self.cache}{jitter}{malloc})" + (f", {processes} processes" if processes > 1 else "")


def clothcli_overrides(w: Workload, v: Variant, root: Path, out: Path, processes: int = 1) -> list[str]:
    """The config for one clothcli run; with several processes the batch (per process in clothcli)
    and the loader workers are split between them, so every pipeline takes the same optimizer steps."""
    overrides = [
        f"data.root={w.data}",
        f"model.name={w.model}",
        f"preprocess.input_size={w.size}",
        f"train.batch_size={max(1, w.batch // processes)}",
        f"train.epochs={w.epochs}",
        f"data.num_workers={max(1, w.workers // processes) if w.workers else 0}",
        f"data.cache={v.cache}",
        f"data.augment_on={v.augment_on}",
        f"train.channels_last={str(v.channels_last).lower()}",
        f"train.mixed_precision={v.precision}",
        "augment.scale=[0.25, 1.0]",
        "augment.color_jitter=0.2",
        f"output_dir={out}",
        "schedule.name=cosine",
        f"data.cache_dir={root / 'cache'}",
    ]
    overrides.append(f"model.weights={w.weights}" if w.weights else "model.pretrained=false")
    return overrides


def clothcli_run(w: Workload, v: Variant, root: Path) -> dict:
    """One `train()` in a fresh run folder under `root`; all runs share one decode cache there."""
    out = Path(tempfile.mkdtemp(prefix="run", dir=root))
    cfg = load_config(None, clothcli_overrides(w, v, root, out))
    if v.keep_freed_memory:  # as the `clothcli` command does at start-up (this is a fresh process)
        keep_freed_memory()
    started = time.perf_counter()
    result = train(cfg)
    total = time.perf_counter() - started
    rows = [r for r in result.history if r["epoch"] != "swa"]
    return clothcli_row(v.name(), rows, v.precision, v.channels_last, total)


def clothcli_torchrun(w: Workload, v: Variant, root: Path, processes: int) -> dict:
    """`torchrun --nproc_per_node P -m clothcli train` (one thread per process): data-parallel training
    on one CPU. Timings come from the run's metrics.csv."""
    out = Path(tempfile.mkdtemp(prefix="run", dir=root))
    overrides = clothcli_overrides(w, v, root, out, processes)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd += ["-m", "clothcli", "train", "--name", "bench", *[a for kv in overrides for a in ("--set", kv)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", OPT_OUT_ENV: "0" if v.keep_freed_memory else "1"}
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    total = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited {proc.returncode}: {proc.stderr[-2000:]}")
    with open(out / "bench" / "metrics.csv", newline="") as f:
        rows = [
            {k: (v if k == "epoch" else float(v)) for k, v in row.items() if v != ""}
            for row in csv.DictReader(f)
            if row["epoch"] != "swa"
        ]
    return clothcli_row(v.name(processes), rows, v.precision, v.channels_last, total)


def clothcli_row(name: str, rows: list[dict], precision: str, channels_last: bool, total: float) -> dict:
    train_s = sum(r["seconds"] for r in rows)
    val_s = sum(r["val_seconds"] for r in rows)
    return {
        "pipeline": name,
        **summarize(rows),
        "dtype": precision if precision != "no" else "fp32",
        "memory_format": "channels_last" if channels_last else "contiguous",
        "wall_seconds_with_setup_and_validation": total,
        # where the wall time went: training epochs, validation, and the rest (start-up, model
        # building, the cache build, checkpoints)
        "time_split_seconds": {"train": train_s, "validation": val_s, "other": total - train_s - val_s},
    }


def run_rounds(pipelines: list[tuple], rounds: int, runner=isolated) -> list[list[dict]]:
    """Every pipeline once per round, in forward order on even rounds and backward on odd ones, so that
    a host getting steadily faster or slower favours no pipeline."""
    results = []
    for r in range(rounds):
        order = list(range(len(pipelines)))
        if r % 2:
            order.reverse()
        measured: dict[int, dict] = {}
        for i in order:
            fn, args = pipelines[i]
            measured[i] = runner(fn, *args)
        results.append([measured[i] for i in range(len(pipelines))])
    return results


def combine_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per pipeline: the median round, and the ratio to the baseline (the first pipeline) taken
    within each round (the baseline then ran minutes apart, not hours) and summarised by its median."""
    combined = []
    for i in range(len(rounds[0])):
        runs = [rnd[i] for rnd in rounds]
        ratios = [rnd[i]["images_per_s"] / rnd[0]["images_per_s"] for rnd in rounds]
        row = dict(sorted(runs, key=lambda run: run["images_per_s"])[(len(runs) - 1) // 2])
        row["images_per_s"] = statistics.median(run["images_per_s"] for run in runs)
        row["round_images_per_s"] = [run["images_per_s"] for run in runs]
        row["round_ratios"] = ratios
        row["ratio"] = statistics.median(ratios)
        combined.append(row)
    return combined


def make_tiny_dataset(root: Path) -> Path:
    from PIL import Image

    for split in ("train", "validation"):
        for k, color in enumerate([(200, 30, 30), (30, 200, 30)]):
            for i in range(16 if split == "train" else 4):
                path = root / split / f"class{k}" / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (48, 40), tuple(max(0, c - 5 * i) for c in color)).save(path)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--weights")
    parser.add_argument("--model", default="tf_mobilenetv3_small_100")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2, help="images/s is taken over the epochs after the first")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--rounds", type=int, default=1, help="run every pipeline this many times, alternating, against host drift"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=2,
        help="CPU: also time clothcli under torchrun, this many processes (1: skip)",
    )
    parser.add_argument("--json", type=Path, default=Path("benchmarks/train_throughput.json"))
    parser.add_argument("--tiny", action="store_true", help="generated data, tiny model (for CI)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if args.tiny:
            args.data, args.model, args.size, args.batch, args.epochs, args.workers, args.weights = (
                make_tiny_dataset(out / "data"),
                "test_efficientnet",
                32,
                8,
                1,
                0,
                None,
            )
        if args.data is None:
            parser.error("--data is required (or --tiny)")
        load = os.getloadavg()[0]
        if load > 0.5:
            print(f"warning: load average {load:.1f} before starting; other jobs will distort the figures")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        workload = Workload(args.data, args.model, args.weights, args.size, args.batch, args.epochs, args.workers)
        # The decode cache is built before the first epoch; epoch timings exclude it and
        # wall_seconds_with_setup_and_validation includes it.
        # clothcli's defaults: cache=memory and channels_last everywhere; jitter batched on a GPU, per
        # image in the loader workers on a CPU (the batched pass is timed there too, as the alternative)
        on_gpu = device == "cuda"
        default = Variant("memory", True, "bf16" if on_gpu else "no", "device" if on_gpu else "workers")
        variants = (
            [Variant("none", True, "bf16", "workers"), default]
            if device == "cuda"
            else [
                Variant("none", True, "no", "workers"),
                Variant("memory", False, "no", "workers"),
                Variant("memory", True, "no", "workers", keep_freed_memory=False),
                default,
                Variant("memory", True, "no", "device"),
            ]
        )
        if args.tiny:  # CI checks that the script runs end to end: the baseline and the default suffice
            variants, args.processes = [default], 1
        pipelines = [(plain_baseline, (workload,))] + [(clothcli_run, (workload, v, out)) for v in variants]
        if args.processes > 1 and device == "cpu":  # on a GPU machine, one process per GPU instead
            pipelines.append((clothcli_torchrun, (workload, default, out, args.processes)))
        rounds = run_rounds(pipelines, args.rounds)
    results = combine_rounds(rounds)
    table = Table(title=f"Training throughput — {args.model} @ {args.size}px, batch {args.batch}, {device}")
    ratio_title = "ratio" if args.rounds == 1 else f"ratio (range over {args.rounds} rounds)"
    columns = ("pipeline", "device", "dtype", "memory format", "images/s", ratio_title, "data wait", "1st epoch")
    for col in (*columns, "peak RSS MB"):
        table.add_column(col)
    for r in results:
        r["device"] = device
        spread = f" ({min(r['round_ratios']):.2f}-{max(r['round_ratios']):.2f})" if args.rounds > 1 else ""
        table.add_row(
            r["pipeline"],
            device,
            r["dtype"],
            r["memory_format"],
            f"{r['images_per_s']:.1f}",
            f"{r['ratio']:.2f}x{spread}",
            f"{r['data_wait']:.0%}",
            f"{r['first_epoch_images_per_s']:.1f}",
            f"{r['peak_rss_mb']:.0f}",
        )
    Console(width=160).print(table)
    for r in results:
        if "time_split_seconds" in r:
            split = ", ".join(f"{k} {v:.1f}s" for k, v in r["time_split_seconds"].items())
            wall = r["wall_seconds_with_setup_and_validation"]
            print(f"{r['pipeline']} {r['memory_format']}: wall {wall:.1f}s = {split}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results, "rounds": rounds}
    args.json.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
