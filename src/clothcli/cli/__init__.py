"""The `clothcli` command line: one module per group of commands, each command parses its options,
calls one engine function with keyword arguments and renders what it returns. The commands are
registered here, in the order of the workflow, which is the order `clothcli --help` lists them in."""

from clothcli.cli import comparison, data, inference, models, serving, training
from clothcli.cli.application import app, handle_errors

COMMANDS = {
    "analyze-data": data.analyze_data,
    "train": training.train,
    "tune": training.tune,
    "sweep": training.sweep,
    "evaluate": inference.evaluate,
    "calibrate": inference.calibrate,
    "predict": inference.predict,
    "compare": comparison.compare,
    "report": comparison.report,
    "export": models.export,
    "benchmark": models.benchmark,
    "serve": serving.serve,
    "flops": models.flops,
    "rf": models.rf,
}
for _name, _command in COMMANDS.items():
    app.command(_name)(handle_errors(_command))

__all__ = ["COMMANDS", "app", "main"]


def main() -> None:
    """Console-script entry point."""
    app()
