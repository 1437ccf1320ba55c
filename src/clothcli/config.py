"""Experiment configuration: YAML files under conf/ loaded into typed dataclasses.

Rules a user can rely on:
- files are read with ``yaml.safe_load`` only;
- an unknown key is an error naming the key, the file and the closest valid key;
- a wrong type or an out-of-range value is an error naming the key;
- any value can be overridden with ``--set section.key=value`` (the value is parsed as YAML);
- relative paths in a config file are resolved against the directory of that file, relative
  paths given on the command line against the working directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from clothcli.errors import UserError

_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    return {"range": (lo, hi, lo_open)}


@dataclass
class SplitConfig:
    """How images without split folders are split: validation and test shares, drawn per duplicate group
    by a hash of the group and `seed` (its own seed, so training seeds never move the test set)."""

    validation: float = field(default=0.1, metadata=_range(0.0, 0.5))
    test: float = field(default=0.1, metadata=_range(0.0, 0.5))
    seed: int = 0
    # a dataset with train/ but no validation/ gets its validation carved out of train
    carve_validation: bool = False
    # duplicates whose labels disagree are left out unless kept (each with its own label)
    keep_conflicts: bool = False


@dataclass
class DataConfig:
    """Where the dataset lives and how it is read."""

    # a folder split/class/image, a folder class/image (split here), or a label file (.csv, .jsonl, .parquet)
    root: str | None = None
    download: bool = False
    num_workers: int = field(default=2, metadata=_range(0, 256))
    cache: Literal["none", "memory", "disk", "auto"] = "auto"
    cache_dir: str | None = None
    # the most the decode caches in cache_dir may take together, in GB; null: half the free space of its disk
    cache_max_gb: float | None = field(default=None, metadata=_range(0.0, lo_open=True))
    # where colour jitter and normalisation run: in the loader workers, or batched on the training
    # device (needs the cache); auto = device on a GPU, workers on a CPU
    augment_on: Literal["auto", "workers", "device"] = "auto"
    split: SplitConfig = field(default_factory=SplitConfig)
    # k-fold cross-validation (`train --folds K` sets these for each run): the train and validation images
    # pooled into `folds` folds (stratified, grouped by duplicates, seeded by split.seed), fold `fold` held out
    folds: int | None = field(default=None, metadata=_range(2, 20))
    fold: int = field(default=0, metadata=_range(0, 19))
    # a label file's columns: the image's path (relative to the file's folder), its label, its split
    path_column: str = "path"
    label_column: str = "label"
    split_column: str = "split"
    # a Parquet file with its images inside (Hugging Face's layout): the column holding them
    image_column: str = "image"


@dataclass
class ModelConfig:
    """A timm architecture and where its starting weights come from."""

    name: str = "tf_mobilenetv3_small_100"
    pretrained: bool = True
    weights: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    drop_rate: float = field(default=0.0, metadata=_range(0.0, 1.0))
    # submodules to keep as pretrained (no gradients, fixed batch norm), e.g. [conv_stem, bn1, blocks.0]
    freeze: list[str] = field(default_factory=list)
    # every batch norm fixed at its pretrained statistics and scale (timm freeze_batch_norm_2d)
    freeze_bn: bool = False


@dataclass
class PreprocessConfig:
    """Input size and normalisation; null means 'take it from the model's pretrained config'."""

    input_size: int | None = field(default=None, metadata=_range(8, 4096))
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    crop_pct: float | None = field(default=None, metadata=_range(0.1, 1.0))


@dataclass
class AugmentConfig:
    """Training augmentation, passed to timm's create_transform."""

    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333])
    hflip: float = field(default=0.5, metadata=_range(0.0, 1.0))
    auto_augment: str | None = None
    color_jitter: float = field(default=0.4, metadata=_range(0.0, 2.0))
    # mixing images and labels (timm's Mixup, per batch): Beta(alpha, alpha) weights for mixup and cutmix
    # (0 leaves it off; both on: one or the other per batch), applied to a share `mix_prob` of the batches
    mixup: float = field(default=0.0, metadata=_range(0.0, 100.0))
    cutmix: float = field(default=0.0, metadata=_range(0.0, 100.0))
    mix_prob: float = field(default=1.0, metadata=_range(0.0, 1.0))
    # side of the training crops; None: preprocess.input_size. Smaller than the evaluation size makes
    # steps cheaper, and random-resized-crop nets often score best tested larger ("FixRes")
    crop_size: int | None = field(default=None, metadata=_range(8, 4096))


