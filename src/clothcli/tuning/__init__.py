"""`tune`: which precision and memory format train fastest, a batch-size search, and Leslie Smith's
learning-rate range test, combined into one suggestion for the config.

All of them reuse `training.prepare` and `training.training_step`, so they see exactly the model,
data, augmentation, precision and optimizer that `train` would. The range test restores the model,
optimizer and RNG states afterwards: tuning changes a following `train` only through the values it
writes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clothcli.config import Config
from clothcli.errors import UserError
from clothcli.render import plots
from clothcli.training.setup import Reporter, SilentReporter
from clothcli.tuning.range_test import (
    RangeTest,
    lr_for_training,
    lr_range_test,
    scale_lr,
    steepest,
    suggest,
    valley,
)
from clothcli.tuning.speed import (
    BatchSearch,
    FormatSearch,
    batch_size_search,
    binsearch_max_batch,
    choose_batch,
    format_search,
    largest_batch_for_dataset,
)
from clothcli.tuning.suggestion import write_suggestion

__all__ = [
    "BatchSearch",
    "FormatSearch",
    "RangeTest",
    "TuneOptions",
    "TuneReport",
    "batch_size_search",
    "binsearch_max_batch",
    "choose_batch",
    "format_search",
    "largest_batch_for_dataset",
    "lr_for_training",
    "lr_range_test",
    "run_tune",
    "scale_lr",
    "steepest",
    "suggest",
    "valley",
    "write_suggestion",
]


@dataclass
class TuneOptions:
    """Which searches to run and where their results go."""

    format_search: bool = True
    batch_search: bool = True
    lr_test: bool = True
    min_lr: float = 1e-7
    max_lr: float = 10.0
    steps: int = 100
    memory_budget_gb: float | None = None
    plot: Path | None = None
    write: Path | None = None


@dataclass
class TuneReport:
    formats: FormatSearch | None
    batch_search: BatchSearch | None
    range_test: RangeTest | None
    suggested_lr: float | None
    # the config the suggestions apply to (the fastest format and the chosen batch set)
    config: Config
    plot: Path | None = None
    written: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_search": self.formats.to_dict() if self.formats else None,
            "lr_range_test": self.range_test.to_dict() if self.range_test else None,
            "batch_search": self.batch_search.to_dict() if self.batch_search else None,
            "suggested_lr": self.suggested_lr,
        }


def run_tune(cfg: Config, options: TuneOptions, reporter: Reporter | None = None) -> TuneReport:
    """Run the chosen searches in order (format, batch, learning rate), each using what the one before
    found, and write the suggestion into `options.write` if given. `cfg` itself is not changed."""
    if not (options.format_search or options.lr_test or options.batch_search):
        raise UserError("nothing to do: --no-format-search, --no-lr-test and --no-batch-search were all given")
    reporter = reporter or SilentReporter()
    cfg = copy.deepcopy(cfg)
    formats = format_search(cfg, reporter=reporter) if options.format_search else None
    if formats is not None:
        cfg.train.mixed_precision = formats.best["mixed_precision"]
        cfg.train.channels_last = formats.best["channels_last"]
    search = None
    if options.batch_search:
        search = batch_size_search(cfg, memory_budget_gb=options.memory_budget_gb, reporter=reporter)
    result, suggested_lr, plot = None, None, None
    if options.lr_test:
        test_cfg = copy.deepcopy(cfg)
        test_cfg.train.grad_accum = 1
        result = lr_range_test(test_cfg, options.min_lr, options.max_lr, options.steps, reporter=reporter)
        if options.plot is not None:
            plots.lr_range_test(result, options.plot)
            plot = options.plot
        best_batch = search.best if search else None
        suggested_lr = lr_for_training(result, cfg.train.batch_size, cfg.train.grad_accum, cfg.optim.name, best_batch)
    if search is not None and search.best is not None:
        cfg.train.batch_size = search.best
    if options.write is not None:
        write_suggestion(
            options.write,
            suggested_lr if suggested_lr is not None else cfg.optim.lr,
            search.best if search is not None else None,
            formats.best["mixed_precision"] if formats else None,
            formats.best["channels_last"] if formats else None,
        )
    return TuneReport(formats, search, result, suggested_lr, cfg, plot, options.write)
