"""`export`, `flops` and `rf`: a checkpoint as a file for another runtime, and what a network costs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clothcli import render
from clothcli.cli.options import DeviceOption, InputSizeOption, JsonOption, save_json


def export(
    checkpoint: Annotated[Path, typer.Argument(help="Run folder (uses best/), checkpoint folder or weights file.")],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="The file to write: .onnx (ONNX Runtime), .xml (OpenVINO IR) or .pte (ExecuTorch)."
        ),
    ],
    format_: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="onnx, openvino or executorch; the suffix is added to -o when it has none, and must agree if it has.",
            show_default="from -o's suffix",
        ),
    ] = None,
    opset: Annotated[int, typer.Option(min=18, max=23, help="ONNX opset version.")] = 18,
    verify: Annotated[
        Path | None,
        typer.Option(
            help="Dataset folder whose validation split verifies the export (up to 512 images).",
            show_default="generated images",
        ),
    ] = None,
    tolerance: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Largest logit difference the exported model may show against PyTorch, per unit of the largest logit.",
        ),
    ] = 1e-3,
    int8: Annotated[
        bool, typer.Option(help="Also write NAME.int8.onnx or NAME.int8.xml: post-training int8, needs --int8-data.")
    ] = False,
    int8_data: Annotated[
        Path | None,
        typer.Option(
            "--int8-data",
            "--calibration",
            help="Dataset folder whose train split calibrates --int8.",
            show_default="none",
        ),
    ] = None,
    int8_images: Annotated[int, typer.Option(min=1, help="Training images --int8 is calibrated on.")] = 256,
    qat_epochs: Annotated[
        int,
        typer.Option(
            min=0,
            help="Epochs of quantization-aware fine-tuning on the train split after --int8's calibration "
            "(an .xml output; about 90 s an epoch for the CPU recipe on 2 cores).",
        ),
    ] = 0,
    json_path: JsonOption = None,
) -> None:
    """Export to ONNX (.onnx), OpenVINO (.xml) or ExecuTorch (.pte) by the output's suffix, verified against
    PyTorch, with the classes, preprocessing and calibration; --int8 adds an int8 model beside it."""
    from clothcli.engines.export import export_onnx

    with render.progress_bar("exporting"):
        report = export_onnx(
            checkpoint=checkpoint, output=output, opset=opset, verify_data=verify, tolerance=tolerance, int8=int8,
            int8_data=int8_data, int8_images=int8_images, export_format=format_,
            qat_epochs=qat_epochs,
        )  # fmt: skip
    render.export_report(report)
    save_json(json_path, report.to_dict())
    if not report.verification.passed:
        raise typer.Exit(1)


MODEL_HELP = "timm name, torchvision:NAME, a config YAML, or a checkpoint (run folder, best/, model.safetensors)."


def flops(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    input_size: InputSizeOption = None,
    depth: Annotated[int, typer.Option(min=0, max=10, help="Module depth of the per-layer table.")] = 2,
    latency: Annotated[bool, typer.Option(help="Measure ms per image at batch 1 and at --batch.")] = True,
    batch: Annotated[int, typer.Option(min=1, max=1024, help="Larger batch for the latency measurement.")] = 32,
    device: DeviceOption = None,
    json_path: JsonOption = None,
) -> None:
    """Per-layer MACs and parameters (thop), totals that agree with published figures, latency."""
    from clothcli.analysis.flops import count, measure_latency
    from clothcli.analysis.model_source import load_model_spec
    from clothcli.runtime import resolve_device

    spec = load_model_spec(model, input_size)
    report = count(spec.model, spec.input_size, depth, spec.description)
    if latency:
        report.latency = measure_latency(spec.model, spec.input_size, batch, resolve_device(device))
    render.flops(report)
    save_json(json_path, report.to_dict())


def rf(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    input_size: InputSizeOption = None,
    depth: Annotated[int, typer.Option(min=1, max=10, help="Module depth of the per-layer table.")] = 2,
    verify: Annotated[
        bool, typer.Option(help="Check the overall field against the input gradient of the centre unit.")
    ] = False,
    json_path: JsonOption = None,
) -> None:
    """Receptive field, effective stride and padding per layer; correct for branches and global context."""
    from clothcli.analysis.model_source import load_model_spec
    from clothcli.analysis.rf import trace as trace_rf
    from clothcli.analysis.rf import verify_output

    spec = load_model_spec(model, input_size)
    report = trace_rf(spec.model, spec.input_size, spec.description)
    check = verify_output(spec.model, report) if verify else None
    render.receptive_fields(report, depth, check)
    save_json(json_path, {**report.to_dict(), "verify": check})


def benchmark(
    run: Annotated[Path, typer.Argument(help="Run folder (uses best/) to export into every format and measure.")],
    data: Annotated[Path, typer.Option(help="Dataset: SPLIT is measured on, its train split calibrates int8.")],
    split: Annotated[
        str, typer.Option(help="Split, or comma-separated splits taken together, for the accuracies and McNemar tests.")
    ] = "validation",
    formats: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated, of pytorch, onnx, onnx-int8, openvino, openvino-bf16, openvino-int8, executorch.",
            show_default="every format whose runtime is installed",
        ),
    ] = None,
    workers: Annotated[int, typer.Option(min=0, help="Decoding threads or processes.")] = 2,
    json_path: JsonOption = None,
) -> None:
    """Every format of one run side by side: size, accuracy, agreement and McNemar against PyTorch, speed."""
    from clothcli.engines.benchmark import benchmark as run_benchmark

    chosen = [f.strip() for f in formats.split(",") if f.strip()] if formats else None
    with render.progress_bar("exporting and measuring every format"):
        report = run_benchmark(run=run, data=data, split=split, formats=chosen, workers=workers)
    render.benchmark(report)
    save_json(json_path, report.to_dict())
