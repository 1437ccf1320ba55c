"""Training: `setup` builds what a step needs (shared with `tune`), `loop` runs the epochs."""

from clothcli.training.loop import TrainResult, train
from clothcli.training.setup import Reporter, Setup, SilentReporter, prepare, training_step, validate

__all__ = ["Reporter", "Setup", "SilentReporter", "TrainResult", "prepare", "train", "training_step", "validate"]
