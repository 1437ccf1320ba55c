"""`train` and `tune`: a config file (with overrides) in, a run folder or a suggestion out."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from clothcli import render
from clothcli.cli.options import ConfigArgument, DataOption, JsonOption, SetOption, WeightsOption, save_json
from clothcli.errors import UserError

_OPTION_KEYS = {
    "data": "data.root",
    "weights": "model.weights",
    "model": "model.name",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "lr": "optim.lr",
    "name": "name",
    "output_dir": "output_dir",
    "time_limit": "train.time_limit",
}


def _config_from_options(config: Path | None, overrides: list[str] | None, download: bool, **options):
    """Load a config with `--set` overrides and the dedicated options (which win)."""
    from clothcli.config import load_config

    extra = _config_options(options)
    if download:
        extra.setdefault("data", {})["download"] = True
    return load_config(config, overrides or [], extra)


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
    calibrate_ood: Annotated[
        Path | None,
        typer.Option(
            help="After training, calibrate best/ with this out-of-distribution folder (as calibrate --ood).",
            show_default="no calibration",
        ),
    ] = None,
    time_limit: Annotated[
        float | None,
        typer.Option(
            min=0.01, help="Minutes: stop before an epoch that would pass them (train.time_limit).", show_default="none"
        ),
    ] = None,
    folds: Annotated[
        int | None,
        typer.Option(
            min=2,
            max=20,
            help="k-fold cross-validation: one run per fold, out-of-fold predictions, mean ± std.",
            show_default="one run",
        ),
    ] = None,
) -> None:
    """Fine-tune a timm model with HF Accelerate (CPU, GPU, mixed precision, accelerate launch)."""
    from clothcli.data.inputs import images_under

    if calibrate_ood is not None:
        images_under(calibrate_ood)  # a wrong folder fails now, not after the training
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
            time_limit=time_limit,
        )
    elif time_limit is not None or folds is not None:
        raise UserError("--time-limit and --folds apply to a new run; --resume continues one run as recorded")
    if cfg is not None:
        from clothcli.data.worker_server import start_worker_server

        start_worker_server(cfg.data.num_workers)  # before torch is imported here, so that the imports overlap
    from clothcli.training import train as run_training

    if folds is not None:
        from clothcli.tuning.folds import cross_validate

        with render.TrainProgress() as progress, _stopped_cleanly(lambda: FOLDS_CONTINUE):
            found = cross_validate(cfg, folds, reporter=progress)
        render.cross_validation(found)
        return
    with render.TrainProgress() as progress, _stopped_cleanly(lambda: _continue_with(progress.run_dir)):
        result = run_training(cfg, resume=resume, reporter=progress)
    if result.main_process:
        render.train_summary(result)
        if calibrate_ood is not None:
            from clothcli.engines.calibrate import calibrate

            with render.progress_bar("calibrating"):
                report = calibrate(model=result.run_dir, ood=calibrate_ood)
            render.calibration(report, stored=True)


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
    options = TuneOptions(
        format_search=formats_, batch_search=batch_search, lr_test=lr_test, min_lr=min_lr, max_lr=max_lr, steps=steps,
        memory_budget_gb=memory_budget_gb, plot=plot, write=write,
    )  # fmt: skip
    with render.TrainProgress() as progress:
        report = run_tune(cfg, options, reporter=progress)
    render.tuning(report)
    save_json(json_path, report.to_dict())


def sweep(
    config: ConfigArgument = None,
    space: Annotated[
        Path, typer.Option(help="YAML search space: config keys with log/float/int/choice ranges.")
    ] = Path("space.yaml"),
    trials: Annotated[
        int, typer.Option(min=1, help="Finished trials (complete or pruned) in the sweep, in total.")
    ] = 20,
    timeout: Annotated[
        float | None, typer.Option(min=0.1, help="Minutes after which no new trial starts.", show_default="none")
    ] = None,
    jobs: Annotated[int, typer.Option(min=1, max=64, help="Processes sharing the sweep's database.")] = 1,
    seeds: Annotated[
        int, typer.Option(min=1, max=20, help="Re-run the best 3 configurations over this many seeds; rank by mean.")
    ] = 1,
    folds: Annotated[
        int | None,
        typer.Option(min=2, max=20, help="Each trial a k-fold cross-validation; the objective its mean accuracy."),
    ] = None,
    data: DataOption = None,
    weights: WeightsOption = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Overrides train.epochs.", show_default="config's train.epochs")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Sweep name; its folder is OUTPUT_DIR/NAME-sweep.", show_default="config's name")
    ] = None,
    output_dir: Annotated[
        Path | None, typer.Option(help="Where the sweep folder goes.", show_default="config's output_dir")
    ] = None,
    set_: SetOption = None,
    json_path: JsonOption = None,
    worker: Annotated[bool, typer.Option(hidden=True, help="Run trials only (started by --jobs).")] = False,
) -> None:
    """Search a config's keys with Optuna (TPE, median pruning); resumable; every trial a run folder."""
    from clothcli.tuning.sweep import sweep as run_sweep

    given = {"data": data, "weights": weights, "epochs": epochs, "name": name, "output_dir": output_dir}
    nested = _config_options(given)
    with render.TrainProgress() as progress:
        result = run_sweep(
            config=config, space=space, trials=trials, overrides=set_ or [], options=nested, timeout_min=timeout,
            jobs=jobs, seeds=seeds, folds=folds, worker=worker, reporter=progress,
        )  # fmt: skip
    if result is not None:
        render.sweep_summary(result)
        save_json(json_path, result.to_dict())


def _config_options(options: dict) -> dict:
    """Dedicated options (those given) as the nested dict `load_config` takes as `extra`."""
    nested: dict = {}
    for option, value in options.items():
        if value is None:
            continue
        value = str(value) if isinstance(value, Path) else value
        node = nested
        *parents, leaf = _OPTION_KEYS[option].split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _continue_with(run_dir: Path | None) -> str | None:
    """How to go on after a run stopped mid-way: --resume once an epoch is saved, else start it again
    (None before the run folder exists)."""
    from clothcli.training.run_folder import STATE_DIR

    if run_dir is None:
        return None
    if not (run_dir / STATE_DIR).is_dir():
        return f"no epoch had finished, so {run_dir} holds nothing to resume: start the run again"
    return f"last/ and state/ hold the last completed epoch. Continue with: clothcli train --resume {run_dir}"


FOLDS_CONTINUE = "the same command continues: finished folds are kept and the stopped fold resumes"


@contextmanager
def _stopped_cleanly(hint: Callable[[], str | None]) -> Iterator[None]:
    """A Ctrl-C (exit 130) or a killed DataLoader worker (exit 1) as one line saying how to go on (`hint`,
    asked only then: the run folder may exist only by that time) instead of a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        how = hint()
        if how is None:
            raise
        render.error(f"interrupted; {how}")
        raise typer.Exit(130) from None
    except RuntimeError as exc:
        if not _loader_worker_died(exc):
            raise
        how = hint()
        # torch's message ends in a traceback hint; the kernel's out-of-memory killer is the usual cause
        render.error(
            f"{str(exc).splitlines()[0].strip()} (most often the machine ran out of memory: lower "
            f"data.num_workers or train.batch_size, or set data.cache=disk)" + (f"; {how}" if how else "")
        )
        raise typer.Exit(1) from None


def _loader_worker_died(exc: RuntimeError) -> bool:
    """Whether `exc` is PyTorch's report of a DataLoader worker process killed or exited mid-epoch."""
    return "DataLoader worker" in str(exc)
