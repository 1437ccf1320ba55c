"""The `clothcli` command line: parse options, call a core function, render the result.

Each command is one function that declares its options and does nothing else; options several
commands share are declared once below (`JsonOption`, `SetOption`, ...). It is long only because
eleven commands declare their options here.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
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


def write_json(path: Path, data: dict) -> None:
    """Write `data` as indented JSON atomically."""
    from clothcli.io_utils import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


# Options several commands share, declared once.
JsonOption = Annotated[
    Path | None, typer.Option("--json", help="Write the full result as JSON here.", show_default="not written")
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
RecallOption = Annotated[
    float,
    typer.Option("--recall", min=0.5, max=1.0, help="Share of the classes' images a rejection threshold must keep."),
]
ConfigArgument = Annotated[
    Path | None,
    typer.Argument(
        help="Experiment YAML (e.g. conf/mobilenet-cpu.yaml); defaults if omitted.", show_default="built-in defaults"
    ),
]


@app.command("analyze-data")
@handle_errors
def analyze_data(
    data_dir: Annotated[Path, typer.Argument(help="Dataset folder with train/, validation/ (or val/) and test/.")],
    deep: Annotated[bool, typer.Option(help="Fully decode every image (finds corrupt pixel data, slower).")] = False,
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
) -> None:
    """Counts, balance, image sizes, unreadable files and duplicates/leakage across splits; optionally
    suspected label errors and a copy of the dataset with leaks fixed."""
    from clothcli.data.analysis import analyze_dataset, plot_class_distribution

    if download and not data_dir.exists():
        _download_into(data_dir)
    if label_issues:
        from clothcli.data.label_issues import require_data_extra

        require_data_extra()  # before any image is read
    with render.progress_bar("reading images") as update:
        analysis = analyze_dataset(data_dir, deep=deep, workers=workers, progress=update)
    render.analysis(analysis)
    if json_path:
        write_json(json_path, analysis.to_dict())
        render.note(f"wrote {json_path}")
    if plot:
        plot_class_distribution(analysis, plot)
        render.note(f"wrote {plot}")
    if label_issues:
        _label_issues(data_dir, checkpoint, model, weights, folds, issues, contact_sheet, top)
    if fix_split:
        from clothcli.data.fix_split import fix_split as write_fixed

        with render.progress_bar("writing the fixed dataset"):
            fixed = write_fixed(data_dir, fix_split, keep_conflicts, workers, analysis=analysis)
        render.split_fix(fixed)


def _label_issues(data_dir, checkpoint, model, weights, folds, issues, contact_sheet, top) -> None:
    from clothcli.data.label_issues import contact_sheet as draw_sheet
    from clothcli.data.label_issues import find_label_issues

    if issues is not None and issues.suffix.lower() not in (".csv", ".json"):
        raise UserError(f"--issues must end in .csv or .json, got '{issues.name}'")
    with render.progress_bar("embedding and cross-validating"):
        found = find_label_issues(data_dir, checkpoint, model, weights, folds)
    render.label_issues(found, top)
    if issues is not None:
        if issues.suffix.lower() == ".json":
            write_json(issues, found.to_dict())
        else:
            import csv
            import io

            from clothcli.io_utils import atomic_write_text

            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=["path", "split", "given", "suggested", "quality"])
            writer.writeheader()
            writer.writerows(found.issues)
            atomic_write_text(issues, buffer.getvalue())
        render.note(f"wrote {issues}")
    if contact_sheet is not None:
        draw_sheet(found, contact_sheet, top)
        render.note(f"wrote {contact_sheet}")


def _download_into(path: Path) -> None:
    from clothcli.data.download import CLOTHING_URL, download_dataset

    render.note(f"downloading clothing-dataset-small from {CLOTHING_URL}")
    with render.download_bar() as update:
        download_dataset(path, progress=update)
    render.note(f"dataset ready at {path}")


_OPTION_KEYS = {
    "data": "data.root",
    "weights": "model.weights",
    "model": "model.name",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "lr": "optim.lr",
    "name": "name",
    "output_dir": "output_dir",
}


def _config_from_options(config: Path | None, overrides: list[str] | None, download: bool, **options):
    """Load a config with `--set` overrides and the dedicated options (which win)."""
    from clothcli.config import load_config

    extra: dict = {}
    for option, value in options.items():
        if value is None:
            continue
        node = extra
        *parents, leaf = _OPTION_KEYS[option].split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = str(value) if isinstance(value, Path) else value
    if download:
        extra.setdefault("data", {})["download"] = True
    return load_config(config, overrides or [], extra)


@app.command()
@handle_errors
def train(
    config: ConfigArgument = None,
    data: DataOption = None,
    weights: WeightsOption = None,
    model: Annotated[
        str | None, typer.Option(help="timm architecture (overrides model.name).", show_default="config's model.name")
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Overrides train.epochs.", show_default="config's train.epochs")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Overrides train.batch_size.", show_default="config's train.batch_size")
    ] = None,
    lr: Annotated[
        float | None, typer.Option(min=0.0, help="Overrides optim.lr.", show_default="config's optim.lr")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Run name; the run folder is OUTPUT_DIR/NAME.", show_default="config's name")
    ] = None,
    output_dir: Annotated[
        Path | None,
        typer.Option(help="Where run folders go (overrides output_dir).", show_default="config's output_dir"),
    ] = None,
    download: Annotated[
        bool, typer.Option(help="Download clothing-dataset-small to data.root if it is missing.")
    ] = False,
    set_: SetOption = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue the run in this folder from its last completed epoch.", show_default="new run"),
    ] = None,
) -> None:
    """Fine-tune a timm model with HF Accelerate (CPU, GPU, mixed precision, accelerate launch)."""
    from clothcli.training import train as run_training

    cfg = None
    if resume is None:
        cfg = _config_from_options(
            config,
            set_,
            download,
            data=data,
            weights=weights,
            model=model,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            name=name,
            output_dir=output_dir,
        )
    with render.TrainProgress() as progress:
        try:
            result = run_training(cfg, resume=resume, reporter=progress)
        except KeyboardInterrupt:
            if progress.run_dir is None:
                raise
            render.error(
                f"interrupted; last/ and state/ hold the last completed epoch. Continue with: "
                f"clothcli train --resume {progress.run_dir}"
            )
            raise typer.Exit(130) from None
    if result.main_process:
        render.train_summary(result)


@app.command()
@handle_errors
def evaluate(
    checkpoint: Annotated[
        Path,
        typer.Argument(help="Run folder (uses best/), checkpoint folder, model.safetensors, or exported .onnx file."),
    ],
    data: Annotated[
        Path, typer.Argument(help="Dataset folder (uses its SPLIT) or any folder laid out <class>/<image>.")
    ],
    split: Annotated[str, typer.Option(help="Split to evaluate when DATA is a dataset folder.")] = "test",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 64,
    workers: Annotated[int, typer.Option(min=0, help="DataLoader worker processes.")] = 2,
    tta: Annotated[
        bool, typer.Option(help="Average with the horizontally flipped image (test-time augmentation).")
    ] = False,
    input_size: InputSizeOption = None,
    crop_pct: Annotated[
        float | None,
        typer.Option(min=0.1, max=1.0, help="Centre-crop fraction instead of the trained one.", show_default="trained"),
    ] = None,
    normalize: Annotated[bool, typer.Option(help="Show the confusion matrix normalised per true class.")] = False,
    json_path: JsonOption = None,
    markdown: Annotated[
        Path | None, typer.Option(help="Write the report as Markdown.", show_default="not written")
    ] = None,
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
    ood_recall: RecallOption = 0.95,
) -> None:
    """Accuracy, precision/recall/F1 (weighted, micro, macro, per class) and the confusion matrix."""
    import csv
    import io

    from clothcli.evaluation_report import errors_rows, markdown_report, plot_confusion
    from clothcli.io_utils import atomic_write_text
    from clothcli.predict import is_onnx

    with render.progress_bar("evaluating"):
        if is_onnx(checkpoint):
            from clothcli.onnx_evaluation import evaluate_onnx

            if input_size or crop_pct or reliability_png:
                raise UserError("--input-size, --crop-pct and --reliability-png need the checkpoint, not an .onnx file")
            report = evaluate_onnx(checkpoint, data, split, batch_size, workers, tta, calibration, ood, ood_recall)
        else:
            from clothcli.evaluation import evaluate_checkpoint

            report = evaluate_checkpoint(
                checkpoint,
                data,
                split,
                batch_size,
                workers,
                tta,
                input_size=input_size,
                crop_pct=crop_pct,
                calibrated=calibration,
                reliability_png=reliability_png,
                ood=ood,
                ood_recall=ood_recall,
            )
    render.evaluation(report, normalize)
    if json_path:
        write_json(json_path, report.to_dict())
        render.note(f"wrote {json_path}")
    if markdown:
        atomic_write_text(markdown, markdown_report(report))
        render.note(f"wrote {markdown}")
    if errors:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["path", "true", "predicted", "confidence"])
        writer.writeheader()
        writer.writerows(errors_rows(report))
        atomic_write_text(errors, buffer.getvalue())
        render.note(f"wrote {errors}")
    if confusion_png:
        plot_confusion(report, confusion_png, normalize)
        render.note(f"wrote {confusion_png}")
    if reliability_png:
        render.note(f"wrote {reliability_png}")


@app.command()
@handle_errors
def predict(
    checkpoint: Annotated[
        Path, typer.Argument(help="Run folder (uses best/), checkpoint folder, weights file, or exported .onnx file.")
    ],
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders and glob patterns, mixed.")],
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
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 64,
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
) -> None:
    """Classify the images of files and folders: fast, batched, robust to bad files."""
    from clothcli.predict import run_predict

    rows: list = []
    done = [0]
    with render.progress_bar("classifying") as update:

        def on_result(p) -> None:
            done[0] += 1
            if len(rows) < show:
                rows.append(p)
            update(done[0], None)

        summary = run_predict(
            checkpoint,
            inputs,
            recursive,
            batch_size,
            workers,
            top_k,
            min_confidence,
            output,
            copy_to,
            move_to,
            device,
            on_result,
            resume,
            calibration,
        )
    render.predictions(rows, summary, top_k)
    if output:
        render.note(f"wrote {output}")
    if summary.classified == 0 and summary.already_done == 0:
        raise typer.Exit(1)


@app.command()
@handle_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Run folder (uses best/), checkpoint folder or weights file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .onnx file to write.")],
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
            help="Largest logit difference ONNX Runtime may show against PyTorch, per unit of the largest logit.",
        ),
    ] = 1e-3,
    int8: Annotated[
        bool, typer.Option(help="Also write NAME.int8.onnx: static int8 quantization (QDQ), needs --calibration.")
    ] = False,
    calibration_data: Annotated[
        Path | None,
        typer.Option("--calibration", help="Dataset folder whose train split calibrates --int8.", show_default="none"),
    ] = None,
    calibration_images: Annotated[int, typer.Option(min=1, help="Training images --int8 is calibrated on.")] = 256,
    json_path: JsonOption = None,
) -> None:
    """Export to ONNX (batch norm folded, dynamic batch, classes inside), verified against PyTorch."""
    from clothcli.export import export_onnx

    with render.progress_bar("exporting"):
        report = export_onnx(
            checkpoint,
            output,
            opset,
            verify_data=verify,
            tolerance=tolerance,
            int8=int8,
            calibration_data=calibration_data,
            calibration_images=calibration_images,
        )
    render.export_report(report)
    if json_path:
        write_json(json_path, report.to_dict())
        render.note(f"wrote {json_path}")
    if not report.verification.passed:
        raise typer.Exit(1)


@app.command()
@handle_errors
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (or checkpoint folders) to put side by side.")],
    data: Annotated[Path, typer.Option(help="Dataset folder: every run is evaluated on its SPLIT.")],
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
    """Models side by side on the same images: accuracy with intervals, McNemar tests, cost, the verdict."""
    from clothcli.compare import compare_runs, plot_pareto, write_comparison

    if output is not None and output.suffix.lower() not in (".md", ".json", ".csv"):
        raise UserError(f"-o must end in .md, .json or .csv, got '{output.name}'")
    for path in (output, plot):
        if path is not None and not path.parent.is_dir():
            raise UserError(f"output folder not found: {path.parent}")
    with render.progress_bar("comparing"):
        comparison = compare_runs(runs, data, split, device, threads, latency, cache, reference)
    render.comparison(comparison)
    if output:
        write_comparison(comparison, output)
        render.note(f"wrote {output}")
    if plot:
        plot_pareto(comparison, plot)
        render.note(f"wrote {plot}")


@app.command()
@handle_errors
def report(
    run: Annotated[Path, typer.Argument(help="Run folder written by `clothcli train` (uses best/).")],
    data: Annotated[
        Path | None,
        typer.Argument(help="Dataset folder: evaluated on, and audited.", show_default="the run's dataset, no audit"),
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="The HTML file to write.")] = Path("report.html"),
    split: Annotated[str, typer.Option(help="Split the results and the pictures come from.")] = "test",
    per_class: Annotated[int, typer.Option(min=0, max=50, help="Sample predictions shown per class.")] = 6,
    mistakes: Annotated[int, typer.Option(min=0, max=200, help="Most confident mistakes shown.")] = 12,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 64,
    workers: Annotated[int, typer.Option(min=0, help="DataLoader worker processes.")] = 2,
) -> None:
    """One self-contained HTML page: the run, its curves, results, sample predictions, mistakes, data audit."""
    from clothcli.report import build_report

    with render.progress_bar("building the report"):
        result = build_report(run, data, output, split, per_class, mistakes, batch_size, workers)
    render.note(
        f"wrote {result.path} ({result.bytes / 1e6:.1f} MB, {result.images} pictures): "
        + ", ".join(result.sections)
        + f"; accuracy on {result.split} {result.accuracy:.2%}"
    )


@app.command()
@handle_errors
def calibrate(
    checkpoint: Annotated[
        Path,
        typer.Argument(help="Run folder (uses best/), checkpoint folder or model.safetensors."),
    ],
    data: Annotated[
        Path | None,
        typer.Option(help="Dataset folder with validation/ (and test/).", show_default="the run's data.root"),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 64,
    workers: Annotated[int, typer.Option(min=0, help="DataLoader worker processes.")] = 2,
    device: DeviceOption = None,
    dry_run: Annotated[bool, typer.Option(help="Fit and report, but do not store the temperature.")] = False,
    ood: OodOption = None,
    recall: RecallOption = 0.95,
    json_path: JsonOption = None,
) -> None:
    """Temperature scaling fitted on validation: ECE, NLL and Brier before and after; stores the temperature
    (and, with --ood, the threshold below which predict --min-confidence auto says 'unknown')."""
    from clothcli.calibration import calibrate_checkpoint
    from clothcli.checkpoint import read_meta

    if data is None:
        data = (read_meta(checkpoint).get("config") or {}).get("data", {}).get("root")
        if not data:
            raise UserError("no dataset given: pass --data PATH")
    with render.progress_bar("calibrating"):
        report = calibrate_checkpoint(
            checkpoint, data, batch_size=batch_size, workers=workers, device=device, write=not dry_run, ood=ood,
            recall=recall,
        )  # fmt: skip
    render.calibration(report, stored=not dry_run)
    if json_path:
        write_json(json_path, report.to_dict())
        render.note(f"wrote {json_path}")


MODEL_HELP = "timm name, torchvision:NAME, a config YAML, or a checkpoint (run folder, best/, model.safetensors)."


@app.command()
@handle_errors
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
    if json_path:
        write_json(json_path, report.to_dict())
        render.note(f"wrote {json_path}")


@app.command()
@handle_errors
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
    if json_path:
        write_json(json_path, {**report.to_dict(), "verify": check})
        render.note(f"wrote {json_path}")


@app.command()
@handle_errors
def tune(
    config: ConfigArgument = None,
    data: DataOption = None,
    weights: WeightsOption = None,
    min_lr: Annotated[float, typer.Option(min=0.0, help="Start of the learning-rate sweep.")] = 1e-7,
    max_lr: Annotated[float, typer.Option(min=0.0, help="End of the learning-rate sweep.")] = 10.0,
    steps: Annotated[int, typer.Option(min=10, max=10000, help="Optimizer steps in the sweep.")] = 100,
    formats_: Annotated[
        bool,
        typer.Option(
            "--format-search/--no-format-search",
            help="Time each precision and memory format; the other searches use the fastest, --write records it.",
        ),
    ] = True,
    lr_test: Annotated[bool, typer.Option(help="Run the learning-rate range test.")] = True,
    batch_search: Annotated[bool, typer.Option(help="Run the batch-size search.")] = True,
    memory_budget_gb: Annotated[
        float | None, typer.Option(min=0.1, help="CPU batch search: memory budget.", show_default="half of free RAM")
    ] = None,
    plot: Annotated[Path, typer.Option(help="PNG of loss against learning rate.")] = Path("lr_range_test.png"),
    write: Annotated[
        Path | None,
        typer.Option(
            help="Update optim.lr, train.batch_size and the chosen precision and memory format in this YAML.",
            show_default="nothing written",
        ),
    ] = None,
    json_path: JsonOption = None,
    set_: SetOption = None,
) -> None:
    """Fastest precision and memory format, batch-size search, learning-rate range test; writes a suggestion."""
    from clothcli.tuning import TuneOptions, run_tune

    cfg = _config_from_options(config, set_, False, data=data, weights=weights)
    options = TuneOptions(formats_, batch_search, lr_test, min_lr, max_lr, steps, memory_budget_gb, plot, write)
    with render.TrainProgress() as progress:
        report = run_tune(cfg, options, reporter=progress)
    render.tuning(report)
    if json_path:
        write_json(json_path, report.to_dict())
        render.note(f"wrote {json_path}")


def main() -> None:
    """Console-script entry point."""
    app()
