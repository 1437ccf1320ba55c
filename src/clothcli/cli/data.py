"""`analyze-data`: the dataset audit, and its repairs (label issues, a split without leaks)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clothcli import render
from clothcli.cli.options import JsonOption, save, save_json
from clothcli.errors import UserError


def analyze_data(
    data_dir: Annotated[
        Path,
        typer.Argument(help="Dataset: split/class/image folders, an unsplit class/image folder, or a label file."),
    ],
    deep: Annotated[bool, typer.Option(help="Fully decode every image (finds corrupt pixel data, slower).")] = False,
    image_issues: Annotated[
        bool,
        typer.Option(help="Find dark, blurry, low-information, odd-size and odd-aspect images (cleanvision)."),
    ] = False,
    json_path: JsonOption = None,
    plot: Annotated[
        Path | None,
        typer.Option(help="Write a PNG bar chart of images per class and split here.", show_default="not drawn"),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Threads reading files.")] = 4,
    download: Annotated[
        bool, typer.Option(help="Download clothing-dataset-small into DATA_DIR first if it does not exist.")
    ] = False,
    label_issues: Annotated[
        bool, typer.Option(help="Find images whose label is probably wrong (cleanlab; needs clothcli[data]).")
    ] = False,
    checkpoint: Annotated[
        Path | None, typer.Option(help="--label-issues backbone: a clothcli run or checkpoint.", show_default="none")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="--label-issues backbone: a timm name, with --weights.", show_default="none")
    ] = None,
    weights: Annotated[
        Path | None, typer.Option(help="Pretrained weights file for --model.", show_default="none")
    ] = None,
    folds: Annotated[int, typer.Option(min=2, max=20, help="Cross-validation folds for --label-issues.")] = 5,
    issues: Annotated[
        Path | None, typer.Option(help="Write the suspected label errors as .csv or .json.", show_default="not written")
    ] = None,
    contact_sheet: Annotated[
        Path | None, typer.Option(help="Write a PNG of the top suspects with both labels.", show_default="not drawn")
    ] = None,
    top: Annotated[int, typer.Option(min=1, max=500, help="Suspects shown in the table and the contact sheet.")] = 20,
    fix_split: Annotated[
        Path | None,
        typer.Option(
            help="Write a copy of the dataset here with every duplicate group in one split.", show_default="none"
        ),
    ] = None,
    keep_conflicts: Annotated[
        bool, typer.Option(help="With --fix-split, keep duplicates whose labels disagree (left out otherwise).")
    ] = False,
    write_splits: Annotated[
        Path | None,
        typer.Option(
            help="Write the split training would use (path, class, split, group) as a CSV that --data can take.",
            show_default="not written",
        ),
    ] = None,
) -> None:
    """Counts, balance, image sizes, unreadable files and duplicates/leakage across splits; optionally
    suspected label errors and a copy of the dataset with leaks fixed."""
    from clothcli.data.audit import audit_dataset
    from clothcli.render import plots

    if download and not data_dir.exists():
        _download_into(data_dir)
    if label_issues:
        from clothcli.engines.label_issues import require_data_extra

        require_data_extra()  # before any image is read
    with render.progress_bar("reading images") as update:
        analysis = audit_dataset(data_dir, deep=deep, workers=workers, progress=update, image_issues=image_issues)
    render.analysis(analysis)
    save_json(json_path, analysis.to_dict())
    if write_splits:
        from clothcli.data.sources import describe_split, write_split_file

        written = write_split_file(data_dir, write_splits)
        if written.plan is not None:
            render.note(describe_split(written.plan, written.index, 0))
        render.note(f"wrote {write_splits}")
    save(plot, lambda path: plots.class_distribution(analysis, path))
    if label_issues:
        _label_issues(data_dir, checkpoint, model, weights, folds, issues, contact_sheet, top)
    if fix_split:
        from clothcli.data.fix_split import fix_split as write_fixed

        with render.progress_bar("writing the fixed dataset"):
            fixed = write_fixed(data_dir, fix_split, keep_conflicts, workers, analysis=analysis)
        render.split_fix(fixed)


def _label_issues(
    data_dir: Path,
    checkpoint: Path | None,
    model: str | None,
    weights: Path | None,
    folds: int,
    issues: Path | None,
    contact_sheet: Path | None,
    top: int,
) -> None:
    from clothcli.engines.label_issues import find_label_issues
    from clothcli.render import plots
    from clothcli.render.documents import write_csv

    if issues is not None and issues.suffix.lower() not in (".csv", ".json"):
        raise UserError(f"--issues must end in .csv or .json, got '{issues.name}'")
    with render.progress_bar("embedding and cross-validating"):
        found = find_label_issues(data_dir, checkpoint, model, weights, folds)
    render.label_issues(found, top)
    if issues is not None and issues.suffix.lower() == ".json":
        save_json(issues, found.to_dict())
    else:
        columns = ["path", "split", "given", "suggested", "quality"]
        save(issues, lambda path: write_csv(path, found.issues, columns))
    save(contact_sheet, lambda path: plots.contact_sheet(found, path, top))


def _download_into(path: Path) -> None:
    from clothcli.data.download import CLOTHING_URL, download_dataset

    render.note(f"downloading clothing-dataset-small from {CLOTHING_URL}")
    with render.download_bar() as update:
        download_dataset(path, progress=update)
    render.note(f"dataset ready at {path}")
