"""The Typer application every command registers with, and the one error rule: a UserError is one
red line and exit code 2, Ctrl-C is exit 130."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, TypeVar

import typer

from clothcli import __version__, render
from clothcli.allocator import keep_freed_memory
from clothcli.errors import UserError

app = typer.Typer(
    name="clothcli",
    help="Fine-tune and analyse image classifiers for clothing photos (any dataset laid out as split/class/image).",
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
    keep_freed_memory()
