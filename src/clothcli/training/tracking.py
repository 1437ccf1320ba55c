"""Experiment tracking through Accelerate's tracker API: TensorBoard, MLflow and W&B, offline by default.

Everything is logged against one step axis, the optimizer update: step-level scalars (loss, learning
rate) every `train.log_every` updates, the epoch's metrics.csv row at the epoch's last update, the
best row at the end. Files stay in the run folder: TensorBoard events in logs/<name>/, an MLflow file
store in mlruns/, W&B's offline run in wandb/. Accelerate logs from the main process only.

A resumed run continues the same tracker run: TensorBoard purges the events after the last saved
epoch (a `purge_step` one update past it, so a killed epoch's step-level scalars are not shown
twice), MLflow and W&B reopen the run whose id `tracking.json` in the run folder recorded.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from clothcli.config import Config, to_dict
from clothcli.errors import UserError
from clothcli.io_utils import atomic_write_text

TRACKING_FILE = "tracking.json"
# tracker -> the module it needs and the extra that installs it
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def tracker_names(cfg: Config) -> list[str]:
    """`train.log_with` as a list without "none"."""
    names = cfg.train.log_with if isinstance(cfg.train.log_with, list) else [cfg.train.log_with]
    return list(dict.fromkeys(n for n in names if n != "none"))


def check_trackers(cfg: Config) -> None:
    """One line naming the extra to install for a tracker whose package is missing (before any work)."""
    for name in tracker_names(cfg):
        module = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"train.log_with={name} needs the {module} package: pip install 'clothcli[{name}]'")


def hyperparameters(cfg: Config) -> dict[str, Any]:
    """The resolved config flattened to "section.key" -> int, float, str or bool (what trackers store)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        elif isinstance(value, bool | int | float | str):
            flat[prefix] = value
        else:
            flat[prefix] = json.dumps(value)

    walk("", to_dict(cfg))
    return flat


def start_tracking(accelerator: Accelerator, cfg: Config, run_path: Path, resume_step: int | None) -> None:
    """Open the trackers for the run at `run_path`; with `resume_step` (the last saved update), continue
    the run they recorded instead of starting another."""
    names = tracker_names(cfg)
    if not names:
        return
    accelerator.project_configuration.logging_dir = str(run_path / "logs")
    ids_file = run_path / TRACKING_FILE
    ids = json.loads(ids_file.read_text(encoding="utf-8")) if ids_file.is_file() else {}
    init_kwargs: dict[str, dict[str, Any]] = {}
    if "tensorboard" in names and resume_step is not None:
        init_kwargs["tensorboard"] = {"purge_step": resume_step + 1}
    if "mlflow" in names:
        if accelerator.is_main_process:
            import mlflow

            # a plain file store needs no database server or driver; MLflow 3 asks for this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((run_path / "mlruns").resolve().as_uri())
        init_kwargs["mlflow"] = {"run_id": ids.get("mlflow_run_id"), "run_name": run_path.name}
    if "wandb" in names:
        ids.setdefault("wandb_id", uuid.uuid4().hex[:12])
        init_kwargs["wandb"] = {
            "mode": os.environ.get("WANDB_MODE", "offline"),
            "dir": str(run_path),
            "id": ids["wandb_id"],
            "resume": "allow",
            "name": run_path.name,
        }
    config = hyperparameters(cfg) if resume_step is None else None
    try:
        accelerator.init_trackers(cfg.name, config=config, init_kwargs=init_kwargs)
    except Exception as exc:  # each tracker library raises its own classes
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(f"train.log_with={','.join(names)}: the tracker did not start ({reason})") from None
    if accelerator.is_main_process:
        if "mlflow" in names:
            ids["mlflow_run_id"] = accelerator.get_tracker("mlflow", unwrap=True).info.run_id
        if ids:
            atomic_write_text(ids_file, json.dumps(ids, indent=2) + "\n")


def numeric(row: dict[str, Any], prefix: str) -> dict[str, float]:
    """The finite numbers of a metrics row, named `prefix/column` (NaN validation of a run without one
    is left out rather than drawn)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        out[f"{prefix}/{key}"] = float(value)
    return out


def flush(accelerator: Accelerator) -> None:
    """Write what the trackers buffered: a run killed after this loses no logged epoch."""
    for tracker in accelerator.trackers:
        writer = getattr(tracker, "writer", None)
        if writer is not None and hasattr(writer, "flush"):
            writer.flush()
