"""Rich rendering of results: tables, progress bars, messages. No computation happens here."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

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
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


@contextlib.contextmanager
def download_bar() -> Iterator[Callable[[int, int | None], None]]:
    columns = (TextColumn("download"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
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
    return path[len(prefix):] if path.startswith(prefix) else path


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
    table.add_row("imbalance (max/min)",
                  *[f"{splits[s]['imbalance_ratio']:.2f}" if splits[s]["imbalance_ratio"] else "-"
                    for s in splits], "")
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
        props.add_row("aspect ratio (W/H)",
                      f"min {aspect['min']:.2f}, median {aspect['median']:.2f}, max {aspect['max']:.2f}; {bins}")
    props.add_row("modes", ", ".join(f"{k} {v}" for k, v in images["modes"].items()) or "-")
    props.add_row("formats", ", ".join(f"{k} {v}" for k, v in images["formats"].items()) or "-")
    fb = images["file_bytes"]
    if "min" in fb:
        props.add_row("file size", f"min {_fmt_bytes(fb['min'])}, median {_fmt_bytes(fb['median'])}, "
                      f"max {_fmt_bytes(fb['max'])}, total {_fmt_bytes(fb['total'])}")
    console.print(props)

    skipped = [s for split in splits.values() for s in split["skipped"]]
    if skipped:
        console.print(f"[yellow]{len(skipped)} file(s) skipped[/] (hidden or not images): "
                      + ", ".join(sorted({s['reason'] for s in skipped})))
    if result["unreadable"]:
        bad = Table(title=f"Unreadable files ({len(result['unreadable'])})")
        bad.add_column("path")
        bad.add_column("reason")
        for item in result["unreadable"]:
            bad.add_row(_relative(item["path"], result["root"]), item["reason"])
        console.print(bad)
    else:
        console.print("[green]no unreadable files[/]" + ("" if result["deep"] else
                      " (headers and end markers checked; --deep decodes every image)"))
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
            table.add_row(group["kind"] + ("\n" + "\n".join(flags) if flags else ""),
                          ", ".join(group["splits"]), ", ".join(group["labels"]),
                          "\n".join(_relative(p, result["root"]) for p in group["paths"]))
        console.print(table)
    else:
        console.print("[green]no duplicates found[/]")
    for message in result["warnings"]:
        warn(message)
