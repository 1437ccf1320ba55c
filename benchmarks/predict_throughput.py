"""Prediction throughput: `clothcli predict` against the plain loop, side by side in one run.

The plain loop is what a tutorial writes: open each image with PIL, apply timm's eval transform
(PIL resize), `model(x[None])` one image at a time. Both use the same checkpoint and preprocessing
settings; top-1 agreement between them is reported (clothcli resizes uint8 tensors with torch,
which differs from PIL by one level at most).

The same checkpoint exported to ONNX (and, with --int8-data, to int8) runs through the same
command on ONNX Runtime, without PyTorch; its top-1 agreement with the PyTorch path is reported, and
both paths are also timed on one image (start-up included), which is what a script calling
`clothcli predict` once per photo waits for.

    python benchmarks/predict_throughput.py runs/mobilenet-cpu ../shared/datasets/clothing-dataset-small \
        --int8-data ../shared/datasets/clothing-dataset-small
    python benchmarks/predict_throughput.py --tiny     # generated images, tiny model (CI)
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from timm.data import create_transform

from clothcli.backends import load_classifier
from clothcli.data.images import ImageReadError, load_rgb
from clothcli.data.inputs import collect_inputs
from clothcli.data.preprocess import Preprocess
from clothcli.engines.predict import predict_files
from clothcli.models.checkpoint import load_checkpoint


def plain_loop(checkpoint: Path, files: list[Path]) -> tuple[dict[str, str], float]:
    model, meta = load_checkpoint(checkpoint)
    pre = Preprocess.from_dict(meta["preprocess"])
    transform = create_transform(
        pre.input_size, interpolation=pre.interpolation, mean=pre.mean, std=pre.std, crop_pct=pre.crop_pct
    )
    labels = {}
    start = time.perf_counter()
    with torch.no_grad():
        for path in files:
            try:
                x = transform(load_rgb(path))
            except ImageReadError:
                continue
            labels[str(path)] = meta["classes"][int(model(x[None]).argmax(1))]
    return labels, time.perf_counter() - start


def clothcli_batched(
    checkpoint: Path, files: list[Path], batch: int, workers: int, model_in_workers: bool | None = None
) -> tuple[dict[str, str], float]:
    start = time.perf_counter()
    classifier = load_classifier(checkpoint, in_workers=model_in_workers)
    predictions = predict_files(classifier, files, batch_size=batch, workers=workers)
    labels = {str(p.path): p.label for p in predictions if not p.error}
    return labels, time.perf_counter() - start


def read_labels(path: Path) -> dict[str, str]:
    with open(path, newline="") as fh:
        return {row["path"]: row["label"] for row in csv.DictReader(fh) if not row["error"]}


def whole_command(checkpoint: Path, inputs: list[str], out: Path) -> float:
    """The CLI end to end, start-up included (a fresh process)."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "clothcli", "predict", str(checkpoint), *inputs, "-o", str(out), "--show", "0"],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def onnx_models(checkpoint: Path, folder: Path, calibration: Path | None) -> dict[str, Path]:
    """The checkpoint exported to fp32 ONNX (and int8 with calibration data); empty without the extra."""
    try:
        from clothcli.engines.export import export_onnx
        from clothcli.engines.quantize import int8_path_for
    except ImportError:
        return {}
    report = export_onnx(
        checkpoint=checkpoint, output=folder / "model.onnx", int8=calibration is not None, int8_data=calibration
    )
    models = {"fp32": Path(report.path)}
    if report.int8 is not None:
        models["int8"] = int8_path_for(Path(report.path))
    return models


