"""`evaluate`, `predict` and `calibrate`: any model (a run, a checkpoint or an exported file) on images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clothcli import render
from clothcli.cli.options import (
    BatchSizeOption,
    CalibrationOption,
    DeviceOption,
    InputSizeOption,
    JsonOption,
    MarkdownOption,
    ModelArgument,
    OodOption,
    OodRecallOption,
    PrecisionOption,
    WorkersOption,
    save,
    save_json,
)


def evaluate(
    model: ModelArgument,
    data: Annotated[
        Path, typer.Argument(help="Dataset folder (uses its SPLIT) or any folder laid out <class>/<image>.")
    ],
    split: Annotated[str, typer.Option(help="Split to evaluate when DATA is a dataset folder.")] = "test",
    batch_size: BatchSizeOption = 64,
    workers: WorkersOption = 2,
    tta: Annotated[
        bool, typer.Option(help="Average with the horizontally flipped image (test-time augmentation).")
    ] = False,
    input_size: InputSizeOption = None,
    crop_pct: Annotated[
        float | None,
        typer.Option(min=0.1, max=1.0, help="Centre-crop fraction instead of the trained one.", show_default="trained"),
    ] = None,
    normalise: Annotated[
        bool, typer.Option("--normalize/--no-normalize", help="Show the confusion matrix normalised per true class.")
    ] = False,
    json_path: JsonOption = None,
    markdown: MarkdownOption = None,
    errors: Annotated[
        Path | None,
        typer.Option(
            help="Write misclassified files (path, true, predicted, confidence) as CSV.", show_default="not written"
        ),
    ] = None,
    confusion_png: Annotated[
        Path | None, typer.Option(help="Write the confusion matrix as a PNG.", show_default="not drawn")
    ] = None,
    reliability_png: Annotated[
        Path | None, typer.Option(help="Write the reliability diagram as a PNG.", show_default="not drawn")
    ] = None,
    calibration: CalibrationOption = True,
    ood: OodOption = None,
    ood_recall: OodRecallOption = 0.95,
    precision: PrecisionOption = None,
    cam: Annotated[
        Path | None,
        typer.Option(
            help="Write a class-activation map of every mistake here (a checkpoint only; needs clothcli[explain]).",
            show_default="not drawn",
        ),
    ] = None,
    cam_method: Annotated[
        str, typer.Option(help="gradcam, gradcam++, layercam (a map per class) or eigencam (one map).")
    ] = "gradcam",
    cam_layer: Annotated[
        str | None,
        typer.Option(help="Module to read the maps at, e.g. blocks.5.", show_default="the last feature stage"),
    ] = None,
    cam_all: Annotated[bool, typer.Option(help="With --cam, a map of every image, not only the mistakes.")] = False,
) -> None:
    """Accuracy, precision/recall/F1 (weighted, micro, macro, per class), the confusion matrix and the
    most-confused pairs; with --cam, where the model looked."""
    from clothcli.engines.evaluate import errors_rows
    from clothcli.engines.evaluate import evaluate as run_evaluation
    from clothcli.io_utils import atomic_write_text
    from clothcli.render import plots
    from clothcli.render.documents import evaluation_markdown, write_csv

    with render.progress_bar("evaluating"):
        report = run_evaluation(
            model=model, data=data, split=split, batch_size=batch_size, workers=workers, tta_flip=tta,
            input_size=input_size, crop_pct=crop_pct, calibrated=calibration, reliability_png=reliability_png,
            ood=ood, ood_recall=ood_recall, precision=precision, cam=cam, cam_method=cam_method, cam_layer=cam_layer,
            cam_all=cam_all,
        )  # fmt: skip
    render.evaluation(report, normalise)
    save_json(json_path, report.to_dict())
    save(markdown, lambda path: atomic_write_text(path, evaluation_markdown(report)))
    save(errors, lambda path: write_csv(path, errors_rows(report), ["path", "true", "predicted", "confidence"]))
    save(confusion_png, lambda path: plots.confusion(report.confusion_matrix, report.classes, path, normalise))
    if reliability_png:
        render.note(f"wrote {reliability_png}")


def predict(
    model: ModelArgument,
    inputs: Annotated[
        list[str] | None, typer.Argument(help="Image files, folders and glob patterns, mixed.", show_default=False)
    ] = None,
    from_list: Annotated[
        Path | None,
        typer.Option(
            help="Also classify the paths listed in FILE: one per line, or a .csv/.jsonl/.parquet with a path column.",
            show_default="none",
        ),
    ] = None,
    list_root: Annotated[
        Path | None,
        typer.Option(
            help="Folder the --from-list paths are relative to and must stay inside.", show_default="the list's folder"
        ),
    ] = None,
    merge_wait: Annotated[
        float,
        typer.Option(
            min=1, help="Sharded runs: seconds rank 0 waits for a part that stopped growing before it gives up."
        ),
    ] = 600.0,
    recursive: Annotated[bool, typer.Option(help="Descend into sub-folders of given folders.")] = True,
    top_k: Annotated[int, typer.Option(min=1, max=100, help="How many classes to show per image.")] = 1,
    min_confidence: Annotated[
        str,
        typer.Option(
            help="Below this top-1 probability the label is 'unknown'; 'auto': the threshold `calibrate --ood` stored."
        ),
    ] = "0",
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Stream results to .csv, .json or .jsonl.", show_default="not written"),
    ] = None,
    copy_to: Annotated[
        Path | None, typer.Option(help="Copy each classified image into DIR/<label>/.", show_default="no copying")
    ] = None,
    move_to: Annotated[
        Path | None, typer.Option(help="Move each classified image into DIR/<label>/.", show_default="no moving")
    ] = None,
    batch_size: BatchSizeOption = 64,
    workers: Annotated[
        int,
        typer.Option(min=0, help="Decoding worker processes; at least one per CPU thread also runs the model in them."),
    ] = 2,
    device: DeviceOption = None,
    show: Annotated[int, typer.Option(min=0, help="Rows of the results table shown on the terminal.")] = 50,
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted run: skip the images already in the -o file, append the rest.")
    ] = False,
    calibration: CalibrationOption = True,
    precision: PrecisionOption = None,
) -> None:
    """Classify the images of files and folders: fast, batched, robust to bad files.

    Under torchrun or `accelerate launch` every process classifies its share (RANK of WORLD_SIZE) and
    rank 0 merges the parts into -o, the same file one process writes."""
    from clothcli.engines.predict import run_predict

    rows: list = []
    done = [0]
    with render.progress_bar("classifying") as update:

        def on_result(p) -> None:
            done[0] += 1
            if len(rows) < show:
                rows.append(p)
            update(done[0], None)

        summary = run_predict(
            model=model, inputs=inputs or [], recursive=recursive, batch_size=batch_size, workers=workers, top_k=top_k,
            min_confidence=min_confidence, output=output, copy_to=copy_to, move_to=move_to, device=device,
            on_result=on_result, resume=resume, calibrated=calibration, precision=precision, from_list=from_list,
            list_root=list_root, wait_s=merge_wait,
        )  # fmt: skip
    render.predictions(rows, summary, top_k)
    if output and (summary.shard.rank == 0):
        render.note(f"wrote {output}")
    if summary.classified == 0 and summary.already_done == 0 and summary.shard.rank == 0:
        raise typer.Exit(1)


def calibrate(
    model: ModelArgument,
    data: Annotated[
        Path | None,
        typer.Option(help="Dataset folder with validation/ (and test/).", show_default="the run's data.root"),
    ] = None,
    batch_size: BatchSizeOption = 64,
    workers: WorkersOption = 2,
    device: DeviceOption = None,
    dry_run: Annotated[bool, typer.Option(help="Fit and report, but do not store the temperature.")] = False,
    ood: OodOption = None,
    ood_recall: OodRecallOption = 0.95,
    bank_size: Annotated[
        int | None,
        typer.Option(min=1, help="Training images kept in the --ood feature bank.", show_default="all"),
    ] = None,
    json_path: JsonOption = None,
) -> None:
    """Temperature scaling fitted on validation: ECE, NLL and Brier before and after; stores the temperature
    (and, with --ood, the rejection score and threshold predict --min-confidence auto uses for 'unknown')."""
    from clothcli.engines.calibrate import calibrate as run_calibration

    with render.progress_bar("calibrating"):
        report = run_calibration(
            model=model, data=data, batch_size=batch_size, workers=workers, device=device, write=not dry_run,
            ood=ood, recall=ood_recall, bank_size=bank_size,
        )  # fmt: skip
    render.calibration(report, stored=not dry_run)
    save_json(json_path, report.to_dict())
