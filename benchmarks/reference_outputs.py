"""Reference outputs of the CPU recipe: what a change that must not alter behaviour is checked against.

Trains `conf/mobilenet-cpu.yaml` (or reuses `--run` when it exists and `--no-train` is given), then
runs predict, evaluate, export (fp32 and int8), calibrate, flops, rf and compare on it, each writing
its machine-readable output into OUT. A `digests.json` lists the SHA-256 of every output (timings
removed where a command prints them) and the tensor digest of best/ (SHA-256 over the sorted keys,
each tensor's dtype, shape and bytes). Two OUT folders made on one host before and after a change
are compared with `--compare OLD NEW`.

    python benchmarks/reference_outputs.py ../shared/datasets/clothing-dataset-small \
        ../shared/weights/tf_mobilenetv3_small_100.in1k.safetensors --out benchmarks/reference/cpu-recipe
    python benchmarks/reference_outputs.py --compare OLD_OUT NEW_OUT
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shutil
import subprocess
import sys
from pathlib import Path

TIMING_KEYS = {"seconds", "ms_batch1", "ms_batch64", "latency", "cached", "train_seconds"}


def tensor_digest(weights: Path) -> str:
    """SHA-256 over sorted keys, dtype, shape and bytes: equal weights give equal digests whatever the
    file's header order."""
    from safetensors.numpy import load_file

    digest = hashlib.sha256()
    for key, value in sorted(load_file(str(weights)).items()):
        digest.update(key.encode())
        digest.update(str(value.dtype).encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def strip_timings(value):
    """A JSON value without its timing fields (they differ from run to run)."""
    if isinstance(value, dict):
        return {k: strip_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [strip_timings(v) for v in value]
    return value


def run(*args: str) -> str:
    print("$ clothcli", " ".join(args), flush=True)
    done = subprocess.run(["clothcli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"clothcli {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done.stdout


def host() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    has = [f for f in ("avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags]
    return f"{name}, {len([line for line in flags.splitlines() if line.startswith('processor')])} cores, " + (
        ", ".join(has) or "avx2 only"
    )


def record(data: Path, weights: Path, out: Path, run_dir: Path, train: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if train:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run("train", "conf/mobilenet-cpu.yaml", "--data", str(data), "--weights", str(weights),
            "--output-dir", str(run_dir.parent), "--name", run_dir.name)  # fmt: skip
    val = str(data / "validation")
    run("predict", str(run_dir), val, "--top-k", "3", "-o", str(out / "predict.csv"))
    run("evaluate", str(run_dir), str(data), "--split", "validation", "--json", str(out / "evaluate.json"),
        "--markdown", str(out / "evaluate.md"), "--errors", str(out / "errors.csv"))  # fmt: skip
    onnx = out / "model.onnx"
    export_text = run("export", str(run_dir), "-o", str(onnx), "--verify", str(data), "--int8", "--int8-data",
                      str(data), "--json", str(out / "export.json"))  # fmt: skip
    verified = [line for line in export_text.splitlines() if "agree" in line or "verif" in line.lower()]
    (out / "export-verification.txt").write_text("\n".join(verified) + "\n", encoding="utf-8")
    run("predict", str(onnx), val, "--top-k", "3", "-o", str(out / "predict-onnx.csv"))
    run("evaluate", str(onnx), str(data), "--split", "validation", "--json", str(out / "evaluate-onnx.json"))
    run("calibrate", str(run_dir), "--data", str(data), "--dry-run", "--json", str(out / "calibrate.json"))
    run("flops", str(run_dir), "--no-latency", "--json", str(out / "flops.json"))
    run("rf", str(run_dir), "--json", str(out / "rf.json"))
    run("compare", str(run_dir / "best"), str(run_dir / "last"), "--data", str(data), "--split", "validation",
        "--no-latency", "--no-cache", "-o", str(out / "compare.json"))  # fmt: skip
    digests = {"host": host(), "python": platform.python_version(), "best_tensors": tensor_digest(
        run_dir / "best" / "model.safetensors")}  # fmt: skip
    for path in sorted(out.iterdir()):
        if path.suffix in (".csv", ".md", ".txt"):
            digests[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.suffix == ".json" and path.name != "digests.json":
            text = json.dumps(strip_timings(json.loads(path.read_text())), sort_keys=True)
            digests[path.name] = hashlib.sha256(text.encode()).hexdigest()
    for onnx_file in out.glob("*.onnx"):
        onnx_file.unlink()  # large, and not an output to compare byte for byte (exporter metadata)
    (out / "digests.json").write_text(json.dumps(digests, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(digests, indent=2))


def numbers_differ(a, b, tolerance: float, where: str, found: list[str]) -> None:
    """Every place two JSON values differ, numbers beyond `tolerance` only."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            numbers_differ(a.get(key), b.get(key), tolerance, f"{where}.{key}", found)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            numbers_differ(x, y, tolerance, f"{where}[{i}]", found)
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if not math.isclose(a, b, rel_tol=0, abs_tol=tolerance):
            found.append(f"{where}: {a} != {b}")
        elif a != b:
            found.append(f"{where}: {a} ~ {b} (within {tolerance:g})")
    elif a != b:
        found.append(f"{where}: {str(a)[:80]} != {str(b)[:80]}")


def csv_differences(old: Path, new: Path, tolerance: float) -> list[str]:
    """Cells of two CSV files that differ: numbers beyond `tolerance`, any other text."""
    import csv

    rows = [list(csv.reader(p.read_text(encoding="utf-8").splitlines())) for p in (old, new)]
    if len(rows[0]) != len(rows[1]):
        return [f"{len(rows[0])} rows != {len(rows[1])} rows"]
    found = []
    for number, (a, b) in enumerate(zip(*rows)):
        for x, y in zip(a, b):
            try:
                if abs(float(x) - float(y)) > tolerance:
                    found.append(f"row {number}: {x} != {y}")
            except ValueError:
                if x != y:
                    found.append(f"row {number}: {x[:60]} != {y[:60]}")
    return found


def compare(old: Path, new: Path, tolerance: float) -> int:
    """Print, per output, identical / equal within `tolerance` / different; exit 1 on a real difference.
    Paths into each output folder are compared relative to it (exported files are written there)."""
    old_d, new_d = (json.loads((p / "digests.json").read_text()) for p in (old, new))
    failed = 0
    for key in sorted(set(old_d) | set(new_d)):
        if key in ("host", "python"):
            continue
        if old_d.get(key) == new_d.get(key):
            print(f"identical  {key}")
            continue
        if key.endswith(".json") and (old / key).is_file() and (new / key).is_file():
            found: list[str] = []
            a, b = (strip_timings(json.loads((p / key).read_text().replace(str(p), "OUT"))) for p in (old, new))
            numbers_differ(a, b, tolerance, key, found)
            real = [line for line in found if "within" not in line]
            print(f"{'DIFFERENT' if real else 'within':9}  {key}: {len(found)} values differ, {len(real)} beyond "
                  f"{tolerance:g}")  # fmt: skip
            for line in (real or found)[:8]:
                print("    " + line)
            failed += bool(real)
        elif key.endswith(".csv"):
            # printed with 6 decimals: float32 and float64 probabilities may round to neighbours
            real = csv_differences(old / key, new / key, tolerance + 1e-9)
            print(f"{'DIFFERENT' if real else 'within':9}  {key}: no cell beyond {tolerance:g}" if not real else
                  f"DIFFERENT  {key}: {len(real)} cells")  # fmt: skip
            for line in real[:8]:
                print("    " + line)
            failed += bool(real)
        else:
            print(f"DIFFERENT  {key}")
            failed += 1
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, nargs="?")
    parser.add_argument("weights", type=Path, nargs="?")
    parser.add_argument("--out", type=Path, default=Path("reference-outputs"))
    parser.add_argument("--run", type=Path, default=Path("runs/reference-cpu-recipe"))
    parser.add_argument("--no-train", action="store_true", help="Use --run as it is.")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"))
    parser.add_argument("--tolerance", type=float, default=1e-6)
    args = parser.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare, args.tolerance))
    if args.data is None or args.weights is None:
        parser.error("DATA and WEIGHTS are needed to record")
    record(args.data, args.weights, args.out, args.run, train=not args.no_train)


if __name__ == "__main__":
    main()
