"""Sharded predict against one process, and `--resume` bookkeeping over a million-entry input list.

1. `clothcli predict MODEL DATA -o one.csv` in one process, then the same under
   `torchrun --nproc-per-node P` (each process on cores/P threads, as clothcli gives them), side by side
   over `--rounds` interleaved rounds: wall time of the whole command, images/s, and whether the merged
   file is byte for byte the one-process file.
2. A list of `--list-rows` paths of which all but `--todo` already have a row in the output (as after a
   kill near the end), continued with `--from-list ... --resume`: the whole command's wall time, which is
   reading the list, reading the done rows, skipping them and classifying the rest.

    python benchmarks/sharded_predict.py model.onnx ../shared/datasets/clothing-dataset-small \\
        --json benchmarks/results/sharded_predict_cpu.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def timed(command: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - start


def predict_command(model: Path, inputs: list[str], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "clothcli", "predict", str(model), *inputs, "-o", str(out), "--show", "0", *extra]


def sharded_rounds(model: Path, data: Path, processes: int, rounds: int, folder: Path) -> dict:
    images = sum(1 for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    one, many = folder / "one.csv", folder / "many.csv"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "-m", "clothcli"]
    times: dict[str, list[float]] = {"one": [], "sharded": []}
    identical = True
    for round_number in range(rounds):
        order = ["one", "sharded"] if round_number % 2 == 0 else ["sharded", "one"]
        for name in order:
            if name == "one":
                times[name].append(timed(predict_command(model, [str(data)], one)))
            else:
                command = launcher + predict_command(model, [str(data)], many)[3:]
                times[name].append(timed(command, env={**os.environ, "OMP_NUM_THREADS": "1"}))
        identical &= one.read_bytes() == many.read_bytes()
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "images": images,
        "processes": processes,
        "seconds": times,
        "images_per_s": {name: images / seconds for name, seconds in median.items()},
        "ratio_sharded_to_one": median["one"] / median["sharded"],
        "identical_output": identical,
    }


def resume_bookkeeping(model: Path, data: Path, rows: int, todo: int, folder: Path) -> dict:
    """A `rows`-line list whose first rows-todo entries are already in the output (names of files that need
    not exist: done rows are never opened), the last `todo` real images; the resumed command timed."""
    photos = sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:todo]
    listing, out = folder / "list.txt", folder / "out.csv"
    done_names = [f"done/{i // 10000:03d}/{i:07d}.jpg" for i in range(rows - len(photos))]
    real = folder / "todo"
    real.mkdir(exist_ok=True)
    todo_names = []
    for i, photo in enumerate(photos):
        shutil.copyfile(photo, real / f"{i:05d}{photo.suffix}")
        todo_names.append(f"todo/{i:05d}{photo.suffix}")
    listing.write_text("\n".join(done_names + todo_names) + "\n")
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "confidence", "error", "rejected_by"])
        for name in done_names:
            writer.writerow([str(folder / name), "t-shirt", "0.900000", "", ""])
    seconds = timed(predict_command(model, [], out, "--from-list", str(listing), "--resume"))
    with open(out, newline="") as fh:
        written = sum(1 for _ in fh) - 1
    return {"list_rows": rows, "already_done": rows - len(photos), "classified": len(photos),
            "seconds": seconds, "rows_after": written}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="an exported model (.onnx, .xml) or a run folder")
    parser.add_argument("data", type=Path, help="a folder of images")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--list-rows", type=int, default=1_000_000)
    parser.add_argument("--todo", type=int, default=100)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="clothcli-shard-bench-") as scratch:
        folder = Path(scratch)
        sharded = sharded_rounds(args.model, args.data, args.processes, args.rounds, folder)
        print(f"| pipeline | seconds (median of {args.rounds}) | images/s |")
        for name, label in (("one", "one process"), ("sharded", f"{args.processes} processes (torchrun)")):
            seconds = statistics.median(sharded["seconds"][name])
            print(f"| {label} | {seconds:.2f} | {sharded['images_per_s'][name]:.0f} |")
        print(f"sharded / one process: {sharded['ratio_sharded_to_one']:.2f}x; "
              f"merged file identical to one process's: {sharded['identical_output']}")  # fmt: skip
        resume = resume_bookkeeping(args.model, args.data, args.list_rows, args.todo, folder)
        print(
            f"--resume over a {resume['list_rows']:,}-entry list, {resume['already_done']:,} done: "
            f"{resume['seconds']:.1f} s for the whole command ({resume['classified']} classified, "
            f"{resume['rows_after']:,} rows after)"
        )
    host = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    if args.json:
        args.json.write_text(json.dumps({"host": host, "sharded": sharded, "resume": resume}, indent=2) + "\n")


if __name__ == "__main__":
    main()
