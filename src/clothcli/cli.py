"""The `clothcli` command line: parse options, call a core function, render the result."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from clothcli import __version__, render
from clothcli.errors import UserError

app = typer.Typer(
    name="clothcli",
    help="Fine-tune and analyse image classifiers for clothing photos "
    "(any dataset laid out as split/class/image).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

F = TypeVar("F", bound=Callable)


def handle_errors(fn: F) -> F:
    """Turn UserError into one red line and exit code 2; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            render.error(str(exc))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            render.error("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"clothcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Fine-tune and analyse image classifiers for datasets laid out as split/class/image."""


def write_json(path: Path, data: dict) -> None:
    """Write `data` as indented JSON atomically."""
    from clothcli.io_utils import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


@app.command("analyze-data")
@handle_errors
def analyze_data(
    data_dir: Annotated[Path, typer.Argument(help="Dataset folder with train/, validation/ (or val/) and test/.")],
    deep: Annotated[bool, typer.Option(help="Fully decode every image (finds corrupt pixel data, slower).")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the full analysis as JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG bar chart of images per class and split here.")] = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Threads reading files.")] = 4,
    download: Annotated[
        bool, typer.Option(help="Download clothing-dataset-small into DATA_DIR first if it does not exist.")
    ] = False,
) -> None:
    """Counts, balance, image sizes, unreadable files and duplicates/leakage across splits."""
    from clothcli.data.analysis import analyze_dataset, plot_class_distribution

    if download and not data_dir.exists():
        _download_into(data_dir)
    with render.progress_bar("reading images") as update:
        analysis = analyze_dataset(data_dir, deep=deep, workers=workers, progress=update)
    render.analysis(analysis)
    if json_path:
        write_json(json_path, analysis)
        render.note(f"wrote {json_path}")
    if plot:
        plot_class_distribution(analysis, plot)
        render.note(f"wrote {plot}")


def _download_into(path: Path) -> None:
    from clothcli.data.download import CLOTHING_URL, download_dataset

    render.note(f"downloading clothing-dataset-small from {CLOTHING_URL}")
    with render.download_bar() as update:
        download_dataset(path, progress=update)
    render.note(f"dataset ready at {path}")


def main() -> None:
    """Console-script entry point."""
    app()
