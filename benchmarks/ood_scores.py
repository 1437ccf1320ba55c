"""Out-of-distribution rejection of one model, side by side: every score and bank size on the two
photo folders of `ood_images.py`, and what `--min-confidence auto` costs the predict command.

    python benchmarks/ood_images.py ood/
    python benchmarks/ood_scores.py MODEL --data DATASET --ood ood/ [--bank-sizes all,1024,512] [--json F]

MODEL is a run folder or an exported file; it is copied into a scratch folder and calibrated there
(`clothcli calibrate --ood ood/choose`, once per bank size), then evaluated on the test split against
ood/test, which the choice never saw. The predict command runs over the whole dataset with and
without `--min-confidence auto`, interleaved for `--rounds` rounds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clothcli.engines.calibrate import calibrate
from clothcli.engines.evaluate import evaluate
from clothcli.formats import is_exported


def copy_model(model: Path, folder: Path) -> Path:
    """The model (with the files beside it an export consists of) copied into `folder`."""
    if not is_exported(model):
        target = folder / model.name
        shutil.copytree(model, target, ignore=shutil.ignore_patterns("state", "last", "swa"))
        return target
    for sibling in model.parent.glob(model.stem + ".*"):
        if not sibling.name.endswith(".ood.safetensors"):
            shutil.copy(sibling, folder / sibling.name)
    return folder / model.name


def bank_bytes(model: Path) -> int:
    found = list(model.rglob("ood_bank.safetensors")) if model.is_dir() else [Path(str(model) + ".ood.safetensors")]
    return sum(p.stat().st_size for p in found if p.is_file())


def predict_seconds(model: Path, data: Path, auto: bool) -> float:
    command = [sys.executable, "-m", "clothcli", "predict", str(model), str(data), "-o", str(model.parent / "p.csv")]
    start = time.perf_counter()
    subprocess.run([*command, *(["--min-confidence", "auto"] if auto else [])], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--ood", type=Path, required=True, help="the folder ood_images.py wrote (choose/, test/)")
    parser.add_argument("--bank-sizes", default="all,1024,512")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows, timings = [], {"plain": [], "auto": []}
    with tempfile.TemporaryDirectory(prefix="ood-scores-") as scratch:
        for size in args.bank_sizes.split(","):
            folder = Path(scratch) / f"bank-{size}"
            folder.mkdir()
            model = copy_model(args.model, folder)
            bank_size = None if size == "all" else int(size)
            chosen = calibrate(model=model, data=args.data, ood=args.ood / "choose", bank_size=bank_size).rejection
            tested = evaluate(model=model, data=args.data, split="test", ood=args.ood / "test")
            stored = tested.rejection
            row = {"bank_size": size, "bank_mb": bank_bytes(model) / 2**20, "chosen": chosen["method"],
                   "k": chosen["k"], "choose_accepted": chosen["kept"]["ood"], "test_recall": stored["kept"],
                   "test_accepted": stored["ood_accepted"], "accuracy_kept": stored["accuracy_kept"],
                   "accuracy_all": tested.accuracy, "scores": tested.ood}  # fmt: skip
            rows.append(row)
            if size == "all":
                for _ in range(args.rounds):
                    for mode in ("plain", "auto"):
                        timings[mode].append(predict_seconds(model, args.data, mode == "auto"))
    print("| bank | MB | chosen | accepted (choose) | test recall | accepted (test folder) | accuracy kept / all "
          "| test AUROC knn (stored k) / mahalanobis |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        method = r["chosen"] + (f" k={r['k']}" if r["k"] else "")
        auroc = {s["score"]: s["auroc"] for s in r["scores"]}
        print(
            f"| {r['bank_size']} | {r['bank_mb']:.1f} | {method} | {r['choose_accepted']:.1%} | {r['test_recall']:.1%} "
            f"| {r['test_accepted']:.1%} | {r['accuracy_kept']:.2%} / {r['accuracy_all']:.2%} "
            f"| {auroc['knn']:.4f} / {auroc['mahalanobis']:.4f} |"
        )
    print("\ntest split against the test folder, each score at its own 95%-recall threshold (full bank):")
    print("| score | AUROC | accepted at 95% recall |")
    print("|---|---|---|")
    for s in rows[0]["scores"]:
        print(f"| {s['score']} | {s['auroc']:.4f} | {s['fpr']:.1%} |")
    if timings["plain"]:
        plain, auto = min(timings["plain"]), min(timings["auto"])
        print(
            f"\npredict over {args.data}: plain {', '.join(f'{t:.2f}' for t in timings['plain'])} s; "
            f"--min-confidence auto {', '.join(f'{t:.2f}' for t in timings['auto'])} s; best rounds {auto / plain:.3f}x"
        )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "predict_seconds": timings}, indent=1))


if __name__ == "__main__":
    main()
