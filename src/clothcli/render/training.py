"""The training progress display, the run summary and tune's report."""

from __future__ import annotations

import numpy as np
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from clothcli.render.console import console, err_console, note, warn


class TrainProgress:
    """Rich rendering of the training loop: a bar per epoch and a one-line summary after it."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]:.4f} acc {task.fields[acc]:.3f} "
                "lr {task.fields[lr]:.2e} {task.fields[ips]:.0f} img/s"
            ),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            transient=True,
        )
        self.task = None
        self.run_dir = None

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def message(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)

    def run_started(self, run_dir) -> None:
        self.run_dir = run_dir
        self.progress.console.print(f"run folder: {run_dir}", highlight=False)

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(
            "train", total=steps, epoch=f"{epoch + 1}/{epochs}", loss=0.0, acc=0.0, lr=0.0, ips=0.0
        )

    def step(self, done: int, loss: float, acc: float, lr: float, images_per_s: float) -> None:
        self.progress.update(self.task, completed=done, loss=loss, acc=acc, lr=lr, ips=images_per_s)

    def epoch_end(self, row: dict) -> None:
        if row["epoch"] == "swa":
            text = f"[bold]SWA[/] val loss {row['val_loss']:.4f} acc {row['val_acc']:.2%} macro-F1 {row['val_f1']:.4f}"
        else:
            text = (
                f"epoch {row['epoch']:>3}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.2%}"
                f"  val loss {row['val_loss']:.4f} acc {row['val_acc']:.2%} F1 {row['val_f1']:.4f}"
                f"  lr {row['lr']:.2e}  {row['seconds']:.1f}s  {row['images_per_s']:.0f} img/s"
                f"  data wait {row['data_wait']:.0%}  validation {row['val_seconds']:.1f}s"
            )
        self.progress.console.print(text, highlight=False)


def train_summary(result) -> None:
    best = result.best
    if best:
        note(
            f"best epoch {best['epoch']} ({best.get('weights', 'model')} weights): val acc "
            f"{best['val_acc']:.2%}, macro-F1 {best['val_f1']:.4f}, loss {best['val_loss']:.4f}"
        )
    if result.unreadable:
        warn(f"{len(result.unreadable)} unreadable training image(s) were skipped:")
        for item in result.unreadable[:20]:
            err_console.print(f"  {item['path']}: {item['reason']}", highlight=False)
    present = [name for name in ("best/", "last/", "swa/", "metrics.csv", "config.yaml", "splits.csv")
               if (result.run_dir / name.rstrip("/")).exists()]  # fmt: skip
    note(f"run folder: {result.run_dir} ({', '.join(present)})")


def sparkline(values: list[float], width: int = 60, ceiling: float | None = None) -> str:
    """A one-line unicode chart of `values` (resampled to `width`), clipped at `ceiling` so that a
    final blow-up does not flatten the interesting part into one row."""
    if not values:
        return ""
    ticks = "▁▂▃▄▅▆▇█"
    step = max(1, len(values) / width)
    sampled = [values[min(len(values) - 1, int(i * step))] for i in range(min(width, len(values)))]
    if ceiling is not None:
        sampled = [min(v, ceiling) for v in sampled]
    lo, hi = min(sampled), max(sampled)
    span = (hi - lo) or 1.0
    return "".join(ticks[int((v - lo) / span * (len(ticks) - 1))] for v in sampled)


def _marker(values: list[float], index: int, width: int = 60) -> str:
    """A caret under the sparkline column that shows values[index]."""
    step = max(1, len(values) / width)
    return " " * min(width - 1, int(index / step)) + "^"


def tuning(report) -> None:
    """Render a `tuning.TuneReport`: format timings, batch search, the range test and the suggestion."""
    formats, search, result, cfg = report.formats, report.batch_search, report.range_test, report.config
    if formats is not None:
        table = Table(title=f"Training-step speed ({formats.device}, batch {formats.batch_size})")
        table.add_column("precision")
        table.add_column("memory format")
        table.add_column("images/s", justify="right")
        for t in formats.trials:
            remark = " (warm-up step only: far slower)" if t.get("stopped_after_warmup") else ""
            precision, memory_format = t["label"].split()
            table.add_row(precision, memory_format, f"{t['images_per_s']:.1f}{remark}")
        console.print(table)
        best = formats.best
        console.print(
            f"chosen: [bold]train.mixed_precision={best['mixed_precision']} "
            f"train.channels_last={str(best['channels_last']).lower()}[/]"
        )
    if search is not None:
        table = Table(title=f"Batch-size search ({search.device}: {search.rule})")
        table.add_column("batch size", justify="right")
        if search.device == "cuda":
            table.add_column("fits")
            for t in search.trials:
                table.add_row(str(t["batch_size"]), "yes" if t["fits"] else "no")
        else:
            table.add_column("images/s (median)", justify="right")
            table.add_column("range", justify="right")
            table.add_column("memory growth", justify="right")
            for t in search.trials:
                low, high = t["spread"]
                table.add_row(
                    str(t["batch_size"]),
                    f"{t['images_per_s']:.1f}",
                    f"{low:.1f}–{high:.1f}",
                    f"{t['rss_growth_mb']:.0f} MB" + (" (over budget)" if t.get("over_budget") else ""),
                )
        console.print(table)
        console.print(f"chosen batch size: [bold]{search.best}[/]")
    if result is not None:
        console.print(
            f"loss vs log lr ({result.lrs[0]:.0e} → {result.lrs[-1]:.0e}, {len(result.lrs)} steps"
            + (", stopped: loss diverged" if result.stopped_early else "")
            + ")"
        )
        chosen = int(np.argmin(np.abs(np.log(result.lrs) - np.log(result.suggested_lr))))
        console.print(sparkline(result.losses, ceiling=result.losses[0] * 1.1), highlight=False)
        console.print(_marker(result.losses, chosen) + f" {result.default} {result.suggested_lr:.2e}", highlight=False)
        table = Table(title="Learning-rate suggestions")
        table.add_column("method")
        table.add_column("lr", justify="right")
        for name, lr in result.suggestions.items():
            table.add_row(name + (" (default)" if name == result.default else ""), f"{lr:.2e}")
        console.print(table)
        console.print(
            f"suggested optim.lr: [bold]{report.suggested_lr:.3g}[/] for batch {cfg.train.batch_size} x accumulation "
            f"{cfg.train.grad_accum} (the test ran at batch {result.batch_size}; linear scaling for SGD, "
            f"square root for adaptive optimizers, capped at the loss minimum); plot: {report.plot}",
            highlight=False,
        )
    if report.written is not None:
        note(f"updated {report.written}")


def sweep_summary(result, shown: int = 10) -> None:
    """A `tuning.sweep.SweepResult`: trials by state, the best ones, importances, the seeds' ranking."""
    rows = result.trials
    states: dict[str, int] = {}
    for row in rows:
        states[row["state"]] = states.get(row["state"], 0) + 1
    note(
        f"sweep {result.directory}: {len(rows)} trials ("
        + ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        + f"); {result.direction} {result.monitor}; {result.pruning}"
    )
    scored = [r for r in rows if r["value"] is not None]
    scored.sort(key=lambda r: r["value"], reverse=result.direction == "maximize")
    if scored:
        keys = list(scored[0]["params"])
        table = Table(title=f"Best trials (of {len(scored)} with a value)")
        for col in ("trial", "state", result.monitor, "epochs", *keys):
            table.add_column(col, justify="right" if col != "state" else "left")
        for row in scored[:shown]:
            params = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in (row["params"].get(k, "") for k in keys)]
            table.add_row(str(row["trial"]), row["state"], f"{row['value']:.4f}", str(row["epochs_run"]), *params)
        console.print(table)
    if result.importance:
        console.print("importance: " + ", ".join(f"{k} {v:.2f}" for k, v in result.importance.items()), highlight=False)
    elif result.importance_note:
        note(result.importance_note)
    if result.seeds:
        table = Table(title="The best configurations over seeds (ranked by the mean)")
        for col in ("trial", "seeds", "values", "mean ± std"):
            table.add_column(col, justify="right")
        for row in result.seeds:
            values = ", ".join(f"{v:.4f}" for v in row["values"])
            spread = f"{row['mean']:.4f} ± {row['std']:.4f}"
            table.add_row(str(row["trial"]), ", ".join(map(str, row["seeds"])), values, spread)
        console.print(table)
    written = ["summary.csv", "summary.md"] + (["importance.png"] if result.importance else [])
    if result.best_config:
        written.append("best.yaml")
    note(f"wrote {', '.join(written)} in {result.directory}")


def cross_validation(found) -> None:
    """A `tuning.folds.CrossValidation`: each fold, then mean ± standard deviation."""
    table = Table(title=f"{found.folds}-fold cross-validation ({found.model} model of each fold on its held-out fold)")
    for col in ("fold", "images", "accuracy", "macro-F1", "minutes"):
        table.add_column(col, justify="right")
    for r in found.results:
        table.add_row(str(r.fold), str(r.images), f"{r.accuracy:.2%}", f"{r.macro_f1:.4f}", f"{r.seconds / 60:.1f}")
    console.print(table)
    console.print(
        f"accuracy [bold]{found.mean_accuracy:.2%} ± {found.std_accuracy:.2%}[/], macro-F1 {found.mean_f1:.4f} ± "
        f"{found.std_f1:.4f} over {found.images} images; {found.seconds / 60:.1f} min",
        highlight=False,
    )
    note(f"wrote oof.csv, folds.json and summary.md in {found.directory}")
