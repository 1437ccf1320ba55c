"""`clothcli train CONFIG` against timm's own `train.py` + `validate.py` on the same recipe, side by side.

The peer is the script a practitioner would run instead: timm's reference `train.py` (not in timm's wheel;
its path is an argument, and it is run where it lies, never copied). The clothcli config is mapped to
timm's flags (`timm_flags`: model, weights, image size, optimizer, learning rate, momentum, weight decay,
cosine schedule per step with its warm-up, epochs, batch, label smoothing, colour jitter, crop scale, flip,
dropout, EMA, gradient clipping, seed, `--channels-last`, `-j` workers). timm runs twice per round, fp32
and `--amp --amp-dtype bfloat16` (`--timm-precisions` may leave one out); the faster on this host is the
baseline. Each pipeline runs in a fresh process, in forward order in even rounds and backward in odd
ones; each seed (`--seeds`) is one round, and `--rounds N` runs the seeds N times over (a seed's
accuracies repeat to the last digit on one host, its times do not). Reported per pipeline: wall time of
the whole command (timm's validate.py on test included, as clothcli's evaluate), training images per
second of that wall time (epochs x training images / seconds), best validation accuracy and test
accuracy, with the ratio of wall times.

    python benchmarks/train_vs_timm.py --timm-train ../shared/peers/timm/train.py \\
        --config conf/mobilenet-cpu.yaml --data ../shared/datasets/clothing-dataset-small \\
        --weights ../shared/weights/tf_mobilenetv3_small_100.in1k.safetensors --seeds 42,43 \\
        --json benchmarks/results/train_vs_timm_mobilenet_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clothcli.config import Config, load_config
from clothcli.data.layout import index_dataset


def timm_flags(cfg: Config, data: Path, weights: Path, classes: int, seed: int, out: Path) -> list[str]:
    """timm train.py flags for the recipe `cfg` describes (what each clothcli key means in timm's terms)."""
    if cfg.schedule.name != "cosine" or cfg.schedule.warmup_epochs != int(cfg.schedule.warmup_epochs):
        raise SystemExit(f"{cfg.name}: only a cosine schedule with whole warm-up epochs maps to timm's flags")
    flags = [
        "--data-dir", str(data), "--train-split", "train", "--val-split", "validation",
        "--model", cfg.model.name, "--pretrained", "--pretrained-path", str(weights), "--num-classes", str(classes),
        "--img-size", str(cfg.preprocess.input_size), "--device", "cpu", "--channels-last" if cfg.train.channels_last
        is not False else "", "-j", str(cfg.data.num_workers),
        "--opt", cfg.optim.name, "--lr", str(cfg.optim.lr), "--weight-decay", str(cfg.optim.weight_decay),
        "--sched", "cosine", "--sched-on-updates", "--epochs", str(cfg.train.epochs),
        "--warmup-epochs", str(int(cfg.schedule.warmup_epochs)), "--min-lr", str(cfg.schedule.min_lr),
        "--cooldown-epochs", "0",
        "-b", str(cfg.train.batch_size), "--smoothing", str(cfg.train.label_smoothing),
        "--color-jitter", str(cfg.augment.color_jitter), "--scale", *(str(s) for s in cfg.augment.scale),
        "--hflip", str(cfg.augment.hflip), "--drop", str(cfg.model.drop_rate), "--seed", str(seed),
        "--output", str(out), "--experiment", "peer",
    ]  # fmt: skip
    if cfg.optim.name == "sgd":
        flags += ["--momentum", str(cfg.optim.momentum)]
    flags += ["--warmup-lr", str(cfg.schedule.warmup_lr)]
    if cfg.train.clip_grad:
        flags += ["--clip-grad", str(cfg.train.clip_grad)]
    if cfg.train.ema.enabled:
        flags += ["--model-ema", "--model-ema-decay", str(cfg.train.ema.decay)]
    return [f for f in flags if f]


def run_timm(script: Path, cfg: Config, data: Path, weights: Path, classes: int, seed: int, bf16: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="timm-peer-") as scratch:
        out = Path(scratch)
        flags = timm_flags(cfg, data, weights, classes, seed, out)
        if bf16:
            flags += ["--amp", "--amp-dtype", "bfloat16"]
        start = time.perf_counter()
        train = subprocess.run([sys.executable, str(script), *flags], capture_output=True, text=True, cwd=scratch)
        if train.returncode != 0:
            raise SystemExit(f"timm train.py failed:\n{train.stdout[-3000:]}{train.stderr[-3000:]}")
        summary = (out / "peer" / "summary.csv").read_text().splitlines()
        header = summary[0].split(",")
        rows = [dict(zip(header, line.split(","))) for line in summary[1:]]
        best_val = max(float(r["eval_top1"]) for r in rows) / 100
        validate = script.with_name("validate.py")
        checkpoint = out / "peer" / "model_best.pth.tar"
        command = [sys.executable, str(validate), "--data-dir", str(data), "--split", "test", "--model",
                   cfg.model.name, "--num-classes", str(classes), "--img-size", str(cfg.preprocess.input_size),
                   "--checkpoint", str(checkpoint), "--device", "cpu", "-j", str(cfg.data.num_workers),
                   "--results-format", "json"] + (["--use-ema"] if cfg.train.ema.enabled else [])  # fmt: skip
        tested = subprocess.run(command, capture_output=True, text=True, cwd=scratch)
        wall = time.perf_counter() - start
        if tested.returncode != 0:
            raise SystemExit(f"timm validate.py failed:\n{tested.stdout[-3000:]}{tested.stderr[-3000:]}")
        found = re.search(r'"top1":\s*([0-9.]+)', tested.stdout)
        test = float(found.group(1)) / 100 if found else float("nan")
    return {"pipeline": f"timm train.py ({'bf16' if bf16 else 'fp32'})", "seconds": wall, "best_val": best_val,
            "test": test, "epochs": len(rows)}  # fmt: skip


def run_clothcli(config: Path, data: Path, weights: Path, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="clothcli-bench-") as scratch:
        out = Path(scratch)
        start = time.perf_counter()
        train = subprocess.run(
            [sys.executable, "-m", "clothcli", "train", str(config), "--data", str(data), "--weights", str(weights),
             "--output-dir", str(out), "--name", "bench", "--set", f"train.seed={seed}"],
            capture_output=True, text=True,
        )  # fmt: skip
        if train.returncode != 0:
            raise SystemExit(f"clothcli train failed:\n{train.stdout[-3000:]}{train.stderr[-3000:]}")
        run = out / "bench"
        result_json = out / "test.json"
        tested = subprocess.run(
            [sys.executable, "-m", "clothcli", "evaluate", str(run), str(data), "--split", "test",
             "--json", str(result_json)], capture_output=True, text=True,
        )  # fmt: skip
        wall = time.perf_counter() - start
        if tested.returncode != 0:
            raise SystemExit(f"clothcli evaluate failed:\n{tested.stdout[-3000:]}{tested.stderr[-3000:]}")
        epochs = len((run / "metrics.csv").read_text().splitlines()) - 1
        meta = json.loads((run / "best" / "checkpoint.json").read_text())
        test = json.loads(result_json.read_text())["accuracy"]
        chosen = meta["config"]["train"].get("measured_format")
    return {"pipeline": "clothcli train", "seconds": wall, "best_val": meta["metrics"]["val_acc"], "test": test,
            "epochs": epochs, "format_choice": chosen}  # fmt: skip


def schedule(seeds: list[int], rounds: int, jobs: list) -> list[tuple[int, object]]:
    """(seed, job) in the order they run: seed after seed, `rounds` times over, every other round backwards."""
    order = []
    for number, seed in enumerate(seed for _ in range(rounds) for seed in seeds):
        order += [(seed, job) for job in (jobs if number % 2 == 0 else jobs[::-1])]
    return order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--timm-train", type=Path, required=True, help="timm's reference train.py (validate.py beside it)"
    )
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--seeds", default="42")
    parser.add_argument("--rounds", type=int, default=1, help="times to run the seeds over (at least 1)")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--timm-precisions",
        default="fp32,bf16",
        help="timm runs to make per round (fp32, bf16 or both); leave one out only where an earlier side-by-side "
        "on this host measured it the slower by far",
    )
    args = parser.parse_args()
    # each run works in its own scratch folder, so relative paths would point nowhere
    args.timm_train, args.data, args.weights = (p.resolve() for p in (args.timm_train, args.data, args.weights))
    precisions = [p.strip() for p in args.timm_precisions.split(",")]
    if not precisions or set(precisions) - {"fp32", "bf16"}:
        parser.error("--timm-precisions: fp32, bf16 or fp32,bf16")
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    cfg = load_config(args.config)
    index = index_dataset(args.data)
    classes, train_images = len(index.classes), len(index.splits["train"].samples)
    seeds = [int(s) for s in args.seeds.split(",")]
    results: list[dict] = []
    jobs = [*(("timm", p == "bf16") for p in precisions), ("clothcli", None)]
    for seed, (kind, bf16) in schedule(seeds, args.rounds, jobs):
        if kind == "timm":
            row = run_timm(args.timm_train, cfg, args.data, args.weights, classes, seed, bf16)
        else:
            row = run_clothcli(args.config, args.data, args.weights, seed)
        row["images_per_s"] = round(row["epochs"] * train_images / row["seconds"], 2)
        results.append({**row, "seed": seed})
        print(json.dumps(results[-1]), flush=True)
    by_pipeline: dict[str, list[dict]] = {}
    for row in results:
        by_pipeline.setdefault(row["pipeline"], []).append(row)
    timm_rows = {k: v for k, v in by_pipeline.items() if k.startswith("timm")}
    baseline = min(timm_rows, key=lambda k: statistics.median(r["seconds"] for r in timm_rows[k]))
    base_s = statistics.median(r["seconds"] for r in by_pipeline[baseline])
    print(f"\n{cfg.name}: {len(seeds)} seed(s) {seeds}, {args.rounds} round(s); baseline {baseline} (the faster here)")
    print("| pipeline | wall time (median) | training img/s (median) | mean best validation | mean test | speed-up |")
    for name, rows in by_pipeline.items():
        seconds = statistics.median(r["seconds"] for r in rows)
        speed = statistics.median(r["images_per_s"] for r in rows)
        val = statistics.mean(r["best_val"] for r in rows)
        test = statistics.mean(r["test"] for r in rows)
        print(f"| {name} | {seconds / 60:.1f} min | {speed:.1f} | {val:.2%} | {test:.2%} | {base_s / seconds:.2f}x |")
    host = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    if args.json:
        args.json.write_text(json.dumps({"host": host, "config": str(args.config), "baseline": baseline,
                                         "results": results}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
