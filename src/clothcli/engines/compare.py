"""`clothcli compare`: models side by side on the same images, and which one to choose.

Any mix of run folders, checkpoint folders and exported files: a run and its fp32 and int8 exports
side by side answer "did int8 cost me accuracy?" with a p-value. Each model is evaluated on one
split (cached in the user's cache folder, keyed by the split, a fingerprint of its files and a hash
of the model), counted (MACs and parameters as `flops`, receptive field as `rf`, from the network
its metadata describes) and timed through its own backend (latency per image at batch 1 and 64,
median of repeated runs after warm-up, every model on the same number of threads in this one
process). Across models: McNemar's exact test for each pair on the images both classified, the
Pareto front of accuracy against latency and against MACs, and a verdict: the cheapest model whose
accuracy is not significantly below the best one's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clothcli.backends import Classifier, load_classifier
from clothcli.data.images import image_stamp
from clothcli.data.layout import SplitIndex, class_difference
from clothcli.engines.comparison import (
    Comparison,
    ModelRow,
    PairTest,
    mcnemar_exact,
    pareto_front,
    read_references,
    verdict,
    wilson_interval,
)
from clothcli.engines.evaluate import evaluate_classifier, split_of
from clothcli.errors import UserError
from clothcli.formats import PYTORCH
from clothcli.io_utils import atomic_write_text, user_cache_dir
from clothcli.timing import steady_seconds
from clothcli.training.run_folder import read_history, training_seconds

CACHE_ENTRIES = 64  # evaluations kept in the cache folder, the most recent
LATENCY_BATCH = 64


def cache_folder() -> Path:
    """Where compare keeps evaluations: the user's cache folder, never beside a model someone else owns."""
    return user_cache_dir() / "compare"


def data_fingerprint(index: SplitIndex) -> str:
    """A hash of every image's relative path, size and modification time in the split: any added,
    removed, renamed or rewritten image changes it, without reading the images."""
    digest = hashlib.sha256()
    for path, target in sorted(index.samples):
        size, mtime_ns = image_stamp(path)
        digest.update(f"{image_id(path, index.directory)}\0{target}\0{size}\0{mtime_ns}\n".encode())
    return digest.hexdigest()


def image_id(path: Path, folder: Path) -> str:
    """What pairs one image across models: its path relative to the split's folder."""
    return str(Path(os.path.abspath(path)).relative_to(os.path.abspath(folder)))