@dataclass
class OptimConfig:
    """Optimizer, built with timm's create_optimizer_v2."""

    name: str = "sgd"
    lr: float = field(default=0.04, metadata=_range(0.0, 100.0, lo_open=True))
    momentum: float = field(default=0.9, metadata=_range(0.0, 1.0))
    weight_decay: float = field(default=5e-4, metadata=_range(0.0, 1.0))


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, built with timm's create_scheduler_v2 and updated every optimizer step.

    Lengths (warmup_epochs, decay_epochs) are in epochs, fractions of an epoch included."""

    name: Literal["step", "cosine", "none"] = "step"
    decay_epochs: float = field(default=7, metadata=_range(0.0, None, lo_open=True))
    decay_rate: float = field(default=0.1, metadata=_range(0.0, 1.0, lo_open=True))
    warmup_epochs: float = field(default=0, metadata=_range(0.0, None))
    warmup_lr: float = field(default=1e-5, metadata=_range(0.0, None))
    min_lr: float = field(default=0.0, metadata=_range(0.0, None))


@dataclass
class SwaConfig:
    """Stochastic weight averaging (torch.optim.swa_utils) from a fraction of training on."""

    enabled: bool = False
    start: float = field(default=0.8, metadata=_range(0.0, 1.0))
    lr: float | None = field(default=None, metadata=_range(0.0, None, lo_open=True))


@dataclass
class EmaConfig:
    """Exponential moving average of weights (timm ModelEmaV3)."""

    enabled: bool = False
    decay: float = field(default=0.999, metadata=_range(0.0, 1.0))


@dataclass
class EarlyStopConfig:
    """Stop when the monitored validation metric has not improved for `patience` epochs."""

    patience: int | None = field(default=None, metadata=_range(1, None))


TrackerName = Literal["none", "tensorboard", "mlflow", "wandb"]


@dataclass
class TrainConfig:
    """The training loop."""

    epochs: int = field(default=40, metadata=_range(1, 100000))
    batch_size: int = field(default=64, metadata=_range(1, 65536))
    eval_batch_size: int | None = field(default=None, metadata=_range(1, 65536))
    grad_accum: int = field(default=1, metadata=_range(1, 1024))
    clip_grad: float | None = field(default=None, metadata=_range(0.0, None, lo_open=True))
    label_smoothing: float = field(default=0.0, metadata=_range(0.0, 1.0))
    imbalance: Literal["none", "sampler", "loss"] = "none"
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = "auto"
    channels_last: bool | None = None
    # written by train where `auto` was decided by timing on a CPU (the candidates' images/s, the margin):
    # a record in the run's config.yaml, not a setting
    measured_format: dict[str, Any] | None = None
    # torch.compile backend for the model (e.g. inductor), none = eager; compile time is reported apart
    compile: str | None = None
    seed: int = 42
    monitor: Literal["val_acc", "val_loss", "val_f1"] = "val_acc"
    early_stopping: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    # minutes of epochs (training and validation, as metrics.csv records them): the run stops before an
    # epoch predicted to pass it; the schedule is not compressed to fit
    time_limit: float | None = field(default=None, metadata=_range(0.0, None, lo_open=True))
    swa: SwaConfig = field(default_factory=SwaConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    # experiment trackers through Accelerate, offline under the run folder: one name or a list
    log_with: TrackerName | list[TrackerName] = "none"
    log_every: int = field(default=20, metadata=_range(1, None))  # optimizer steps between step-level logs


@dataclass
class DistillConfig:
    """Knowledge distillation from a trained clothcli model (timm.task.distillation's logit task)."""

    # run folder or checkpoint trained on the same classes, in the same order; a list: their logits averaged
    teacher: str | list[str] | None = None
    alpha: float = field(default=0.5, metadata=_range(0.0, 1.0))  # weight of the teacher's loss; 1 - alpha: labels
    temperature: float = field(default=2.0, metadata=_range(0.0, 100.0, lo_open=True))
    # the teacher sees the shared augmented view resized to this side; None: the teacher's own input size
    teacher_input_size: int | None = field(default=None, metadata=_range(8, 4096))
    # side at which the augmented views are drawn; student and teachers each get them resized to their own
    # side. None: the largest of those sides, so a teacher bigger than the student sees a sharp view
    view_size: int | None = field(default=None, metadata=_range(8, 4096))


@dataclass
class Config:
    """A whole experiment."""

    name: str = "experiment"
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


MAX_CONFIG_BYTES = 1024 * 1024  # a config is a few kB: a larger file is not one
PATH_KEYS = ("output_dir", "data.root", "data.cache_dir", "model.weights", "distill.teacher")


def to_dict(config: Config) -> dict[str, Any]:
    """The fully resolved config as plain data (what a run records)."""
    return dataclasses.asdict(config)


def _check_value(value: Any, hint: Any, key: str, where: str) -> Any:
    """Return `value` coerced to `hint` (int -> float only), or raise a UserError naming `key`."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_value(value, arg, key, where)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if len(errors) == 1 else f"{where}: '{key}' has the wrong type: {value!r}")
    if origin is Literal:
        if value is False and "no" in args:
            value = "no"  # YAML 1.1 reads a bare `no` as false
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise UserError(f"{where}: '{key}' must be one of {choices}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: '{key}' must be a list, got {value!r}")
        return [_check_value(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-4 (an exponent without a dot) as a string
    if hint in (int, float) and isinstance(value, bool):
        raise UserError(f"{where}: '{key}' must be a number, got {value!r}")
    if not isinstance(value, hint):
        raise UserError(f"{where}: '{key}' must be {hint.__name__}, got {value!r}")
    return value


def _check_range(value: Any, spec: tuple, key: str, where: str) -> None:
    lo, hi, lo_open = spec
    if value is None:
        return
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise UserError(f"{where}: '{key}' must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise UserError(f"{where}: '{key}' must be <= {hi}, got {value}")


def _build(cls: type, data: dict[str, Any], prefix: str, where: str) -> Any:
    """Build dataclass `cls` from `data`, checking keys, types and ranges."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            valid = ", ".join(fields)
            raise UserError(f"{where}: unknown key '{prefix}{key}'{hint} (valid: {valid})")
    values = {}
    for name, f in fields.items():
        if name not in data:
            continue
        hint = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, data[name] or {}, key + ".", where)
            continue
        value = _check_value(data[name], hint, key, where)
        if "range" in f.metadata:
            _check_range(value, f.metadata["range"], key, where)
            if isinstance(value, list):
                for v in value:
                    _check_range(v, f.metadata["range"], key, where)
        values[name] = value
    return cls(**values)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "kwargs":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ['train.epochs=5', 'model.name=resnet50'] into a nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set expects KEY=VALUE (e.g. train.epochs=5), got '{pair}'")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise UserError(f"--set {key}: cannot parse value '{raw}': {exc}") from None
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: '{part}' is set both as a value and a section")
        node[parts[-1]] = value
    return nested


