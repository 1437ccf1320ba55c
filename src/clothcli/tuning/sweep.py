"""`clothcli sweep`: a search over a config's keys with Optuna, every trial an ordinary run folder.

- Sampling: TPE (seeded from train.seed and the number of trials already done, so a resumed sweep
  draws new values rather than repeating the first ones).
- Pruning: Optuna's median pruner on the per-epoch validation metric (`train.monitor`), reported from
  the training loop's epoch callback, after a warm-up. When `train.epochs` is in the space, schedules
  of different lengths are compared at the same fraction of their schedule: a trial reports at the
  first epoch past each tenth of its schedule, as step 10, 20, ..., 100.
- Storage: an SQLite database in the sweep folder (Optuna's RDB storage), which `--jobs K` processes
  share. Each running trial records its host and process; a sweep started again marks the trials of
  processes that no longer exist as failed and queues their values again, and the new trial resumes
  the killed trial's run folder from its last epoch. On other hosts Optuna's heartbeat does the same
  after its grace period. `--trials` counts finished trials (complete or pruned) in total.
- At the end: summary.csv and summary.md (trial, state, value, epochs run, run folder, parameters),
  importance.png (Optuna's fANOVA importances), and best.yaml, the best trial's config, checked to
  load before it is written. With `--seeds S` the best few configurations run again with S - 1 more
  seeds each and are ranked by their mean.
"""

from __future__ import annotations

import csv
import gc
import io
import os
import socket
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clothcli.config import Config, load_config, save_config
from clothcli.errors import UserError, require_packages
from clothcli.io_utils import atomic_path, atomic_write_text
from clothcli.processes import process_alive
from clothcli.training import Reporter, SilentReporter, train
from clothcli.training.run_folder import read_resume_point
from clothcli.tuning.space import Dimension, read_space, trial_config

SWEEP_EXTRA = "pip install 'clothcli[sweep]'"
DATABASE = "sweep.db"
TOP_FOR_SEEDS = 3
HEARTBEAT_S, GRACE_S = 60, 180
WARMUP_EPOCHS, WARMUP_PERCENT = 2, 20
# the config keys the sweep command's dedicated options set, for the command a worker process is started with
OPTION_FLAGS = {"data.root": "--data", "model.weights": "--weights", "train.epochs": "--epochs",
                "output_dir": "--output-dir", "name": "--name"}  # fmt: skip


@dataclass
class SweepResult:
    directory: Path
    monitor: str
    direction: str
    pruning: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    best_config: Path | None = None
    importance: dict[str, float] = field(default_factory=dict)
    importance_note: str = ""
    seeds: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        found = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in found.items()}


def require_optuna() -> None:
    require_packages(("optuna",), "sweep", SWEEP_EXTRA)


def _optuna() -> Any:
    require_optuna()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


class TrialReporter:
    """Passes the loop's events on, and reports each epoch's monitored value to the trial; raises
    Optuna's TrialPruned when the pruner says so (the run folder then holds that epoch, complete)."""

    def __init__(self, inner: Reporter, trial: Any, monitor: str, epochs: int, by_fraction: bool):
        self.inner, self.trial, self.monitor = inner, trial, monitor
        self.epochs, self.by_fraction = epochs, by_fraction
        self.reported: set[int] = set()

    def message(self, text: str) -> None:
        self.inner.message(text)

    def run_started(self, run_dir: Path) -> None:
        self.inner.run_started(run_dir)

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self.inner.epoch_start(epoch, epochs, steps)

    def step(self, done: int, loss: float, acc: float, lr: float, images_per_s: float) -> None:
        self.inner.step(done, loss, acc, lr, images_per_s)

    def epoch_end(self, row: dict[str, Any]) -> None:
        self.inner.epoch_end(row)
        if row.get("epoch") == "swa":
            return
        self.report(row)
        if self.trial.should_prune():
            optuna = _optuna()
            raise optuna.TrialPruned(f"pruned after epoch {row['epoch']}: {self.monitor} {row[self.monitor]:.4f}")

    def report(self, row: dict[str, Any]) -> None:
        step = pruning_step(int(row["epoch"]), self.epochs, self.by_fraction)
        if step is not None and step not in self.reported:
            self.reported.add(step)
            self.trial.report(float(row[self.monitor]), step)


