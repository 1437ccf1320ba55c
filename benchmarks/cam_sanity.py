"""Do a run's class-activation maps depend on what it learnt? The cascading randomisation test of every
method on one split, and what drawing the maps costs.

    python benchmarks/cam_sanity.py RUN --data DATASET [--split validation] [--images 64] [--json F]

For each of gradcam, gradcam++, layercam and eigencam: the mean Spearman rank correlation between the
trained model's maps and the maps once the network is re-initialised from the head down (a step per
block), the verdict where the map's layer and everything above it are random (below 0.5: the maps
depend on the learnt weights), and the seconds per image to draw an overlay (maps of the predicted and
the true class, as `evaluate --cam` does for a mistake).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from clothcli.backends import load_classifier
from clothcli.engines.evaluate import evaluate_classifier
from clothcli.engines.explain import cam_pictures, check_maps, prepare_cams

METHODS = ("gradcam", "gradcam++", "layercam", "eigencam")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--images", type=int, default=64, help="images the randomisation test compares maps on")
    parser.add_argument("--timed", type=int, default=32, help="images whose overlays are timed")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    classifier = load_classifier(args.run, in_workers=False)
    evaluation = evaluate_classifier(classifier, args.data, args.split, workers=2)
    print(f"{classifier.arch} on {args.split}: {evaluation.accuracy:.2%} [{evaluation.correct}/{evaluation.n}]")
    rows = evaluation.files
    timed = [{**row, "predicted": row["predicted"] if i % 2 else _other(row, classifier.classes)}
             for i, row in enumerate(rows[: args.timed])]  # fmt: skip
    results = []
    for method in METHODS:
        setup = prepare_cams(classifier, method)
        start = time.perf_counter()
        check = check_maps(setup, rows, args.images)
        check_s = time.perf_counter() - start
        start = time.perf_counter()
        drawn = sum(1 for _ in cam_pictures(setup, timed))
        per_image = (time.perf_counter() - start) / max(drawn, 1)
        results.append({"method": method, "layer": setup.layer.name, "grid": list(setup.layer.grid), "check": check,
                        "check_seconds": check_s, "overlay_seconds_per_image": per_image})  # fmt: skip
        steps = ", ".join(
            f"{s['group']} {s['spearman']:.2f}" if s["spearman"] is not None else f"{s['group']} -"
            for s in check["steps"]
        )
        verdict = "undecided" if check["passed"] is None else ("passes" if check["passed"] else "FAILS")
        print(
            f"{method:10s} layer {setup.layer.name} {setup.layer.grid}: Spearman at the layer {check['spearman']:.3f} "
            f"({verdict}); overlay {per_image * 1000:.0f} ms/image; check {check_s:.1f} s\n    cascade: {steps}"
        )
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "split": args.split, "methods": results}, indent=2))
        print(f"wrote {args.json}")


def _other(row: dict, classes: list[str]) -> str:
    """A class other than the true one: every other timed overlay is drawn as a mistake (two maps)."""
    return next(c for c in classes if c != row["true"])


if __name__ == "__main__":
    main()
