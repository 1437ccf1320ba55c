"""Rich rendering of results: tables, progress bars, messages. No computation happens here."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def note(message: str) -> None:
    console.print(message, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A transient bar; yields update(done, total)."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


@contextlib.contextmanager
def download_bar() -> Iterator[Callable[[int, int | None], None]]:
    columns = (TextColumn("download"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("download", total=None)

        def update(done: int, total: int | None) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _relative(path: str, root: str) -> str:
    prefix = root.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else path


def analysis(result: dict) -> None:
    """Render `analyze_dataset` output."""
    classes = result["classes"]
    splits = result["splits"]
    table = Table(title=f"Images per class — {result['root']}")
    table.add_column("class")
    for name in splits:
        table.add_column(name, justify="right")
    table.add_column("train weight", justify="right")
    weights = result["balance"]["class_weights"]
    for i, cls in enumerate(classes):
        cells = [f"{splits[s]['classes'][cls]} ({splits[s]['shares'][cls]:.1%})" for s in splits]
        table.add_row(cls, *cells, f"{weights[i]:.2f}")
    table.add_section()
    table.add_row("total", *[str(splits[s]["total"]) for s in splits], "")
    table.add_row(
        "imbalance (max/min)",
        *[f"{splits[s]['imbalance_ratio']:.2f}" if splits[s]["imbalance_ratio"] else "-" for s in splits],
        "",
    )
    console.print(table)

    images = result["images"]
    props = Table(title="Image properties", show_header=False)
    props.add_column("property")
    props.add_column("value")
    top_sizes = list(images["sizes"].items())[:5]
    props.add_row("most common sizes (WxH)", ", ".join(f"{s} ×{n}" for s, n in top_sizes) or "-")
    props.add_row("distinct sizes", str(len(images["sizes"])))
    for key in ("width", "height"):
        d = images[key]
        if d:
            props.add_row(key, f"min {d['min']}, median {d['median']:.0f}, max {d['max']}")
    aspect = images["aspect_ratio"]
    if "min" in aspect:
        bins = ", ".join(f"{k} {v}" for k, v in aspect["bins"].items())
        props.add_row(
            "aspect ratio (W/H)",
            f"min {aspect['min']:.2f}, median {aspect['median']:.2f}, max {aspect['max']:.2f}; {bins}",
        )
    props.add_row("modes", ", ".join(f"{k} {v}" for k, v in images["modes"].items()) or "-")
    props.add_row("formats", ", ".join(f"{k} {v}" for k, v in images["formats"].items()) or "-")
    fb = images["file_bytes"]
    if "min" in fb:
        props.add_row(
            "file size",
            f"min {_fmt_bytes(fb['min'])}, median {_fmt_bytes(fb['median'])}, "
            f"max {_fmt_bytes(fb['max'])}, total {_fmt_bytes(fb['total'])}",
        )
    console.print(props)

    skipped = [s for split in splits.values() for s in split["skipped"]]
    if skipped:
        console.print(
            f"[yellow]{len(skipped)} file(s) skipped[/] (hidden or not images): "
            + ", ".join(sorted({s["reason"] for s in skipped}))
        )
    if result["unreadable"]:
        bad = Table(title=f"Unreadable files ({len(result['unreadable'])})")
        bad.add_column("path")
        bad.add_column("reason")
        for item in result["unreadable"]:
            bad.add_row(_relative(item["path"], result["root"]), item["reason"])
        console.print(bad)
    else:
        console.print(
            "[green]no unreadable files[/]"
            + ("" if result["deep"] else " (headers and end markers checked; --deep decodes every image)")
        )
    dups = result["duplicates"]
    if dups:
        table = Table(title=f"Duplicate groups ({len(dups)})")
        table.add_column("kind")
        table.add_column("splits")
        table.add_column("labels")
        table.add_column("files", overflow="fold")
        for group in dups:
            flags = []
            if group["cross_split"]:
                flags.append("[red]leak across splits[/]")
            if group["conflicting_labels"]:
                flags.append("[red]conflicting labels[/]")
            table.add_row(
                group["kind"] + ("\n" + "\n".join(flags) if flags else ""),
                ", ".join(group["splits"]),
                ", ".join(group["labels"]),
                "\n".join(_relative(p, result["root"]) for p in group["paths"]),
            )
        console.print(table)
    else:
        console.print("[green]no duplicates found[/]")
    for message in result["warnings"]:
        warn(message)


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
    note(f"run folder: {result.run_dir} (best/, last/, metrics.csv, config.yaml)")


def evaluation(report: dict, normalize: bool = False) -> None:
    """Render the evaluate report: accuracy, averages, per class, confusion matrix."""
    console.print(
        f"[bold]{report['arch']}[/] on {report['folder']} at {report['preprocess']['input_size']} px"
        + (" (with horizontal-flip TTA)" if report["tta_flip"] else ""),
        highlight=False,
    )
    console.print(
        f"Accuracy: [bold]{report['accuracy']:.2%}[/] [{report['correct']}/{report['n']}]   "
        f"error rate {report['error_rate']:.2%}",
        highlight=False,
    )
    averages = Table(title="Averages")
    for col in ("average", "precision", "recall", "F1"):
        averages.add_column(col, justify="right" if col != "average" else "left")
    for name, values in report["averages"].items():
        averages.add_row(name, f"{values['precision']:.4f}", f"{values['recall']:.4f}", f"{values['f1']:.4f}")
    console.print(averages)
    per_class = Table(title="Per class")
    for col in ("class", "precision", "recall", "F1", "support"):
        per_class.add_column(col, justify="right" if col != "class" else "left")
    for row in report["per_class"]:
        per_class.add_row(
            row["class"], f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}", str(row["support"])
        )
    console.print(per_class)
    classes = report["classes"]
    matrix = Table(title="Confusion matrix (rows: true, columns: predicted)" + (" — normalised" if normalize else ""))
    matrix.add_column("")
    for name in classes:
        matrix.add_column(name[:8], justify="right")
    for name, row in zip(classes, report["confusion_matrix"]):
        total = max(sum(row), 1)
        matrix.add_row(name, *[(f"{v / total:.2f}" if normalize else str(v)) for v in row])
    console.print(matrix)
    if report["unreadable"]:
        warn(f"{len(report['unreadable'])} unreadable image(s) were not evaluated:")
        for item in report["unreadable"]:
            err_console.print(f"  {item['path']}: {item['reason']}", highlight=False)


def predictions(rows: list, summary, top_k: int) -> None:
    """Results table (first rows), then per-class counts, unreadable files and speed."""
    if rows:
        table = Table(
            title=f"Predictions (first {len(rows)} of {summary.total})" if summary.total > len(rows) else "Predictions"
        )
        table.add_column("path", overflow="fold")
        table.add_column("class")
        table.add_column("confidence", justify="right")
        if top_k > 1:
            table.add_column(f"top {top_k}")
        for p in rows:
            if p.error:
                cells = [str(p.path), "[red]unreadable[/]", "", *([p.error] if top_k > 1 else [])]
                if top_k == 1:
                    cells[2] = ""
                table.add_row(*cells)
                continue
            cells = [str(p.path), p.label, f"{p.confidence:.1%}"]
            if top_k > 1:
                cells.append(", ".join(f"{lab} {pr:.0%}" for lab, pr in zip(p.labels, p.probs)))
            table.add_row(*cells)
        console.print(table)
    counts = Table(title="Images per predicted class")
    counts.add_column("class")
    counts.add_column("images", justify="right")
    for label, n in sorted(summary.per_class.items(), key=lambda kv: -kv[1]):
        counts.add_row(label, str(n))
    console.print(counts)
    if summary.errors:
        warn(f"{len(summary.errors)} file(s) could not be read:")
        for path, reason in summary.errors[:50]:
            err_console.print(f"  {path}: {reason}", highlight=False)
    note(
        f"{summary.classified} classified, {len(summary.errors)} unreadable, "
        f"{summary.total} in {summary.seconds:.1f}s ({summary.images_per_s:.0f} images/s)"
    )


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f} {unit}"
    return f"{n:.0f}"


def flops(report) -> None:
    """Per-layer table, totals and the conventions behind them."""
    c, h, w = report.input_size
    table = Table(title=f"{report.model} — {c}x{h}x{w}, per layer")
    for col, justify in (
        ("layer", "left"),
        ("type", "left"),
        ("output", "left"),
        ("MACs", "right"),
        ("params", "right"),
        ("share", "right"),
    ):
        table.add_column(col, justify=justify)
    for row in report.layers:
        indent = "  " * row.name.count(".")
        shape = "x".join(str(v) for v in row.output_shape[1:]) if row.output_shape else "-"
        table.add_row(indent + row.name, row.type, shape, _si(row.macs), _si(row.params), f"{row.share:.1%}")
    console.print(table)
    totals = Table(title="Totals", show_header=False)
    totals.add_column("what")
    totals.add_column("value", justify="right")
    totals.add_row("MACs (conv + linear + attention matmuls)", f"{report.macs / 1e9:.3f} G")
    totals.add_row("  of which thop conv + linear", f"{report.thop_macs / 1e9:.3f} G")
    totals.add_row("  of which attention matmuls", f"{report.attention_macs / 1e9:.3f} G")
    totals.add_row("FLOPs = 2 x MACs", f"{2 * report.macs / 1e9:.3f} G")
    totals.add_row("FlopCounterMode FLOPs (cross-check)", f"{report.flop_counter_flops / 1e9:.3f} G")
    totals.add_row("complete FLOPs (+ norm, activations, elementwise, pooling)", f"{report.flops_complete / 1e9:.3f} G")
    totals.add_row("parameters", f"{report.params / 1e6:.3f} M")
    totals.add_row("model size (fp32 params + buffers)", f"{report.size_mb:.2f} MB")
    for key, value in report.latency.items():
        totals.add_row(key.replace("_", " "), f"{value:.2f} ms")
    console.print(totals)
    console.print(
        "[dim]MACs follow torchvision's published convention (weights.meta['_ops']): conv and linear "
        "multiply-accumulates, bias excluded, plus attention matrix products. Complete FLOPs: 2 per MAC, "
        "1 per element for elementwise ops and activations, 2 for normalisation, 1 per input element for "
        "pooling/reductions, 3 for softmax.[/]"
    )


def receptive_fields(report, depth: int, check: dict | None) -> None:
    """Per-layer receptive fields, the overall field, merges and the optional empirical check."""
    c, h, w = report.input_size
    table = Table(title=f"{report.model} — receptive fields at {c}x{h}x{w}")
    for col in ("layer", "type", "output", "RF (h x w)", "stride", "eff. padding", "global context"):
        table.add_column(col, overflow="fold")

    def pair(v, fmt="{:g}") -> str:
        if v is None:
            return "-"
        return fmt.format(v[0]) if v[0] == v[1] else f"{fmt.format(v[0])} x {fmt.format(v[1])}"

    announced: set[str] = set()
    for row in report.layers:
        if row.name.count(".") >= depth:
            continue
        shape = "x".join(str(v) for v in row.output_shape[1:]) or "-"
        context = ""
        if row.global_from:
            context = "global" if row.global_from in announced else f"global from {row.global_from}"
            announced.add(row.global_from)
        table.add_row(
            "  " * row.name.count(".") + row.name,
            row.type,
            shape,
            pair(row.rf),
            pair(row.stride),
            pair(row.padding),
            context,
        )
    console.print(table)
    out = report.output
    if out is not None:
        console.print(
            f"Overall (last feature map, [bold]{out.name}[/]): receptive field [bold]{pair(out.rf)} px[/], "
            f"effective stride {pair(out.stride)}, effective padding {pair(out.padding)}",
            highlight=False,
        )
        if out.global_from:
            console.print(
                f"Global context from [bold]{out.global_from}[/] on: every unit after it sees the whole "
                f"input; the field above is the local one, with those global branches ignored.",
                highlight=False,
            )
    console.print(
        f"{len(report.merges)} merges (add/multiply/concatenate); "
        + ("[green]all aligned[/]" if not report.misaligned else f"[red]{len(report.misaligned)} misaligned[/]")
    )
    for merge in report.misaligned:
        warn(f"misaligned {merge.op} in {merge.layer}: {merge.detail}")
    for item in report.unsupported:
        warn(f"approximated: {item}")
    if check is not None:
        colour = "green" if check["match"] else "red"
        console.print(
            f"[{colour}]verify[/]: centre unit {tuple(check['unit'])} of {check['layer']} at input "
            f"{check['input_size'][1]}px — gradient spans rows {tuple(check['empirical'][0])}, cols "
            f"{tuple(check['empirical'][1])}; analytic rows {tuple(check['analytic'][0])}, cols "
            f"{tuple(check['analytic'][1])}: {'match' if check['match'] else 'MISMATCH'}",
            highlight=False,
        )


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


def tuning(result, search, suggested_lr, cfg, plot_path, formats=None) -> None:
    if formats is not None:
        table = Table(title=f"Training-step speed ({formats.device}, batch {formats.batch_size})")
        table.add_column("precision")
        table.add_column("memory format")
        table.add_column("images/s", justify="right")
        for t in formats.trials:
            note = " (warm-up step only: far slower)" if t.get("stopped_after_warmup") else ""
            precision, memory_format = t["label"].split()
            table.add_row(precision, memory_format, f"{t['images_per_s']:.1f}{note}")
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
            table.add_column("images/s", justify="right")
            table.add_column("memory growth", justify="right")
            for t in search.trials:
                table.add_row(
                    str(t["batch_size"]),
                    f"{t['images_per_s']:.1f}",
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
        batch = search.best if search is not None and search.best else cfg.train.batch_size
        console.print(
            f"suggested optim.lr: [bold]{suggested_lr:.3g}[/] for batch {batch} x accumulation "
            f"{cfg.train.grad_accum} (the test ran at batch {result.batch_size}; linear scaling for SGD, "
            f"square root for adaptive optimizers, capped at the loss minimum); plot: {plot_path}",
            highlight=False,
        )
