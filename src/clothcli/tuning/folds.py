"""`train --folds K`: k-fold cross-validation of one config, every fold an ordinary run folder.

Fold k trains on the other folds of the pooled train and validation images and holds fold k out
(`data.folds`, `data.fold`: stratified, grouped by duplicates, the same folds for every config of one
dataset and split seed). The epoch count is fixed: each fold's final model (its last epoch, or its
SWA average where the recipe has one) predicts its held-out fold, never a best epoch chosen on that
same fold, so the out-of-fold predictions are honest. The fold group's folder holds the runs,
`oof.csv` (every pooled image once: its fold, true and predicted class, confidence), `folds.json`
(per fold: images, accuracy, macro-F1, seconds; mean and standard deviation; a digest of which image
sat in which fold, so `compare` can test two groups fold by fold) and `summary.md`. A killed fold
group continues with the same command: finished folds are kept, an interrupted one resumes.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clothcli.backends import load_classifier
from clothcli.config import Config
from clothcli.data.folds import FOLDS_FILE
from clothcli.data.sources import dataset_root, split_samples
from clothcli.errors import UserError
from clothcli.io_utils import atomic_write_text
from clothcli.metrics import classification_report, probabilities
from clothcli.training import Reporter, SilentReporter, train
from clothcli.training.run_folder import read_resume_point


@dataclass
class FoldResult:
    fold: int
    run: str
    images: int
    accuracy: float
    macro_f1: float
    seconds: float  # the fold's epochs, as its metrics.csv records them


@dataclass
class CrossValidation:
    directory: Path
    folds: int
    model: str  # which checkpoint of each fold predicted its held-out images: last or swa
    results: list[FoldResult] = field(default_factory=list)
    mean_accuracy: float = 0.0
    std_accuracy: float = 0.0
    mean_f1: float = 0.0
    std_f1: float = 0.0
    images: int = 0
    digest: str = ""  # which image sat in which fold
    seconds: float = 0.0  # wall time of this command

    def to_dict(self) -> dict[str, Any]:
        found = asdict(self)
        found["directory"] = str(self.directory)
        return found


def fold_config(cfg: Config, folds: int, fold: int) -> Config:
    """`cfg` with fold `fold` of `folds` held out."""
    found = copy.deepcopy(cfg)
    found.data.folds, found.data.fold = folds, fold
    return found


def _finished(run_dir: Path, epochs: int) -> bool:
    try:
        return read_resume_point(run_dir).state.epoch + 1 >= epochs
    except UserError:
        return False


def _train_fold(cfg: Config, run_dir: Path, reporter: Reporter) -> None:
    if _finished(run_dir, cfg.train.epochs) and (not cfg.train.swa.enabled or (run_dir / "swa").is_dir()):
        reporter.message(f"{run_dir.name}: finished before, kept")
    elif (run_dir / "state").is_dir():
        train(None, resume=run_dir, reporter=reporter)
    else:
        train(cfg, reporter=reporter, run_dir=run_dir)


def _held_out_predictions(cfg: Config, run_dir: Path, model: str) -> tuple[list[dict[str, Any]], Any, float]:
    """The fold's final model on its held-out images: one row per image, the report, and the seconds
    its epochs took."""
    classifier = load_classifier(run_dir / model, in_workers=False)
    classes = list(classifier.classes)
    index = split_samples(cfg.data.root, "validation", classes, own_split=run_dir / "splits.csv", own_first=True)
    files = [path for path, _ in index.samples]
    logits, rows_seen = [], []
    for batch in classifier.run(files, 64, cfg.data.num_workers):
        logits.append(batch.logits)
        rows_seen += batch.rows
    if not rows_seen:
        raise UserError(f"{run_dir}: no readable held-out image")
    probs = probabilities(np.concatenate(logits), classifier.temperature)
    targets = np.array([index.samples[i][1] for i in rows_seen])
    preds = probs.argmax(1)
    report = classification_report(preds, targets, classes)
    root = dataset_root(cfg.data.root).resolve()
    rows = [{"path": _relative(files[i], root), "true": classes[t], "predicted": classes[p], "confidence": float(c)}
            for i, t, p, c in zip(rows_seen, targets.tolist(), preds.tolist(), probs.max(1).tolist())]  # fmt: skip
    history = read_resume_point(run_dir).state.history
    seconds = sum(float(r.get("seconds", 0)) + float(r.get("val_seconds", 0)) for r in history)
    return rows, report, seconds


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)


def assignment_digest(oof: list[dict[str, Any]]) -> str:
    """Which image sat in which fold, as 16 hex digits: equal for two groups that held out the same images."""
    digest = hashlib.sha256()
    for row in sorted(oof, key=lambda r: r["path"]):
        digest.update(f"{row['path']}\t{row['fold']}\n".encode())
    return digest.hexdigest()[:16]


def cross_validate(
    cfg: Config, folds: int, reporter: Reporter | None = None, on_fold: Callable[[FoldResult], None] | None = None
) -> CrossValidation:
    """Train and evaluate every fold of `cfg` (continuing a group a kill interrupted); `on_fold` hears each
    fold's result as it comes (a sweep reports them to its pruner)."""
    reporter = reporter or SilentReporter()
    if cfg.train.early_stopping.patience is not None:
        raise UserError("--folds needs a fixed number of epochs: drop train.early_stopping.patience")
    if cfg.data.root is None:
        raise UserError("--folds needs a dataset: give --data")
    start = time.perf_counter()
    directory = Path(cfg.output_dir) / f"{cfg.name}-{folds}fold"
    model = "swa" if cfg.train.swa.enabled else "last"
    found = CrossValidation(directory, folds, model)
    oof: list[dict[str, Any]] = []
    for fold in range(folds):
        run_dir = directory / f"fold-{fold}"
        reporter.message(f"fold {fold + 1} of {folds}: {run_dir}")
        _train_fold(fold_config(cfg, folds, fold), run_dir, reporter)
        rows, report, seconds = _held_out_predictions(cfg, run_dir, model)
        oof += [{**row, "fold": fold} for row in rows]
        result = FoldResult(fold, str(run_dir), report.n, report.accuracy, report.averages["macro"]["f1"], seconds)
        found.results.append(result)
        reporter.message(f"fold {fold + 1}: accuracy {result.accuracy:.2%}, macro-F1 {result.macro_f1:.4f} "
                         f"on {result.images} held-out images")  # fmt: skip
        if on_fold is not None:
            on_fold(result)
    accuracy = np.array([r.accuracy for r in found.results])
    f1 = np.array([r.macro_f1 for r in found.results])
    found.mean_accuracy, found.std_accuracy = float(accuracy.mean()), float(accuracy.std(ddof=1))
    found.mean_f1, found.std_f1 = float(f1.mean()), float(f1.std(ddof=1))
    found.images, found.digest = len(oof), assignment_digest(oof)
    found.seconds = time.perf_counter() - start
    _write(found, oof)
    return found


def _write(found: CrossValidation, oof: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ["path", "fold", "true", "predicted", "confidence"])
    writer.writeheader()
    writer.writerows(sorted(oof, key=lambda r: (r["fold"], r["path"])))
    atomic_write_text(found.directory / "oof.csv", buffer.getvalue())
    atomic_write_text(found.directory / FOLDS_FILE, json.dumps(found.to_dict(), indent=2) + "\n")
    lines = [f"# {found.folds}-fold cross-validation", "", "| fold | images | accuracy | macro-F1 | minutes |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in found.results:
        lines.append(f"| {r.fold} | {r.images} | {r.accuracy:.2%} | {r.macro_f1:.4f} | {r.seconds / 60:.1f} |")
    spread = f"macro-F1 {found.mean_f1:.4f} ± {found.std_f1:.4f}"
    lines += ["", f"Accuracy {found.mean_accuracy:.2%} ± {found.std_accuracy:.2%}, {spread} (mean ± standard "
              f"deviation over folds; each fold's {found.model} model)."]  # fmt: skip
    atomic_write_text(found.directory / "summary.md", "\n".join(lines) + "\n")
