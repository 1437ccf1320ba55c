"""The run folder: what a training run writes, and what `--resume` reads back.

```
config.yaml   the resolved config
metrics.csv   one row per epoch (METRIC_FIELDS), plus an `swa` row when SWA is on
best/ last/   checkpoints (model.safetensors + checkpoint.json), swa/ with SWA
state/        accelerate's full state (model, optimizer, scheduler, EMA, SWA, RNG) + trainer_state.json
```

Every file and folder is written beside its final place and swapped in, so a crash leaves the
previous epoch's complete version.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn

from clothcli.checkpoint import save_checkpoint
from clothcli.config import Config, from_dict, read_yaml, to_dict
from clothcli.errors import UserError
from clothcli.io_utils import atomic_write_text, replace_dir
from clothcli.models import Preprocess
from clothcli.runtime import plain_model

METRIC_FIELDS = [
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "val_f1",
    "lr",
    "seconds",
    "images_per_s",
    "data_wait",
    "val_seconds",
]
CONFIG_FILE = "config.yaml"
STATE_DIR = "state"
TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainerState:
    """Where the loop stands after an epoch: what `state/trainer_state.json` holds beside accelerate's
    state, and all that `--resume` needs to continue the loop."""

    epoch: int = -1  # the last completed epoch, counted from 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    stale: int = 0  # epochs since the monitored metric last improved


@dataclass
class ResumePoint:
    config: Config
    state: TrainerState


def unique_run_dir(output_dir: Path, name: str) -> Path:
    """output_dir/name, or name-2, name-3 ...: never an existing folder."""
    candidate = output_dir / name
    suffix = 1
    while candidate.exists():
        suffix += 1
        candidate = output_dir / f"{name}-{suffix}"
    return candidate


def read_resume_point(run_dir: str | Path) -> ResumePoint:
    """The recorded config and loop state of a run folder, or a UserError saying what is missing."""
    run_dir = Path(run_dir)
    state_file = run_dir / STATE_DIR / TRAINER_STATE
    if not state_file.is_file():
        raise UserError(f"{run_dir}: nothing to resume (no {STATE_DIR}/{TRAINER_STATE})")
    config_file = run_dir / CONFIG_FILE
    config = from_dict(read_yaml(config_file), str(config_file))
    try:
        state = TrainerState(**json.loads(state_file.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as exc:
        raise UserError(f"{state_file}: unreadable training state ({exc})") from None
    return ResumePoint(config, state)


def checkpoint_meta(cfg: Config, classes: list[str], pre: Preprocess) -> dict[str, Any]:
    """What every checkpoint of a run records: enough to rebuild and preprocess for the model alone."""
    return {
        "arch": cfg.model.name,
        "model_kwargs": dict(cfg.model.kwargs),
        "num_classes": len(classes),
        "classes": classes,
        "preprocess": pre.to_dict(),
        "config": to_dict(cfg),
    }


def metrics_row(**values: Any) -> dict[str, Any]:
    """A metrics.csv row with every field, blank where `values` has none (the SWA row)."""
    return {name: values.get(name, "") for name in METRIC_FIELDS}


def without_nan(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: missing metrics are recorded as null."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(run_dir / "metrics.csv", buffer.getvalue())


def save_epoch(
    accelerator: Accelerator,
    run_dir: Path,
    model: nn.Module,
    meta_base: dict[str, Any],
    row: dict[str, Any],
    monitor: str,
    improved: bool,
    history: list[dict[str, Any]],
    also_last: bool = True,
) -> None:
    """last/ (and best/ when the epoch improved) and metrics.csv, from the main process."""
    if not accelerator.is_main_process:
        return
    weights = plain_model(accelerator, model)
    meta = {
        **meta_base,
        "epoch": row["epoch"],
        "metric": {"name": monitor, "value": without_nan(row).get(monitor)},
        "metrics": without_nan({k: row[k] for k in ("val_loss", "val_acc", "val_f1") if k in row}),
    }
    if also_last:
        save_checkpoint(weights, run_dir / "last", meta)
    if improved:
        save_checkpoint(weights, run_dir / "best", meta)
    write_metrics(run_dir, history)


def save_state(accelerator: Accelerator, run_dir: Path, trainer_state: TrainerState) -> None:
    """accelerate's full state (model, optimizer, scheduler, EMA, SWA, RNG) swapped in atomically."""
    staging = run_dir / f".{STATE_DIR}.staging"
    accelerator.save_state(str(staging), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(staging / TRAINER_STATE, json.dumps(asdict(trainer_state), default=str))
        replace_dir(staging, run_dir / STATE_DIR)
    accelerator.wait_for_everyone()
