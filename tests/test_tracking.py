"""Experiment tracking through Accelerate: TensorBoard events read back against metrics.csv."""

import csv
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clothcli.cli import app
from clothcli.config import load_config
from clothcli.training import SilentReporter, train
from conftest import TINY_OVERRIDES

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="the tensorboard extra (pip install 'clothcli[tensorboard]') is not installed",
)
runner = CliRunner()
COLUMNS = ("train_loss", "train_acc", "val_loss", "val_acc", "val_f1", "lr", "images_per_s", "data_wait")


def config(data: Path, out: Path, epochs: int = 3, *extra: str):
    return load_config(
        None,
        [*TINY_OVERRIDES, "optim.lr=0.05", "schedule.name=cosine", f"data.root={data}", f"output_dir={out}",
         f"train.epochs={epochs}", "train.log_with=tensorboard", "train.log_every=1", *extra],
    )  # fmt: skip


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the run's TensorBoard events, as (step, value), purged steps removed."""
    folder = run / "logs" / "experiment"
    events = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def assert_events_match_metrics(run: Path, updates_per_epoch: int, epochs: int) -> None:
    logged, rows = scalars(run), metrics(run)
    assert len(rows) == epochs
    for column in COLUMNS:
        series = logged[f"epoch/{column}"]
        assert [step for step, _ in series] == [(e + 1) * updates_per_epoch for e in range(epochs)], column
        for (_, value), row in zip(series, rows):
            assert value == pytest.approx(float(row[column]), rel=1e-5, abs=1e-6), column
    steps = [step for step, _ in logged["step/train_loss"]]
    assert steps == list(range(1, epochs * updates_per_epoch + 1))  # every update once, none twice
    assert len(logged["step/lr"]) == len(steps)
    assert logged["best/val_acc"][0][1] == pytest.approx(max(float(r["val_acc"]) for r in rows))


def test_tensorboard_events_equal_metrics_csv(tiny_dataset, tmp_path):
    result = train(config(tiny_dataset, tmp_path / "runs"))
    # 24 training images, batch 8: 3 updates per epoch
    assert_events_match_metrics(result.run_dir, updates_per_epoch=3, epochs=3)
    hparams = list((result.run_dir / "logs" / "experiment").rglob("hparams.yml"))
    assert hparams and "train.log_with: tensorboard" in hparams[0].read_text()


class StopDuringEpoch(SilentReporter):
    """Ctrl-C in the middle of epoch `epoch` (0-based), after some of its updates were logged."""

    def __init__(self, epoch: int):
        self.epoch, self.current = epoch, -1

    def epoch_start(self, epoch, epochs, steps):
        self.current = epoch

    def step(self, step, loss, acc, lr, images_per_s):
        if self.current == self.epoch and step >= 2:
            raise KeyboardInterrupt


def test_resume_continues_the_events_without_duplicates(tiny_dataset, tmp_path):
    cfg = config(tiny_dataset, tmp_path / "runs", 4, "train.batch_size=4")  # 6 updates per epoch
    with pytest.raises(KeyboardInterrupt):
        train(cfg, reporter=StopDuringEpoch(2))  # epochs 1-2 saved, epoch 3 cut after logging some updates
    run = tmp_path / "runs" / "experiment"
    assert len(metrics(run)) == 2
    train(None, resume=run)
    assert_events_match_metrics(run, updates_per_epoch=6, epochs=4)


def test_missing_tracker_package_is_one_line_before_any_data(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    result = runner.invoke(
        app, ["train", "--data", str(tmp_path / "no-such-data"), "--set", "train.log_with=[tensorboard, mlflow]"]
    )
    assert result.exit_code == 2
    assert "pip install 'clothcli[mlflow]'" in result.output and "no-such-data" not in result.output


def test_unknown_tracker_is_a_config_error(tmp_path):
    result = runner.invoke(app, ["train", "--data", str(tmp_path), "--set", "train.log_with=neptune"])
    assert result.exit_code == 2 and "train.log_with" in result.output


def test_mlflow_file_store_in_the_run_folder(tiny_dataset, tmp_path, monkeypatch):
    """Runs where the mlflow extra is installed (not part of the dev extras)."""
    mlflow = pytest.importorskip("mlflow")
    result = train(config(tiny_dataset, tmp_path / "runs", 2, "train.log_with=mlflow"))
    run_id = json.loads((result.run_dir / "tracking.json").read_text())["mlflow_run_id"]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.tracking.MlflowClient(tracking_uri=(result.run_dir / "mlruns").resolve().as_uri())
    logged = [m.value for m in client.get_metric_history(run_id, "epoch/val_acc")]
    assert logged == pytest.approx([float(r["val_acc"]) for r in metrics(result.run_dir)])


def test_wandb_runs_offline_in_the_run_folder(tiny_dataset, tmp_path, monkeypatch):
    """Runs where the wandb extra is installed (not part of the dev extras); never touches the network."""
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    result = train(config(tiny_dataset, tmp_path / "runs", 2, "train.log_with=wandb"))
    run_id = json.loads((result.run_dir / "tracking.json").read_text())["wandb_id"]
    assert list((result.run_dir / "wandb").glob(f"offline-run-*-{run_id}"))


def test_a_distilled_run_logs_its_teachers_time(tiny_dataset, tmp_path):
    teacher = train(load_config(None, [*TINY_OVERRIDES, f"data.root={tiny_dataset}", f"output_dir={tmp_path}",
                                       "name=teacher", "train.epochs=1"])).run_dir  # fmt: skip
    run = train(config(tiny_dataset, tmp_path / "runs", 2, f"distill.teacher={teacher}")).run_dir
    assert_events_match_metrics(run, updates_per_epoch=3, epochs=2)
    seconds = [float(row["teacher_seconds"]) for row in metrics(run)]
    assert all(0 < s <= float(row["seconds"]) for s, row in zip(seconds, metrics(run)))
    assert [value for _, value in scalars(run)["epoch/teacher_seconds"]] == pytest.approx(seconds, abs=1e-6)
