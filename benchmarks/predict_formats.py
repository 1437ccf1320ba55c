"""The whole `clothcli predict` command on each deployment format, against ONNX Runtime fp32 and against
decoding alone, side by side in one run.

The run is exported (`clothcli export`) to ONNX and to an OpenVINO IR, fp32 and int8 (NNCF, calibrated
on the training split); each file runs through the same command in a fresh process, start-up included,
over the same folder, and an IR also in bf16 (`--precision bf16`). Every round runs each command once,
in forward order on even rounds and backward on odd ones, and times decoding alone in this process (the
JPEGs at the reduced scale the pipeline decodes at, on the same threads: what no model and no resize
could beat). Ratios are taken within each round and summarised by their median.

    python benchmarks/predict_formats.py runs/mobilenet-cpu ../shared/datasets/clothing-dataset-small
    python benchmarks/predict_formats.py --tiny     # generated images, tiny model (CI)
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

from rich.console import Console
from rich.table import Table

from clothcli.backends import load_classifier
from clothcli.data.inputs import collect_inputs
from clothcli.engines.benchmark import decode_rate
from clothcli.engines.export import export_onnx
from clothcli.engines.quantize import int8_path_for

BASELINE = "ONNX Runtime fp32"


def exported_models(run: Path, folder: Path, calibration: Path) -> dict[str, tuple[Path, list[str]]]:
    """Each row's file and its extra predict options: ONNX fp32, and an IR in f32, bf16 and int8."""
    onnx = Path(export_onnx(checkpoint=run, output=folder / "model.onnx").path)
    xml = Path(export_onnx(checkpoint=run, output=folder / "model.xml", int8=True, int8_data=calibration).path)
    return {
        BASELINE: (onnx, []),
        "OpenVINO f32": (xml, []),
        "OpenVINO bf16": (xml, ["--precision", "bf16"]),
        "OpenVINO int8": (int8_path_for(xml), []),
    }


def whole_command(model: Path, options: list[str], inputs: list[str], workers: int, out: Path) -> float:
    """Seconds of `clothcli predict` end to end in a fresh process."""
    command = [sys.executable, "-m", "clothcli", "predict", str(model), *inputs, "-o", str(out), "--show", "0"]
    start = time.perf_counter()
    subprocess.run([*command, "--workers", str(workers), *options], check=True, capture_output=True)
    return time.perf_counter() - start


def labels(path: Path) -> dict[str, str]:
    with open(path, newline="") as fh:
        return {row["path"]: row["label"] for row in csv.DictReader(fh) if not row["error"]}


def measure(models: dict, inputs: list[str], rounds: int, workers: int, scratch: Path) -> dict[str, list[float]]:
    """Images/s of every command and of decoding alone, per round."""
    files = collect_inputs(inputs).files
    preprocess = load_classifier(next(iter(models.values()))[0], calibrated=False).preprocess
    names = list(models)
    rates: dict[str, list[float]] = {name: [] for name in [*names, "decoding only"]}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            model, options = models[name]
            out = scratch / f"{name.replace(' ', '-')}.csv"
            rates[name].append(len(files) / whole_command(model, options, inputs, workers, out))
        rates["decoding only"].append(decode_rate(files, preprocess, workers))
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", type=Path, help="a clothcli run folder (or checkpoint)")
    parser.add_argument("data", nargs="?", type=Path, help="a dataset folder: every image in it is predicted")
    parser.add_argument("--calibration", type=Path, help="dataset whose train split calibrates int8 (DATA)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/predict_formats_cpu.json"))
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        if args.tiny:
            sys.path.insert(0, str(Path(__file__).parent))
            from predict_throughput import make_tiny

            args.run, args.data = make_tiny(scratch)
            args.rounds, args.workers = 1, 0
        if args.run is None or args.data is None:
            parser.error("give RUN and DATA, or --tiny")
        models = exported_models(args.run, scratch, args.calibration or args.data)
        rates = measure(models, [str(args.data)], args.rounds, args.workers, scratch)
        by_name = {name: labels(scratch / f"{name.replace(' ', '-')}.csv") for name in models}
        images = len(collect_inputs([str(args.data)]).files)
    baseline, ceiling = rates[BASELINE], rates["decoding only"]
    rows = []
    for name, per_round in rates.items():
        agree = None
        if name in by_name:
            reference = by_name[BASELINE]
            agree = sum(by_name[name].get(k) == v for k, v in reference.items()) / max(1, len(reference))
        rows.append(
            {
                "model": name,
                "images_per_s": statistics.median(per_round),
                "round_images_per_s": per_round,
                "vs_onnx_fp32": statistics.median(a / b for a, b in zip(per_round, baseline)),
                "vs_decoding": statistics.median(a / b for a, b in zip(per_round, ceiling)),
                "agreement_with_onnx_fp32": agree,
            }
        )
    table = Table(title=f"clothcli predict over {images} images, {args.workers} workers, {args.rounds} rounds")
    for column in ("model", "images/s (median)", "x ONNX Runtime fp32", "of decoding only", "agrees with ORT fp32"):
        table.add_column(column)
    for row in rows:
        agree = "" if row["agreement_with_onnx_fp32"] is None else f"{row['agreement_with_onnx_fp32']:.2%}"
        against_baseline = "" if row["model"] == "decoding only" else f"{row['vs_onnx_fp32']:.2f}x"
        table.add_row(row["model"], f"{row['images_per_s']:.0f}", against_baseline, f"{row['vs_decoding']:.0%}", agree)
    Console(width=120).print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"images": images, "rounds": args.rounds, "workers": args.workers, "rows": rows}))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
