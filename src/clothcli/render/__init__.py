"""Rich rendering of results: tables, progress bars, messages. No computation happens here."""

from clothcli.render.audit import analysis, label_issues, split_fix
from clothcli.render.console import console, download_bar, err_console, error, note, progress_bar, warn
from clothcli.render.network import flops, receptive_fields
from clothcli.render.results import (
    benchmark,
    calibration,
    comparison,
    evaluation,
    export_report,
    fold_comparison,
    predictions,
)
from clothcli.render.training import (
    TrainProgress,
    cross_validation,
    sparkline,
    sweep_summary,
    train_summary,
    tuning,
)

__all__ = [
    "TrainProgress",
    "analysis",
    "benchmark",
    "calibration",
    "comparison",
    "console",
    "cross_validation",
    "download_bar",
    "err_console",
    "error",
    "evaluation",
    "export_report",
    "flops",
    "fold_comparison",
    "label_issues",
    "note",
    "predictions",
    "progress_bar",
    "receptive_fields",
    "sparkline",
    "split_fix",
    "sweep_summary",
    "train_summary",
    "tuning",
    "warn",
]
