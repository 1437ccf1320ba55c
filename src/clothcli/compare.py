"""`clothcli compare`: runs side by side on the same images, and which one to choose.

Each run is evaluated on one split (cached in the run folder, keyed by the split, a fingerprint of
its files and a hash of the checkpoint), counted (MACs and parameters as `flops`, receptive field as
`rf`) and timed (latency per image at batch 1 and 64, median of repeated runs after warm-up, every
model on the same number of threads in this one process). Across runs: McNemar's exact test for each
pair on the images both classified, the Pareto front of accuracy against latency and against MACs,
and a verdict: the cheapest model whose accuracy is not significantly below the best one's.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clothcli.errors import UserError
from clothcli.io_utils import atomic_write_text
from clothcli.run_folder import read_history, training_seconds

SIGNIFICANCE = 0.05
Z_95 = 1.959963984540054
CACHE_DIR = "compare-cache"
CACHE_ENTRIES = 4  # per split and run folder
LATENCY_BATCH = 64
LATENCY_TIE = 0.05  # relative: closer costs are within timing noise


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for a proportion `correct / n` (95% by default)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs: images only A got right, only B got right.

    Under the null hypothesis each discordant image is a fair coin, so the p-value is twice the binomial
    tail of the smaller count (capped at 1)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass
class PairTest:
    a: str
    b: str
    only_a: int  # images A classified correctly and B did not
    only_b: int
    p_value: float

    @property
    def significant(self) -> bool:
        return self.p_value < SIGNIFICANCE


@dataclass
class ModelRow:
    name: str
    arch: str
    input_size: int | None
    params: int | None
    macs: float | None
    receptive_field: int | None = None
    n: int = 0
    correct: int = 0
    accuracy: float = 0.0
    ci_low: float = 0.0
    ci_high: float = 0.0
    macro_f1: float | None = None
    ms_batch1: float | None = None
    ms_batch64: float | None = None
    train_seconds: float | None = None
    epochs: int | None = None
    recipe: str = ""
    pareto_latency: bool = False
    pareto_macs: bool = False
    reference: bool = False  # a row from elsewhere (`--reference`), never measured here
    source: str = ""
    cached: bool = False


@dataclass
class Comparison:
    split: str
    data: str
    device: str
    threads: int
    rows: list[ModelRow]
    pairs: list[PairTest] = field(default_factory=list)
    verdict: str = ""
    chosen: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for pair, data in zip(self.pairs, out["pairs"]):
            data["significant"] = pair.significant
        return out


def data_fingerprint(folder: Path) -> str:
    """A hash of every file's relative path, size and modification time under `folder`: any added,
    removed, renamed or rewritten image changes it, without reading the images."""
    digest = hashlib.sha256()
    for current, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files):
            path = Path(current) / name
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def checkpoint_hash(directory: Path) -> str:
    """A hash of the checkpoint's weights and of what decides its predictions (classes, preprocessing)."""
    from clothcli.checkpoint import META_FILE, WEIGHTS_FILE

    digest = hashlib.sha256()
    with open(directory / WEIGHTS_FILE, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    digest.update(json.dumps([meta["classes"], meta["preprocess"]], sort_keys=True).encode())
    return digest.hexdigest()


@dataclass
class SplitResult:
    """What compare needs of one run's evaluation: per file, whether it was right; and the summary."""

    n: int
    correct: int
    macro_f1: float
    right: dict[str, bool]  # path relative to the split folder -> classified correctly
    cached: bool = False


def cache_folder(checkpoint: Path) -> Path:
    """Where compare keeps a checkpoint's evaluations: its run folder, never the checkpoint folder itself,
    which training replaces whole."""
    return checkpoint.parent / CACHE_DIR


def evaluate_cached(checkpoint: Path, data: Path, split: str, use_cache: bool = True) -> SplitResult:
    """The checkpoint's evaluation on `data/<split>`, from its run folder's compare-cache/ when the data and
    the checkpoint are unchanged; computed (and stored) otherwise. A few recent entries are kept per
    split, so comparing best/ and last/ in turn does not recompute."""
    from clothcli.evaluation_report import resolve_eval_folder

    folder = resolve_eval_folder(data, split)
    key = f"{split}-{checkpoint_hash(checkpoint)[:16]}-{data_fingerprint(folder)[:16]}.json"
    cache = cache_folder(checkpoint) / key
    if use_cache and cache.is_file():
        try:
            stored = json.loads(cache.read_text(encoding="utf-8"))
            return SplitResult(stored["n"], stored["correct"], stored["macro_f1"], stored["right"], cached=True)
        except (OSError, ValueError, KeyError):
            pass  # an unreadable cache entry is recomputed
    from clothcli.evaluation import evaluate_checkpoint

    report = evaluate_checkpoint(checkpoint, data, split, calibrated=False)
    right = {str(Path(f["path"]).relative_to(folder)): f["true"] == f["predicted"] for f in report.files}
    result = SplitResult(report.n, report.correct, report.averages.get("macro", {}).get("f1", 0.0), right)
    entries = (
        sorted(cache.parent.glob(f"{split}-*.json"), key=lambda p: p.stat().st_mtime) if cache.parent.is_dir() else []
    )
    for stale in entries[: max(0, len(entries) - (CACHE_ENTRIES - 1))]:
        stale.unlink(missing_ok=True)
    payload = {"n": result.n, "correct": result.correct, "macro_f1": result.macro_f1, "right": right}
    atomic_write_text(cache, json.dumps(payload) + "\n")
    return result


def _training_summary(checkpoint: Path) -> tuple[float | None, int | None, str]:
    """Training time (seconds, validation included) and epochs from the run's metrics.csv; the recipe in a
    few words from its config.yaml. None and "" for a checkpoint outside a run folder."""
    run = checkpoint.parent
    history = read_history(run)
    seconds, epochs = (training_seconds(history), len(history)) if history else (None, None)
    recipe = ""
    config = run / "config.yaml"
    if config.is_file():
        import yaml

        cfg = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        optim, train = cfg.get("optim", {}), cfg.get("train", {})
        recipe = f"{optim.get('name', '?')} lr {optim.get('lr', '?')}, {train.get('epochs', '?')} epochs"
        if (train.get("ema") or {}).get("enabled"):
            recipe += ", EMA"
        if (train.get("swa") or {}).get("enabled"):
            recipe += ", SWA"
    return seconds, epochs, recipe


def _structure(run: Path, device: Any, latency: bool, timed: dict[tuple, tuple[float, float]]) -> dict[str, Any]:
    """MACs, parameters and receptive field of the model as trained; latency of the model as it runs.

    Latency is a property of the network, not of its weights: runs of one architecture at one input size
    (same parameter and MAC counts) are timed once, through `timed`, so that timing noise cannot rank
    two copies of one network (two MobileNetV3-Small runs measured 2.1 and 2.6 ms apart)."""
    from clothcli.analysis.flops import count, steady_latency
    from clothcli.analysis.rf import trace
    from clothcli.inference import load_for_inference

    plain = load_for_inference(run, "cpu", fold=False)
    size = (3, plain.preprocess.input_size, plain.preprocess.input_size)
    counted = count(plain.model, size, depth=0)
    field_rows = trace(plain.model, size).output
    out: dict[str, Any] = {
        "arch": plain.arch,
        "classes": plain.classes,
        "input_size": plain.preprocess.input_size,
        "macs": counted.macs,
        "params": counted.params,
        "receptive_field": int(max(field_rows.rf)) if field_rows is not None and field_rows.rf else None,
    }
    if latency:
        network = (plain.arch, size, counted.params, counted.macs)
        if network not in timed:
            running = load_for_inference(run, device)
            timed[network] = (
                steady_latency(running.model, size, 1, device),
                steady_latency(running.model, size, LATENCY_BATCH, device),
            )
        out["ms_batch1"], out["ms_batch64"] = timed[network]
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (cost, accuracy) points, whether each is on the front: no other point is at least as cheap and
    at least as accurate, and better in one of the two."""
    front = []
    for i, (cost, accuracy) in enumerate(points):
        dominated = any(
            c <= cost and a >= accuracy and (c < cost or a > accuracy) for j, (c, a) in enumerate(points) if j != i
        )
        front.append(not dominated)
    return front


def read_references(path: Path) -> list[ModelRow]:
    """Reference rows from a YAML list or a CSV file with columns name, accuracy and optionally arch,
    input_size, params, macs, macro_f1, n, source. They are shown, never measured nor tested against."""
    if not path.is_file():
        raise UserError(f"reference file not found: {path}")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            entries = list(csv.DictReader(fh))
    else:
        import yaml

        entries = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    if not isinstance(entries, list):
        raise UserError(f"{path}: expected a list of rows (name, accuracy, ...)")
    rows = []
    for i, entry in enumerate(entries, 1):
        try:
            macs = entry.get("macs")
            rows.append(
                ModelRow(
                    name=str(entry["name"]),
                    arch=str(entry.get("arch", "")),
                    input_size=int(entry["input_size"]) if entry.get("input_size") else None,
                    params=int(float(entry["params"])) if entry.get("params") else None,
                    macs=float(macs) if macs not in (None, "") else None,
                    accuracy=float(entry["accuracy"]),
                    macro_f1=float(entry["macro_f1"]) if entry.get("macro_f1") not in (None, "") else None,
                    n=int(entry.get("n") or 0),
                    reference=True,
                    source=str(entry.get("source", "")),
                )
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"{path}: row {i} needs at least name and accuracy as numbers ({exc})") from None
    return rows


def _check_same_classes(runs: list[Path], classes: list[list[str]]) -> None:
    """Runs compared on the same images must know the same classes (in any order)."""
    from clothcli.data.layout import class_difference

    for run, names in zip(runs[1:], classes[1:]):
        if set(names) != set(classes[0]):
            raise UserError(f"{run} has other classes than {runs[0]}: it {class_difference(classes[0], names)}")


def compare_runs(
    runs: list[str | Path],
    data: str | Path,
    split: str = "test",
    device: str | None = None,
    threads: int | None = None,
    latency: bool = True,
    use_cache: bool = True,
    references: str | Path | None = None,
) -> Comparison:
    """Evaluate, count and time every run on the same images, and test them against each other."""
    import torch

    from clothcli.runtime import resolve_device

    if not runs:
        raise UserError("give at least one run folder")
    from clothcli.checkpoint import find_checkpoint

    paths = [Path(r) for r in runs]
    checkpoints = [find_checkpoint(p) for p in paths]
    # a run folder by its name; a checkpoint folder given itself (best/, last/) with its run's name too
    names = [
        p.name if c.parent.resolve() == p.resolve() else f"{c.parent.name}/{c.name}" for p, c in zip(paths, checkpoints)
    ]
    if len(set(names)) != len(names):
        names = [str(p) for p in paths]
    data = Path(data)
    target = resolve_device(device)
    default_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        timed: dict[tuple, tuple[float, float]] = {}
        structures = [_structure(c, target, latency, timed) for c in checkpoints]
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(default_threads)
    _check_same_classes(paths, [s["classes"] for s in structures])
    rows, results = [], []
    for name, checkpoint, structure in zip(names, checkpoints, structures):
        result = evaluate_cached(checkpoint, data, split, use_cache)
        seconds, epochs, recipe = _training_summary(checkpoint)
        low, high = wilson_interval(result.correct, result.n)
        rows.append(
            ModelRow(
                name=name,
                **{k: v for k, v in structure.items() if k != "classes"},
                n=result.n,
                correct=result.correct,
                accuracy=result.correct / result.n if result.n else 0.0,
                ci_low=low,
                ci_high=high,
                macro_f1=result.macro_f1,
                train_seconds=seconds,
                epochs=epochs,
                recipe=recipe,
                cached=result.cached,
            )
        )
        results.append(result)
    pairs = []
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            shared = results[i].right.keys() & results[j].right.keys()
            only_a = sum(results[i].right[k] and not results[j].right[k] for k in shared)
            only_b = sum(results[j].right[k] and not results[i].right[k] for k in shared)
            pairs.append(PairTest(rows[i].name, rows[j].name, only_a, only_b, mcnemar_exact(only_a, only_b)))
    if latency:
        for row, front in zip(rows, pareto_front([(r.ms_batch1 or math.inf, r.accuracy) for r in rows])):
            row.pareto_latency = front
    for row, front in zip(rows, pareto_front([(r.macs or math.inf, r.accuracy) for r in rows])):
        row.pareto_macs = front
    comparison = Comparison(split, str(data), str(target), used_threads, rows, pairs)
    comparison.chosen, comparison.verdict = verdict(rows, pairs, latency)
    if references is not None:
        comparison.rows += read_references(Path(references))
    return comparison


def verdict(rows: list[ModelRow], pairs: list[PairTest], latency: bool) -> tuple[str | None, str]:
    """The cheapest model (latency at batch 1, else MACs) whose accuracy is not significantly below the best."""
    if not rows:
        return None, ""
    best = max(rows, key=lambda r: (r.accuracy, -(r.macs or 0)))
    tests = {(p.a, p.b): p for p in pairs} | {(p.b, p.a): p for p in pairs}
    cost_name = "latency" if latency else "MACs"

    def cost(row: ModelRow) -> float:
        value = row.ms_batch1 if latency else row.macs
        return value if value is not None else math.inf

    candidates = [r for r in rows if r is best or not tests[(r.name, best.name)].significant]
    cheapest = min(cost(r) for r in candidates)
    # costs within LATENCY_TIE of the cheapest count as equal (timing noise): the most accurate of those,
    # then the higher macro-F1
    near = [r for r in candidates if cost(r) <= cheapest * (1 + LATENCY_TIE)]
    chosen = max(near, key=lambda r: (r.accuracy, r.macro_f1 or 0.0, -cost(r)))
    if chosen is best:
        others = [r for r in rows if r is not best]
        if not others:
            return chosen.name, f"{chosen.name}: the only model compared"
        return chosen.name, (
            f"{chosen.name}: the most accurate ({chosen.accuracy:.2%}) is also the cheapest by {cost_name} "
            "among the models not significantly worse"
        )
    test = tests[(chosen.name, best.name)]
    ratio = cost(best) / cost(chosen) if cost(chosen) else math.inf
    return chosen.name, (
        f"{chosen.name}: {chosen.accuracy:.2%} is not significantly below the best, {best.name} "
        f"{best.accuracy:.2%} (McNemar p = {test.p_value:.2f}), at {ratio:.1f}x less {cost_name}"
    )


def markdown_table(comparison: Comparison) -> str:
    """The comparison as a Markdown document: the table, the pairwise tests and the verdict."""
    lines = [
        f"Split `{comparison.split}` of `{comparison.data}`; latency on {comparison.device}, "
        f"{comparison.threads} threads, median of repeated runs, once per network (architecture and input "
        "size). ◆ on the Pareto front (accuracy against "
        "latency / against MACs). Reference rows were measured elsewhere and are not tested here.",
        "",
        "| model | arch | input | params | GMACs | RF px | accuracy [95% CI] | macro-F1 | ms/img b1 | ms/img b64 "
        "| training | front |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in comparison.rows:
        lines.append("| " + " | ".join(_cells(r)) + " |")
    if comparison.pairs:
        lines += ["", "| A | B | only A right | only B right | McNemar p |", "|---|---|---|---|---|"]
        for p in comparison.pairs:
            mark = " *" if p.significant else ""
            lines.append(f"| {p.a} | {p.b} | {p.only_a} | {p.only_b} | {p.p_value:.3f}{mark} |")
        lines += ["", f"\\* p < {SIGNIFICANCE}: the accuracy difference is unlikely to be chance."]
    if comparison.verdict:
        lines += ["", f"**Verdict:** {comparison.verdict}."]
    return "\n".join(lines) + "\n"


def _cells(r: ModelRow) -> list[str]:
    def number(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    accuracy = f"{r.accuracy:.2%}"
    if not r.reference:
        accuracy += f" [{r.correct}/{r.n}] ({r.ci_low:.1%}–{r.ci_high:.1%})"
    training = "reference: " + r.source if r.reference else ""
    if not r.reference and r.train_seconds is not None:
        training = f"{r.train_seconds / 60:.1f} min, {r.recipe}"
    front = "".join(("◆ latency " if r.pareto_latency else "", "◆ MACs" if r.pareto_macs else "")).strip()
    return [
        r.name + (" (reference)" if r.reference else ""),
        r.arch,
        number(r.input_size, "d"),
        "-" if r.params is None else f"{r.params / 1e6:.2f} M",
        number(None if r.macs is None else r.macs / 1e9, ".3f"),
        number(r.receptive_field, "d"),
        accuracy,
        number(None if r.macro_f1 is None else 100 * r.macro_f1, ".2f"),
        number(r.ms_batch1, ".2f"),
        number(r.ms_batch64, ".2f"),
        training,
        front,
    ]


def write_comparison(comparison: Comparison, path: Path) -> None:
    """The comparison as Markdown, JSON or CSV, by `path`'s extension."""
    kind = path.suffix.lower()
    if kind == ".md":
        atomic_write_text(path, markdown_table(comparison))
    elif kind == ".json":
        atomic_write_text(path, json.dumps(comparison.to_dict(), indent=2) + "\n")
    elif kind == ".csv":
        buffer = io.StringIO()
        columns = list(asdict(comparison.rows[0]).keys()) if comparison.rows else ["name"]
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(asdict(r) for r in comparison.rows)
        atomic_write_text(path, buffer.getvalue())
    else:
        raise UserError(f"-o must end in .md, .json or .csv, got '{path.name}'")


def plot_pareto(comparison: Comparison, path: Path) -> None:
    """Accuracy against latency and against MACs, with 95% intervals, the front joined, references hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    measured = [r for r in comparison.rows if not r.reference]
    panels = [("ms per image, batch 1", "ms_batch1", "pareto_latency"), ("GMACs", "macs", "pareto_macs")]
    panels = [p for p in panels if any(getattr(r, p[1]) is not None for r in measured)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (label, key, front_key) in zip(axes[0], panels):
        scale = 1e9 if key == "macs" else 1.0
        points = [(getattr(r, key) / scale, r) for r in measured if getattr(r, key) is not None]
        placed: list[tuple[float, float]] = []
        for index, (x, r) in enumerate(sorted(points, key=lambda p: (p[0], -p[1].accuracy))):
            ax.errorbar(
                x,
                100 * r.accuracy,
                yerr=[[100 * (r.accuracy - r.ci_low)], [100 * (r.ci_high - r.accuracy)]],
                fmt="o",
                color="tab:blue" if getattr(r, front_key) else "tab:gray",
                capsize=3,
            )
            # labels of points close together are stacked downwards instead of printed over each other
            crowd = sum(abs(math.log10(x / px)) < 0.08 and abs(100 * r.accuracy - py) < 0.8 for px, py in placed)
            placed.append((x, 100 * r.accuracy))
            # and neighbours along the axis alternate above and below their points
            lift = 4 if index % 2 == 0 else -14
            ax.annotate(
                r.name, (x, 100 * r.accuracy), textcoords="offset points", xytext=(6, lift - 11 * crowd), fontsize=8
            )
        front = sorted((x, 100 * r.accuracy) for x, r in points if getattr(r, front_key))
        if len(front) > 1:
            ax.plot(*zip(*front), "--", color="tab:blue", linewidth=1)
        if key == "macs":
            for r in comparison.rows:
                if r.reference and r.macs is not None:
                    ax.scatter(r.macs / scale, 100 * r.accuracy, facecolors="none", edgecolors="tab:red")
                    ax.annotate(
                        r.name + " (ref.)",
                        (r.macs / scale, 100 * r.accuracy),
                        textcoords="offset points",
                        xytext=(5, -10),
                        fontsize=8,
                        color="tab:red",
                    )
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(label + " (log)")
        ax.set_ylabel(f"accuracy on {comparison.split} (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
