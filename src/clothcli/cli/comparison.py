"""`compare` and `report`: models side by side, and one model's results as a page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clothcli import render
from clothcli.cli.options import BatchSizeOption, DeviceOption, WorkersOption, save, save_json
from clothcli.errors import UserError


def compare(
    models: Annotated[
        list[Path],
        typer.Argument(
            help="Run folders, checkpoint folders or exported files to put side by side; or fold groups of "
            "train --folds, tested fold by fold."
        ),
    ],
    data: Annotated[
        Path | None,
        typer.Option(help="Dataset folder: every run is evaluated on its SPLIT.", show_default="needed for models"),
    ] = None,
    split: Annotated[str, typer.Option(help="Split the accuracies and the tests are computed on.")] = "test",
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the table as .md, .json or .csv.", show_default="not written"),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Draw accuracy against latency and MACs as a PNG.", show_default="not drawn")
    ] = None,
    reference: Annotated[
        Path | None,
        typer.Option(help="YAML or CSV rows measured elsewhere, shown apart.", show_default="none"),
    ] = None,
    latency: Annotated[bool, typer.Option(help="Time every model at batch 1 and 64.")] = True,
    threads: Annotated[
        int | None, typer.Option(min=1, max=256, help="CPU threads for every model.", show_default="torch's default")
    ] = None,
    device: DeviceOption = None,
    cache: Annotated[
        bool, typer.Option(help="Reuse each run's stored evaluation while data and weights are unchanged.")
    ] = True,
) -> None:
    """Models side by side on the same images: accuracy with intervals, McNemar tests, cost, the verdict;
    fold groups by the corrected resampled t-test."""
    from clothcli.engines.compare import compare_models
    from clothcli.engines.fold_comparison import compare_fold_groups, is_fold_group
    from clothcli.render import plots
    from clothcli.render.documents import write_comparison

    if models and all(is_fold_group(m) for m in models):
        found = compare_fold_groups(models)
        render.fold_comparison(found)
        if output is not None:
            if output.suffix.lower() != ".json":
                raise UserError(f"fold groups are written as .json, got '{output.name}'")
            save_json(output, found.to_dict())
        return
    if data is None:
        raise UserError("compare needs --data DATA for models (only fold groups carry their results)")
    if output is not None and output.suffix.lower() not in (".md", ".json", ".csv"):
        raise UserError(f"-o must end in .md, .json or .csv, got '{output.name}'")
    for path in (output, plot):
        if path is not None and not path.parent.is_dir():
            raise UserError(f"output folder not found: {path.parent}")
    with render.progress_bar("comparing"):
        comparison = compare_models(
            models=models, data=data, split=split, device=device, threads=threads, latency=latency, use_cache=cache,
            references=reference,
        )  # fmt: skip
    render.comparison(comparison)
    save(output, lambda path: write_comparison(comparison, path))
    save(plot, lambda path: plots.pareto(comparison, path))


def report(
    model: Annotated[
        Path, typer.Argument(help="Run folder written by `clothcli train` (uses best/), or an exported .onnx file.")
    ],
    data: Annotated[
        Path | None,
        typer.Argument(help="Dataset folder: evaluated on, and audited.", show_default="the run's dataset, no audit"),
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="The HTML file to write.")] = Path("report.html"),
    split: Annotated[str, typer.Option(help="Split the results and the pictures come from.")] = "test",
    per_class: Annotated[int, typer.Option(min=0, max=50, help="Sample predictions shown per class.")] = 6,
    mistakes: Annotated[int, typer.Option(min=0, max=200, help="Most confident mistakes shown.")] = 12,
    batch_size: BatchSizeOption = 64,
    workers: WorkersOption = 2,
    explain: Annotated[
        bool,
        typer.Option(
            help="Class-activation maps beside the mistakes, their randomisation check and the embedding map "
            "(clothcli[explain])."
        ),
    ] = True,
    cam_method: Annotated[str, typer.Option(help="gradcam, gradcam++, layercam or eigencam.")] = "gradcam",
) -> None:
    """One self-contained HTML page: the run, its curves, results, most-confused pairs, sample predictions,
    mistakes and where the model looked, the embedding map, data audit."""
    from clothcli.engines.html_report import build_report

    with render.progress_bar("building the report"):
        result = build_report(
            model=model, data=data, output=output, split=split, per_class=per_class, mistakes=mistakes,
            batch_size=batch_size, workers=workers, explain=explain, cam_method=cam_method,
        )  # fmt: skip
    render.note(
        f"wrote {result.path} ({result.bytes / 1e6:.1f} MB, {result.images} pictures): "
        + ", ".join(result.sections)
        + f"; accuracy on {result.split} {result.accuracy:.2%}"
    )