def make_tiny(root: Path) -> tuple[Path, Path]:
    from PIL import Image

    from clothcli.config import load_config
    from clothcli.training import train

    for split in ("train", "validation"):
        for k, color in enumerate([(200, 30, 30), (30, 200, 30)]):
            for i in range(8):
                path = root / "data" / split / f"c{k}" / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (60, 48), tuple(max(0, c - 9 * i) for c in color)).save(path)
    cfg = load_config(
        None,
        [
            "model.name=test_efficientnet",
            "model.pretrained=false",
            "preprocess.input_size=32",
            "train.epochs=1",
            "train.batch_size=8",
            "data.num_workers=0",
            f"data.root={root / 'data'}",
            f"output_dir={root / 'runs'}",
            f"data.cache_dir={root / 'cache'}",
        ],
    )
    return train(cfg).run_dir, root / "data"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", type=Path)
    parser.add_argument("inputs", nargs="*")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/predict_throughput_cpu.json"))
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--int8-data", type=Path, help="dataset folder: also export and time int8")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the whole commands (median reported)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            args.checkpoint, data = make_tiny(Path(tmp))
            args.inputs, args.workers, args.batch, args.repeats = [str(data)], 0, 8, 1
            args.int8_data = data
        if args.checkpoint is None or not args.inputs:
            parser.error("give CHECKPOINT and INPUTS, or --tiny")
        files = collect_inputs(args.inputs).files
        plain, plain_s = plain_loop(args.checkpoint, files)
        # the model in this process, as on a GPU; the CPU default runs it in the loader workers
        in_process_s = clothcli_batched(args.checkpoint, files, args.batch, args.workers, model_in_workers=False)[1]
        batched, batched_s = clothcli_batched(args.checkpoint, files, args.batch, args.workers)
        one = [str(files[0])]
        exported = onnx_models(args.checkpoint, Path(tmp), args.int8_data)
        # every command in each round, rounds repeated: the host's drift reaches all of them alike
        commands = {"pytorch": args.checkpoint, **{f"onnx {kind}": model for kind, model in exported.items()}}
        runs: dict[str, list[float]] = {name: [] for name in commands}
        one_runs: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, model in commands.items():
                runs[name].append(whole_command(model, args.inputs, Path(tmp) / f"{name.replace(' ', '-')}.csv"))
                one_runs[name].append(whole_command(model, one, Path(tmp) / "one.csv"))
        command_s = statistics.median(runs["pytorch"])
        one_image = {name: statistics.median(times) for name, times in one_runs.items()}
        onnx_rows, onnx_agree, onnx_plain = [], {}, {}
        for kind in exported:
            seconds = statistics.median(runs[f"onnx {kind}"])
            onnx_rows.append(
                {
                    "pipeline": f"clothcli predict command, ONNX Runtime {kind} (start-up included)",
                    "seconds": seconds,
                    "images_per_s": len(files) / seconds,
                    "runs_seconds": runs[f"onnx {kind}"],
                }
            )
            labels = read_labels(Path(tmp) / f"onnx-{kind}.csv")
            onnx_agree[kind] = sum(labels.get(k) == v for k, v in batched.items()) / max(1, len(batched))
            onnx_plain[kind] = sum(labels.get(k) == v for k, v in plain.items()) / max(1, len(plain))
    agree = sum(plain.get(k) == v for k, v in batched.items()) / max(1, len(batched))
    rows = [
        {"pipeline": "plain loop (PIL, one image at a time)", "seconds": plain_s, "images_per_s": len(files) / plain_s},
        {
            "pipeline": "clothcli predict_files, model in this process",
            "seconds": in_process_s,
            "images_per_s": len(files) / in_process_s,
        },
        {"pipeline": "clothcli predict_files (running)", "seconds": batched_s, "images_per_s": len(files) / batched_s},
        {
            "pipeline": "clothcli predict command (start-up included)",
            "seconds": command_s,
            "images_per_s": len(files) / command_s,
            "runs_seconds": runs["pytorch"],
        },
        *onnx_rows,
    ]
    table = Table(title=f"Prediction throughput — {len(files)} images, batch {args.batch}, {args.workers} workers")
    for col in ("pipeline", "seconds", "images/s", "ratio"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["pipeline"],
            f"{r['seconds']:.1f}",
            f"{r['images_per_s']:.0f}",
            f"{r['images_per_s'] / rows[0]['images_per_s']:.2f}x",
        )
    Console(width=120).print(table)
    print(f"top-1 agreement between clothcli and the plain loop: {agree:.2%}")
    for kind, share in onnx_agree.items():
        print(
            f"top-1 agreement between ONNX Runtime {kind} and the PyTorch path: {share:.2%}, "
            f"and the plain loop (PIL resize, as ONNX's): {onnx_plain[kind]:.2%}"
        )
    for r in onnx_rows:
        print(f"{r['pipeline']}: {command_s / r['seconds']:.2f}x the PyTorch command (median of {args.repeats} rounds)")
    print("one image, whole command: " + ", ".join(f"{k} {v:.2f}s" for k, v in one_image.items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "images": len(files),
                "results": rows,
                "top1_agreement": agree,
                "onnx_top1_agreement": onnx_agree,
                "onnx_top1_agreement_with_plain_loop": onnx_plain,
                "one_image_seconds": one_image,
                "repeats": args.repeats,
                "batch": args.batch,
                "workers": args.workers,
            },
            indent=2,
        )
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