def model_hash(classifier: Classifier) -> str:
    """A hash of what decides the model's predictions: a checkpoint's weights, classes and preprocessing,
    or an exported file's bytes."""
    digest = hashlib.sha256()
    source = classifier.source
    weights = source / "model.safetensors" if source.is_dir() else source
    with open(weights, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    digest.update(json.dumps([classifier.classes, classifier.preprocess.to_dict()], sort_keys=True).encode())
    return digest.hexdigest()


@dataclass
class SplitResult:
    """What compare needs of one model's evaluation: per file, whether it was right; and the summary."""

    n: int
    correct: int
    macro_f1: float
    right: dict[str, bool]  # path relative to the split folder -> classified correctly
    images: list[str]  # every image of the split, unreadable ones too: what the model was tested on
    cached: bool = False


def evaluate_cached(classifier: Classifier, data: Path, split: str, use_cache: bool = True) -> SplitResult:
    """The model's evaluation on `data/<split>`, from the cache while the data and the model are unchanged;
    computed (and stored) otherwise."""
    index = split_of(classifier, data, split)
    folder = index.directory
    key = f"{split}-{model_hash(classifier)[:16]}-{data_fingerprint(index)[:16]}.json"
    cache = cache_folder() / key
    if use_cache and cache.is_file():
        try:
            stored = json.loads(cache.read_text(encoding="utf-8"))
            return SplitResult(
                stored["n"], stored["correct"], stored["macro_f1"], stored["right"], stored["images"], cached=True
            )
        except (OSError, ValueError, KeyError):
            pass  # an unreadable cache entry is recomputed
    report = evaluate_classifier(classifier, data, split)
    right = {image_id(Path(f["path"]), folder): f["true"] == f["predicted"] for f in report.files}
    images = sorted(image_id(path, folder) for path, _ in index.samples)
    result = SplitResult(report.n, report.correct, report.averages.get("macro", {}).get("f1", 0.0), right, images)
    entries = sorted(cache.parent.glob("*.json"), key=lambda p: p.stat().st_mtime) if cache.parent.is_dir() else []
    for stale in entries[: max(0, len(entries) - (CACHE_ENTRIES - 1))]:
        stale.unlink(missing_ok=True)
    payload = {"n": result.n, "correct": result.correct, "macro_f1": result.macro_f1, "right": right, "images": images}
    atomic_write_text(cache, json.dumps(payload) + "\n")
    return result


def _training_summary(source: Path) -> tuple[float | None, int | None, str]:
    """Training time (seconds, validation included) and epochs from the run's metrics.csv; the recipe in a
    few words from its config.yaml. None and "" for a model outside a run folder."""
    run = source.parent
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


def _structure(classifier: Classifier, latency: bool, timed: dict[tuple, tuple[float, float]]) -> dict[str, Any]:
    """MACs, parameters and receptive field of the network the model's metadata describes (structure only:
    an export has the same), and its latency through its own backend.

    Models of one format and quantization that share a network (architecture, input size, parameter and
    MAC counts) are timed once, through `timed`, so that timing noise cannot rank two copies of one network
    (two MobileNetV3-Small runs measured 2.1 and 2.6 ms apart); an export is timed apart from its run."""
    from clothcli.analysis.flops import count
    from clothcli.analysis.rf import trace
    from clothcli.models.checkpoint import architecture

    plain = architecture(classifier.meta)
    side = classifier.preprocess.input_size
    size = (3, side, side)
    counted = count(plain, size, depth=0)
    field_rows = trace(plain, size).output
    out: dict[str, Any] = {
        "arch": classifier.arch,
        "classes": classifier.classes,
        "input_size": side,
        "macs": counted.macs,
        "params": counted.params,
        "receptive_field": int(max(field_rows.rf)) if field_rows is not None and field_rows.rf else None,
    }
    if latency:
        network = (classifier.format, classifier.quantization, classifier.arch, size, counted.params, counted.macs)
        if network not in timed:
            timed[network] = tuple(latency_ms(classifier, size, batch) for batch in (1, LATENCY_BATCH))
        out["ms_batch1"], out["ms_batch64"] = timed[network]
    return out


def latency_ms(classifier: Classifier, size: tuple[int, int, int], batch: int) -> float:
    images = np.random.default_rng(0).standard_normal((batch, *size), dtype=np.float32)
    return steady_seconds(lambda: classifier.forward(images)) / batch * 1000


def _check_same_classes(names: list[str], classes: list[list[str]]) -> None:
    """Models compared on the same images must know the same classes (in any order)."""
    for name, found in zip(names[1:], classes[1:]):
        if set(found) != set(classes[0]):
            raise UserError(f"{name} has other classes than {names[0]}: it {class_difference(classes[0], found)}")


def _names(paths: list[Path], classifiers: list[Classifier]) -> list[str]:
    """A run folder by its name, a checkpoint folder given itself (best/, last/) with its run's name too,
    an exported file by its file name; full paths when two names would be the same."""
    names = []
    for path, classifier in zip(paths, classifiers):
        source = classifier.source
        if classifier.format != PYTORCH or source.parent.resolve() == path.resolve():
            names.append(path.name)
        else:
            names.append(f"{source.parent.name}/{source.name}")
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def _set_threads(threads: int | None) -> int:
    """Set PyTorch's intra-op threads (an exported model gets the same number); the previous count."""
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    return previous


def _check_same_images(names: list[str], results: list[SplitResult], data: Path) -> None:
    """Models tested on other images cannot be compared (their runs split `data` differently)."""
    for name, result in zip(names[1:], results[1:]):
        if result.images != results[0].images:
            raise UserError(
                f"{names[0]} and {name} were tested on different images of {data} (their runs split it "
                "differently): compare them on an explicit folder, or train them on one splits.csv"
            )


def _pairs(rows: list[ModelRow], results: list[SplitResult]) -> list[PairTest]:
    pairs = []
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            shared = results[i].right.keys() & results[j].right.keys()
            only_a = sum(results[i].right[k] and not results[j].right[k] for k in shared)
            only_b = sum(results[j].right[k] and not results[i].right[k] for k in shared)
            pairs.append(PairTest(rows[i].name, rows[j].name, only_a, only_b, mcnemar_exact(only_a, only_b)))
    return pairs


def compare_models(
    *,
    models: list[str | Path],
    data: str | Path,
    split: str = "test",
    device: str | None = None,
    threads: int | None = None,
    latency: bool = True,
    use_cache: bool = True,
    references: str | Path | None = None,
) -> Comparison:
    """Evaluate, count and time every model on the same images, and test them against each other."""
    if not models:
        raise UserError("give at least one run folder or model file")
    paths, data = [Path(m) for m in models], Path(data)
    previous_threads = _set_threads(threads)
    try:
        import torch

        used_threads = torch.get_num_threads()
        classifiers = [
            load_classifier(p, device=device, calibrated=False, threads=used_threads, in_workers=False) for p in paths
        ]
        names = _names(paths, classifiers)
        timed: dict[tuple, tuple[float, float]] = {}
        structures = [_structure(c, latency, timed) for c in classifiers]
        _check_same_classes([str(p) for p in paths], [s["classes"] for s in structures])
        rows, results = [], []
        for name, classifier, structure in zip(names, classifiers, structures):
            result = evaluate_cached(classifier, data, split, use_cache)
            seconds, epochs, recipe = _training_summary(classifier.source)
            if classifier.format != PYTORCH:
                seconds, epochs, recipe = None, None, ""
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
    finally:
        _set_threads(previous_threads)
    _check_same_images(names, results, data)
    pairs = _pairs(rows, results)
    if latency:
        for row, front in zip(rows, pareto_front([(r.ms_batch1 or math.inf, r.accuracy) for r in rows])):
            row.pareto_latency = front
    for row, front in zip(rows, pareto_front([(r.macs or math.inf, r.accuracy) for r in rows])):
        row.pareto_macs = front
    device_name = str(getattr(classifiers[0], "device", "cpu"))
    comparison = Comparison(split, str(data), device_name, used_threads, rows, pairs)
    comparison.chosen, comparison.verdict = verdict(rows, pairs, latency)
    if references is not None:
        comparison.rows += read_references(Path(references))
    return comparison
