"""The run folder: what a training run writes, and what `--resume` reads back.

```
config.yaml   the resolved config
metrics.csv   one row per epoch (METRIC_FIELDS), plus an `swa` row when SWA is on
best/ last/   checkpoints (model.safetensors + checkpoint.json), swa/ with SWA
state/        accelerate's state (model, optimizer, RNG), averaged_weights.safetensors (EMA, SWA),
              scheduler.json and trainer_state.json: all of it loads as data, nothing is unpickled
```

Every file and folder is written beside its final place and swapped in, so a crash leaves the
previous epoch's complete version.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from clothcli.config import Config, from_dict, read_yaml, to_dict
from clothcli.data.preprocess import Preprocess
from clothcli.errors import UserError
from clothcli.io_utils import atomic_write_text, fault_point, recover_dir, replace_dir, staging_dir
from clothcli.models.checkpoint import save_checkpoint
from clothcli.runtime import plain_model
from clothcli.safe_files import refuse_links
from clothcli.untrusted import read_json

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
    "teacher_seconds",  # with distillation: the teachers' share of `seconds`
]
CONFIG_FILE = "config.yaml"
STATE_DIR = "state"
TRAINER_STATE = "trainer_state.json"
AVERAGED_STATE = "averaged_weights.safetensors"  # the EMA and SWA models, prefixed "ema." and "swa."
SCHEDULER_STATE = "scheduler.json"
# what accelerate's save_state writes with safe_serialization (per process: random_states_N.pkl)
ACCELERATE_FILES = ("model.safetensors", "optimizer.bin")
UNTOUCHED = "the last good checkpoint (best/, last/) is untouched"
RANDOM_STATES = re.compile(r"random_states_\d+\.pkl")


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


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says the disk or the quota is full. torch.save and safetensors
    wrap the OSError in their own exception types, so their messages are read too."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def disk_full_is_a_user_error(run_dir: Path, what: str) -> Iterator[None]:
    """Turn a full disk while writing `what` into one line that says what is intact and how to go on."""
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise UserError(
            f"no space left on the device while saving {what} in {run_dir}; the checkpoints and state of the "
            f"last completed epoch are intact. Free some space, then continue with: clothcli train --resume {run_dir}"
        ) from None


def create_run_dir(output_dir: Path, name: str) -> Path:
    """Create and return output_dir/name, or name-2, name-3 ...: never an existing folder, also when
    several runs start with the same name at once (each mkdir either creates the folder or fails)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    suffix = 1
    while True:
        candidate = output_dir / (name if suffix == 1 else f"{name}-{suffix}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            suffix += 1


def read_resume_point(run_dir: str | Path) -> ResumePoint:
    """The recorded config and loop state of a run folder, or a UserError saying what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    # resuming writes into these: a link would send the writes outside the run folder
    refuse_links(*(run_dir / name for name in (STATE_DIR, "last", "best", "swa", CONFIG_FILE, "metrics.csv")))
    for folder in (STATE_DIR, "last", "best", "swa"):  # a swap a kill interrupted
        recover_dir(run_dir / folder)
    for leftover in run_dir.glob(".*.tmp"):  # files a killed process was writing; never complete
        leftover.unlink()
    state_file = run_dir / STATE_DIR / TRAINER_STATE
    if not state_file.is_file():
        raise UserError(f"{run_dir}: nothing to resume (no {STATE_DIR}/{TRAINER_STATE})")
    check_state_files(run_dir / STATE_DIR)
    config_file = run_dir / CONFIG_FILE
    config = from_dict(read_yaml(config_file), str(config_file))
    try:
        state = TrainerState(**read_json(state_file))
    except TypeError as exc:
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


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.csv as numbers per epoch (the SWA row, which has no epoch number, left out); [] without one."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("epoch", "").isdigit()]

    def number(value: str) -> float | None:
        try:
            return float(value)
        except (TypeError, ValueError):
            return None

    return [{k: number(v) for k, v in r.items()} for r in rows]


def training_seconds(history: list[dict[str, Any]]) -> float:
    """The time a run spent training, its validation passes included, from `read_history`'s rows."""
    return sum((r.get("seconds") or 0) + (r.get("val_seconds") or 0) for r in history)


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


def save_state(
    accelerator: Accelerator,
    run_dir: Path,
    trainer_state: TrainerState,
    averaged: dict[str, nn.Module],
    scheduler: Any,
) -> None:
    """accelerate's state (model, optimizer, RNG) with the averaged models as safetensors and the
    scheduler as JSON, swapped in atomically. Nothing goes through accelerate's custom-object pickles,
    so `--resume` loads every file as data."""
    target = run_dir / STATE_DIR
    staging = staging_dir(target)
    if accelerator.is_main_process:
        recover_dir(target)
        if staging.exists():
            shutil.rmtree(staging)  # left by a run killed while writing it
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            tensors = {
                f"{name}.{key}": value.detach().to("cpu").contiguous()
                for name, module in averaged.items()
                for key, value in module.state_dict().items()
            }
            save_file(tensors, str(staging / AVERAGED_STATE))
            atomic_write_text(staging / SCHEDULER_STATE, json.dumps(scheduler.state_dict()))
            fault_point()
            atomic_write_text(staging / TRAINER_STATE, json.dumps(asdict(trainer_state), default=str))
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)  # a full disk gets its space back
        raise
    if accelerator.is_main_process:
        replace_dir(staging, target)
    accelerator.wait_for_everyone()


def check_state_files(state_dir: Path) -> None:
    """Every file `--resume` will read is a regular file that loads as data; a UserError naming the first
    that is not (a link, a foreign pickle, a corrupt tensor file) and saying what is left intact."""
    from accelerate.utils import load
    from safetensors import safe_open

    expected = {TRAINER_STATE, AVERAGED_STATE, SCHEDULER_STATE, *ACCELERATE_FILES, "random_states_0.pkl"}
    for entry in sorted(state_dir.iterdir()):
        if entry.is_symlink() or not entry.is_file():
            raise UserError(f"{entry}: not a regular file in the training state; {UNTOUCHED}")
        if RANDOM_STATES.fullmatch(entry.name):
            expected.add(entry.name)  # one per process of the run that wrote it
        elif entry.name not in expected:
            raise UserError(
                f"{entry}: not part of the training state this clothcli writes (reading it would mean unpickling, "
                f"which can run code; state written by clothcli before 0.2 holds such files); {UNTOUCHED}"
            )
    for name in sorted(expected - {TRAINER_STATE}):
        path = state_dir / name
        if not path.is_file():
            raise UserError(f"{path}: missing from the training state; {UNTOUCHED}")
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as tensors:
                    tensors.keys()
            elif path.suffix == ".json":
                read_json(path)
            else:
                load(str(path), map_location="cpu")  # weights_only: tensors and plain values, never code
        except UserError:
            raise
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise UserError(f"{path}: not loadable as data ({reason}); {UNTOUCHED}") from None


def load_state(accelerator: Accelerator, run_dir: Path, averaged: dict[str, nn.Module], scheduler: Any) -> None:
    """The state `save_state` wrote, back into the prepared objects (`read_resume_point` has checked that
    every file loads as data)."""
    state_dir = run_dir / STATE_DIR
    try:
        accelerator.load_state(str(state_dir))
        tensors = load_file(str(state_dir / AVERAGED_STATE))
        for name, module in averaged.items():
            prefix = name + "."
            module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        scheduler.load_state_dict(read_json(state_dir / SCHEDULER_STATE))
    except UserError:
        raise
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{state_dir}: the training state does not fit this run ({reason}); {UNTOUCHED}") from None