def pruning_step(epoch: int, epochs: int, by_fraction: bool) -> int | None:
    """The step an epoch (1-based) is reported at: the epoch itself, or with schedules of several lengths
    the tenth of the schedule it completes (10, 20, ..., 100), None before the first tenth."""
    if not by_fraction:
        return epoch
    tenth = (10 * epoch) // epochs
    return tenth * 10 if tenth > 0 else None


def _requeue(study: Any, trial: Any) -> None:
    """Queue a failed trial's values again; the new trial resumes its run folder."""
    study.enqueue_trial(trial.params, user_attrs={"resumes": trial.user_attrs.get("run", "")})


def recover_killed_trials(study: Any) -> list[int]:
    """Trials left running by processes of this host that no longer exist: marked failed, queued again."""
    optuna = _optuna()
    host, recovered = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get("host") == host and isinstance(attrs.get("pid"), int) and not process_alive(attrs["pid"]):
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            _requeue(study, trial)
            recovered.append(trial.number)
    return recovered


@dataclass
class SweepPlan:
    """What every process of one sweep shares."""

    config: str | None
    overrides: list[str]
    options: dict[str, Any]
    dimensions: list[Dimension]
    base: Config
    directory: Path
    trials: int
    folds: int | None = None  # each trial a fold group of this many folds; the objective its mean accuracy

    @property
    def monitor(self) -> str:
        return "fold_accuracy" if self.folds else self.base.train.monitor

    @property
    def direction(self) -> str:
        return "minimize" if self.monitor == "val_loss" else "maximize"

    @property
    def by_fraction(self) -> bool:
        return any(d.key == "train.epochs" for d in self.dimensions)

    def config_for(self, values: dict[str, Any]) -> Config:
        return trial_config(self.config, self.overrides, self.options, self.dimensions, values)


def plan_sweep(
    *,
    config: str | Path | None,
    space: str | Path,
    trials: int,
    overrides: list[str],
    options: dict[str, Any],
    folds: int | None = None,
) -> SweepPlan:
    """Everything checked before a trial runs: the config, the space against it, the data's presence."""
    if trials < 1:
        raise UserError(f"--trials must be at least 1, got {trials}")
    config = str(config) if config is not None else None
    base = load_config(config, overrides, options)
    dimensions = read_space(space, config, overrides, options)
    if folds is not None and base.train.early_stopping.patience is not None:
        raise UserError("--folds needs a fixed number of epochs: drop train.early_stopping.patience")
    directory = Path(base.output_dir) / f"{base.name}-sweep"
    return SweepPlan(config, list(overrides), dict(options), dimensions, base, directory, trials, folds)


def _storage(plan: SweepPlan) -> Any:
    optuna = _optuna()
    plan.directory.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(
        f"sqlite:///{plan.directory / DATABASE}",
        engine_kwargs={"connect_args": {"timeout": 60}},
        heartbeat_interval=HEARTBEAT_S,
        grace_period=GRACE_S,
        heartbeat_stale_trial_callback=_requeue,
    )


def _study(plan: SweepPlan) -> Any:
    optuna = _optuna()
    storage = _storage(plan)
    finished = 0
    try:
        existing = optuna.load_study(study_name="sweep", storage=storage)
        finished = len(existing.get_trials(deepcopy=False, states=_counted(optuna)))
    except KeyError:
        pass
    # Optuna's earliest pruning step is the warm-up itself: a trial runs at least two epochs (two folds)
    warmup = 2 if plan.folds else WARMUP_PERCENT if plan.by_fraction else WARMUP_EPOCHS
    return optuna.create_study(
        study_name="sweep",
        storage=storage,
        direction=plan.direction,
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=plan.base.train.seed + finished, n_startup_trials=5),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=warmup),
    )


