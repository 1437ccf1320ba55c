"""Options several commands share, declared once, and the one way a command writes an output file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from clothcli import render

JsonOption = Annotated[
    Path | None, typer.Option("--json", help="Write the full result as JSON here.", show_default="not written")
]
MarkdownOption = Annotated[
    Path | None, typer.Option("--markdown", help="Write the result as Markdown.", show_default="not written")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any config value: --set train.epochs=5 (repeatable).", show_default="none"),
]
DataOption = Annotated[
    Path | None, typer.Option("--data", help="Dataset folder (overrides data.root).", show_default="config's data.root")
]
WeightsOption = Annotated[
    Path | None,
    typer.Option(
        "--weights",
        help="Local pretrained weights file (overrides model.weights).",
        show_default="config's model.weights",
    ),
]
InputSizeOption = Annotated[
    int | None,
    typer.Option("--input-size", min=16, max=4096, help="Square input side in pixels.", show_default="the model's"),
]
DeviceOption = Annotated[
    str | None, typer.Option("--device", help="cpu, cuda or cuda:N.", show_default="cuda if available, else cpu")
]
CalibrationOption = Annotated[
    bool,
    typer.Option(
        "--calibration/--no-calibration",
        help="Use the temperature fitted by `clothcli calibrate` (no effect before calibrating).",
    ),
]
OodOption = Annotated[
    Path | None,
    typer.Option(
        "--ood",
        help="A folder of images that are none of the classes: how well they are told apart.",
        show_default="none",
    ),
]
OodRecallOption = Annotated[
    float,
    typer.Option(
        "--ood-recall", min=0.5, max=1.0, help="Share of the classes' images a rejection threshold must keep."
    ),
]
PrecisionOption = Annotated[
    str | None,
    typer.Option(
        "--precision",
        help="An OpenVINO model's inference precision, f32 or bf16 (faster on CPUs with AVX512-BF16 or AMX).",
        show_default="f32",
    ),
]
BatchSizeOption = Annotated[int, typer.Option(min=1, help="Images per batch.")]
WorkersOption = Annotated[int, typer.Option(min=0, help="DataLoader worker processes.")]
ModelArgument = Annotated[
    Path,
    typer.Argument(help="Run folder (uses best/), checkpoint folder, model.safetensors, or exported .onnx file."),
]
ConfigArgument = Annotated[
    Path | None,
    typer.Argument(
        help="Experiment YAML (e.g. conf/mobilenet-cpu.yaml); defaults if omitted.", show_default="built-in defaults"
    ),
]


def save(path: Path | None, write: Callable[[Path], Any]) -> None:
    """Write one output file the user asked for (`write(path)`) and say so; nothing when not asked."""
    if path is not None:
        write(path)
        render.note(f"wrote {path}")


def save_json(path: Path | None, data: dict[str, Any]) -> None:
    """The `--json` output of any command."""
    from clothcli.render.documents import write_json

    save(path, lambda target: write_json(target, data))
