"""A sweep's search space: config keys and the values Optuna may give them, read from a YAML file.

    optim.lr: {log: [1.0e-3, 0.1]}             # log-uniform float
    train.label_smoothing: {float: [0.0, 0.2]}  # uniform float
    train.epochs: {int: [6, 14]}                # integer, both ends included
    model.name:                                 # one of several values; a model may carry its weights
      choice:
        tf_mobilenetv3_small_100: ../weights/tf_mobilenetv3_small_100.in1k.safetensors
        mobilenetv2_100: ../weights/mobilenetv2_100.in1k.safetensors

Every key is checked against the config schema before the first trial, with both ends (or every
choice) put through the same validation `--set` gets, so a typo or an out-of-range bound is one line
naming the closest key. A key that is also set on the command line is an error: the sweep would
silently override one of them. Weights paths are relative to the space file's folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clothcli.config import Config, load_config, parse_overrides, read_yaml
from clothcli.errors import UserError

KINDS = ("log", "float", "int", "choice")


@dataclass(frozen=True)
class Dimension:
    """One key of the space: its kind, its bounds or choices, and weights files per model choice."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple[Any, ...] = ()
    weights: tuple[tuple[str, str], ...] = ()  # (model name, weights file) for a model.name choice

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.key} in {list(self.choices)}"
        return f"{self.key} {self.kind} [{self.low}, {self.high}]"


def _nested(key: str, value: Any) -> dict[str, Any]:
    node: dict[str, Any] = {}
    root = node
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return root


def _dimension(key: str, spec: Any, where: str, base: Path) -> Dimension:
    if not isinstance(spec, dict) or len([k for k in spec if k in KINDS]) != 1:
        raise UserError(f"{where}: {key} needs exactly one of {', '.join(KINDS)} (e.g. {key}: {{float: [0.0, 0.2]}})")
    kind = next(k for k in spec if k in KINDS)
    extra = sorted(set(spec) - {kind})
    if extra:
        raise UserError(f"{where}: {key}: unknown entry '{extra[0]}' beside '{kind}'")
    value = spec[kind]
    if kind == "choice":
        if isinstance(value, dict):
            if key != "model.name":
                raise UserError(f"{where}: {key}: a choice carries weights files only for model.name")
            choices = tuple(str(name) for name in value)
            weights = tuple((str(name), str((base / str(path)).resolve())) for name, path in value.items() if path)
            for name, path in weights:
                if not Path(path).is_file():
                    raise UserError(f"{where}: weights file for {name} not found: {path}")
            return Dimension(key, kind, choices=choices, weights=weights)
        if not isinstance(value, list) or len(value) < 2:
            raise UserError(f"{where}: {key}: choice needs a list of at least two values")
        return Dimension(key, kind, choices=tuple(value))
    if not isinstance(value, list) or len(value) != 2 or not all(_is_number(v) for v in value):
        raise UserError(f"{where}: {key}: {kind} needs [low, high], two numbers")
    low, high = (int(v) for v in value) if kind == "int" else (float(v) for v in value)
    if kind == "int" and any(float(v) != int(float(v)) for v in value):
        raise UserError(f"{where}: {key}: int bounds must be whole numbers")
    if not low < high:
        raise UserError(f"{where}: {key}: low ({low}) must be below high ({high})")
    if kind == "log" and low <= 0:
        raise UserError(f"{where}: {key}: a log range needs low > 0, got {low}")
    return Dimension(key, kind, low=low, high=high)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _keys_set(overrides: list[str], options: dict[str, Any]) -> set[str]:
    """Every dotted key the command line sets, through --set or a dedicated option."""
    found: set[str] = set()

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and key != "kwargs":
                walk(value, f"{prefix}{key}.")
            else:
                found.add(prefix + key)

    walk(parse_overrides(overrides), "")
    walk(options, "")
    return found


def read_space(
    path: str | Path,
    config: str | Path | None,
    overrides: list[str] | None = None,
    options: dict[str, Any] | None = None,
) -> list[Dimension]:
    """The dimensions in `path`, each checked against the config schema (both ends, every choice)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"search space not found: {path}")
    data = read_yaml(path)
    if not data:
        raise UserError(f"{path}: the search space is empty")
    overrides, options = list(overrides or []), dict(options or {})
    on_command_line = _keys_set(overrides, options)
    dimensions = []
    for key, spec in data.items():
        key = str(key)
        if key in on_command_line:
            raise UserError(f"{path}: {key} is both in the search space and set on the command line: drop one")
        dimension = _dimension(key, spec, str(path), path.resolve().parent)
        samples = dimension.choices if dimension.kind == "choice" else (dimension.low, dimension.high)
        for sample in samples:
            try:
                load_config(config, overrides, _merge_extra(options, _nested(key, sample)))
            except UserError as exc:
                where = f"{config if config is not None else 'defaults'} (with command-line overrides): "
                raise UserError(f"{path}: {key} = {sample!r}: {str(exc).replace(where, '')}") from None
        dimensions.append(dimension)
    return dimensions


def _merge_extra(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge_extra(out[key], value)
        else:
            out[key] = value
    return out


def trial_config(
    config: str | Path | None,
    overrides: list[str],
    options: dict[str, Any],
    dimensions: list[Dimension],
    values: dict[str, Any],
) -> Config:
    """The config of one trial: the file, the command line, then the trial's values (and a chosen
    model's weights file)."""
    extra = dict(options)
    for dimension in dimensions:
        extra = _merge_extra(extra, _nested(dimension.key, values[dimension.key]))
        if dimension.weights:
            weights = dict(dimension.weights).get(values[dimension.key])
            if weights:
                extra = _merge_extra(extra, _nested("model.weights", weights))
    return load_config(config, overrides, extra)