def _counted(optuna: Any) -> tuple:
    return (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _objective(plan: SweepPlan, reporter: Reporter) -> Any:
    def objective(trial: Any) -> float:
        optuna = _optuna()
        values = {}
        for d in plan.dimensions:
            if d.kind == "choice":
                values[d.key] = trial.suggest_categorical(d.key, list(d.choices))
            elif d.kind == "int":
                values[d.key] = trial.suggest_int(d.key, int(d.low), int(d.high))
            else:
                values[d.key] = trial.suggest_float(d.key, float(d.low), float(d.high), log=d.kind == "log")
        resumes = trial.user_attrs.get("resumes")
        run_dir = Path(resumes) if resumes else plan.directory / "trials" / f"trial-{trial.number:03d}"
        trial.set_user_attr("run", str(run_dir))
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        cfg = plan.config_for(values)
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        reporter.message(f"trial {trial.number}: {shown}" + (f" (resuming {run_dir.name})" if resumes else ""))
        if plan.folds:
            return _fold_trial(plan, trial, cfg, run_dir, reporter)
        watcher = TrialReporter(reporter, trial, plan.monitor, cfg.train.epochs, plan.by_fraction)
        try:
            if (run_dir / "state").is_dir():
                for row in read_resume_point(run_dir).state.history:
                    watcher.report(row)
                result = train(None, resume=run_dir, reporter=watcher)
            else:
                result = train(cfg, reporter=watcher, run_dir=run_dir)
        except optuna.TrialPruned as pruned:
            reporter.message(f"trial {trial.number}: {pruned}")
            raise
        except UserError as exc:  # a value the space allowed that this run cannot use: the trial fails, not the sweep
            reporter.message(f"trial {trial.number} failed: {exc}")
            raise
        finally:
            gc.collect()
        trial.set_user_attr("epochs_run", len([r for r in result.history if r.get("epoch") != "swa"]))
        if not result.best:
            raise UserError(f"trial {trial.number}: no validation metric (the dataset has no validation split)")
        return float(result.best[plan.monitor])

    return objective


def _fold_trial(plan: SweepPlan, trial: Any, cfg: Config, run_dir: Path, reporter: Reporter) -> float:
    """One trial as a fold group (its folder `run_dir`): the mean held-out accuracy, reported fold by fold
    to the pruner (the running mean after each fold, step = folds done)."""
    from clothcli.tuning.folds import cross_validate

    optuna = _optuna()
    folds = int(plan.folds or 0)
    cfg.output_dir, cfg.name = str(run_dir.parent), run_dir.name.removesuffix(f"-{folds}fold")
    trial.set_user_attr("run", str(Path(cfg.output_dir) / f"{cfg.name}-{folds}fold"))
    accuracies: list[float] = []

    def on_fold(result: Any) -> None:
        accuracies.append(result.accuracy)
        trial.report(float(np.mean(accuracies)), len(accuracies))
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after fold {len(accuracies)}: mean accuracy {np.mean(accuracies):.4f}")

    try:
        found = cross_validate(cfg, folds, reporter, on_fold=on_fold)
    except optuna.TrialPruned as pruned:
        reporter.message(f"trial {trial.number}: {pruned}")
        raise
    finally:
        gc.collect()
    trial.set_user_attr("epochs_run", folds * cfg.train.epochs)
    return found.mean_accuracy


def run_trials(plan: SweepPlan, reporter: Reporter | None = None, timeout_s: float | None = None) -> None:
    """Trials in this process until `plan.trials` are finished in the shared study (or the timeout)."""
    optuna = _optuna()
    reporter = reporter or SilentReporter()
    study = _study(plan)
    recovered = recover_killed_trials(study)
    if recovered:
        which = f"trial {recovered[0]} was" if len(recovered) == 1 else f"trials {', '.join(map(str, recovered))} were"
        reporter.message(f"{which} killed: marked failed, its values queued to resume its run folder")
    if len(study.get_trials(deepcopy=False, states=_counted(optuna))) >= plan.trials:
        return
    stop = optuna.study.MaxTrialsCallback(plan.trials, states=_counted(optuna))
    study.optimize(
        _objective(plan, reporter), timeout=timeout_s, callbacks=[stop], catch=(UserError,), gc_after_trial=True
    )


def _worker_command(plan: SweepPlan, space: str | Path, timeout_s: float | None) -> list[str]:
    command = [sys.executable, "-m", "clothcli", "sweep"]
    if plan.config is not None:
        command.append(plan.config)
    command += ["--space", str(space), "--trials", str(plan.trials), "--worker"]
    for pair in plan.overrides:
        command += ["--set", pair]
    for key, flag in OPTION_FLAGS.items():
        node: Any = plan.options
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            command += [flag, str(node)]
    if timeout_s is not None:
        command += ["--timeout", str(timeout_s / 60)]
    if plan.folds:
        command += ["--folds", str(plan.folds)]
    return command


def _die_with_parent() -> None:
    """In a worker: end when the sweep's main process ends (Linux), so a killed sweep leaves no workers."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def sweep(
    *,
    config: str | Path | None,
    space: str | Path,
    trials: int,
    overrides: list[str] | None = None,
    options: dict[str, Any] | None = None,
    timeout_min: float | None = None,
    jobs: int = 1,
    seeds: int = 1,
    folds: int | None = None,
    worker: bool = False,
    reporter: Reporter | None = None,
) -> SweepResult | None:
    """Run (or continue) the sweep; the main process writes the summary and, with `seeds` > 1, runs
    the best configurations' other seeds. A `worker` (started by the main process) only runs trials.
    With `folds`, every trial is a k-fold cross-validation and the objective its mean held-out accuracy."""
    _optuna()
    if folds is not None and seeds > 1:
        raise UserError("--folds already averages runs over folds: use --folds or --seeds, not both")
    plan = plan_sweep(config=config, space=space, trials=trials, overrides=overrides or [], options=options or {},
                      folds=folds)  # fmt: skip
    reporter = reporter or SilentReporter()
    timeout_s = timeout_min * 60 if timeout_min else None
    if worker:
        run_trials(plan, reporter, timeout_s)
        return None
    plan.directory.mkdir(parents=True, exist_ok=True)
    workers = []
    if jobs > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // jobs)
        torch.set_num_threads(threads)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        for _ in range(jobs - 1):
            workers.append(subprocess.Popen(_worker_command(plan, space, timeout_s), env=env,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                            preexec_fn=_die_with_parent))  # fmt: skip
        reporter.message(f"{jobs} processes share {plan.directory / DATABASE}, {threads} thread(s) each")
    try:
        run_trials(plan, reporter, timeout_s)
    finally:
        for process in workers:
            _, err = process.communicate()
            if process.returncode:
                reporter.message(f"a worker process ended with {process.returncode}: {err.decode()[-500:]}")
    return summarise(plan, seeds, reporter)


def _trial_rows(study: Any) -> list[dict[str, Any]]:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        rows.append({
            "trial": trial.number,
            "state": trial.state.name.lower(),
            "value": trial.value,
            "epochs_run": trial.user_attrs.get("epochs_run", len(trial.intermediate_values)),
            "run": trial.user_attrs.get("run", ""),
            "process": f"{trial.user_attrs.get('host', '')}:{trial.user_attrs.get('pid', '')}",
            "params": dict(trial.params),
        })  # fmt: skip
    return rows


def _write_tables(directory: Path, rows: list[dict[str, Any]], keys: list[str], monitor: str) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial", "state", monitor, "epochs_run", *keys, "run"])
    for row in rows:
        value = "" if row["value"] is None else f"{row['value']:.6g}"
        writer.writerow([row["trial"], row["state"], value, row["epochs_run"],
                         *[row["params"].get(k, "") for k in keys], row["run"]])  # fmt: skip
    atomic_write_text(directory / "summary.csv", buffer.getvalue())
    lines = ["| trial | state | " + monitor + " | epochs run | " + " | ".join(keys) + " |",
             "|---" * (4 + len(keys)) + "|"]  # fmt: skip
    for row in rows:
        value = "" if row["value"] is None else f"{row['value']:.4f}"
        params = [_fmt(row["params"].get(k, "")) for k in keys]
        cells = [str(row["trial"]), row["state"], value, str(row["epochs_run"]), *params]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(directory / "summary.md", "\n".join(lines) + "\n")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _importance(study: Any, directory: Path) -> tuple[dict[str, float], str]:
    optuna = _optuna()
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}, "parameter importance needs at least 2 complete trials"
    try:
        found = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as exc:
        return {}, f"parameter importance: {exc}"
    from clothcli.render import plots

    plots.importance(found, directory / "importance.png")
    return {k: float(v) for k, v in found.items()}, ""


def write_best_config(plan: SweepPlan, values: dict[str, Any], path: Path) -> Path:
    """The config of `values` as YAML, checked to load (beside its place, so paths resolve) before it
    replaces `path`."""
    cfg = plan.config_for(values)
    cfg.name = f"{plan.base.name}-best"
    with atomic_path(path) as staged:
        save_config(cfg, staged)
        try:
            load_config(staged)
        except UserError as exc:
            raise UserError(f"{path}: not written, the best config would not load: {exc}") from None
    return path


def _seed_runs(plan: SweepPlan, rows: list[dict[str, Any]], seeds: int, reporter: Reporter) -> list[dict[str, Any]]:
    """The best configurations again with `seeds` - 1 more seeds each, ranked by the mean."""
    complete = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    reverse = plan.direction == "maximize"
    chosen = sorted(complete, key=lambda r: r["value"], reverse=reverse)[:TOP_FOR_SEEDS]
    ranked = []
    for row in chosen:
        values, base_seed = dict(row["params"]), plan.config_for(row["params"]).train.seed
        found = [row["value"]]
        for offset in range(1, seeds):
            seed = base_seed + offset
            run_dir = plan.directory / "seeds" / f"trial-{row['trial']:03d}-seed-{seed}"
            reporter.message(f"trial {row['trial']} with seed {seed}")
            if (run_dir / "state").is_dir():
                result = train(None, resume=run_dir, reporter=reporter)
            else:
                cfg = plan.config_for(values)
                cfg.train.seed = seed
                result = train(cfg, reporter=reporter, run_dir=run_dir)
            found.append(float(result.best[plan.monitor]))
            gc.collect()
        ranked.append({"trial": row["trial"], "params": values, "seeds": list(range(base_seed, base_seed + seeds)),
                       "values": found, "mean": float(np.mean(found)),
                       "std": float(np.std(found, ddof=1)) if len(found) > 1 else 0.0})  # fmt: skip
    ranked.sort(key=lambda r: r["mean"], reverse=reverse)
    return ranked


def summarise(plan: SweepPlan, seeds: int = 1, reporter: Reporter | None = None) -> SweepResult:
    """The sweep folder's summary, importance figure and best.yaml, from what the study holds now."""
    optuna = _optuna()
    reporter = reporter or SilentReporter()
    study = optuna.load_study(study_name="sweep", storage=_storage(plan))
    rows = _trial_rows(study)
    keys = [d.key for d in plan.dimensions]
    _write_tables(plan.directory, rows, keys, plan.monitor)
    pruning = ("after each fold, on the running mean" if plan.folds
               else "at each tenth of a trial's schedule (train.epochs is searched)" if plan.by_fraction
               else "at each epoch")  # fmt: skip
    result = SweepResult(plan.directory, plan.monitor, plan.direction, f"median pruner, {pruning}", rows)
    result.importance, result.importance_note = _importance(study, plan.directory)
    complete = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    if not complete:
        return result
    reverse = plan.direction == "maximize"
    result.best = sorted(complete, key=lambda r: r["value"], reverse=reverse)[0]
    best_values = result.best["params"]
    if seeds > 1:
        result.seeds = _seed_runs(plan, rows, seeds, reporter)
        best_values = result.seeds[0]["params"]
    result.best_config = write_best_config(plan, best_values, plan.directory / "best.yaml")
    return result