def _resolve(path: str, base: Path) -> str:
    """`path` made absolute against `base` (with ~ expanded)."""
    resolved = Path(path).expanduser()
    return str(resolved if resolved.is_absolute() else (base / resolved).resolve())


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the relative paths of `data` absolute against `base`."""
    for dotted in PATH_KEYS:
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(parts[-1]), str):
            node[parts[-1]] = _resolve(node[parts[-1]], base)
        elif isinstance(node, dict) and isinstance(node.get(parts[-1]), list):
            node[parts[-1]] = [_resolve(p, base) if isinstance(p, str) else p for p in node[parts[-1]]]
    return data


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping with safe_load, turning every failure into a UserError."""
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"{path}: larger than {MAX_CONFIG_BYTES:,} bytes; not a clothcli config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:
        raise UserError(f"{path}: YAML nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections")
    return data


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Config:
    """Load a config file (or the defaults), apply `--set` overrides and `extra` (dedicated options).

    Paths from the file are relative to the file; paths from overrides to the working directory.
    """
    data: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = str(path)
        data = _resolve_paths(read_yaml(path), path.resolve().parent)
    cli = _merge(parse_overrides(overrides or []), extra or {})
    data = _merge(data, _resolve_paths(cli, Path.cwd()))
    return _build(Config, data, "", where if not cli else f"{where} (with command-line overrides)")


def from_dict(data: dict[str, Any], where: str = "recorded config") -> Config:
    """Rebuild a Config from its recorded plain-data form (already resolved)."""
    return _build(Config, data, "", where)


def save_config(config: Config, path: Path) -> None:
    """Write the resolved config as YAML."""
    from clothcli.io_utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))
