"""`clothcli sweep` (Optuna): the search space checked against the config, trials as run folders, pruning,
a killed sweep continued, seeds; and `train --time-limit`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clothcli.cli import app
from clothcli.config import load_config
from clothcli.errors import UserError
from clothcli.training import train
from clothcli.tuning.space import read_space
from clothcli.tuning.sweep import pruning_step
from conftest import TINY_OVERRIDES, make_dataset

optuna = pytest.importorskip("optuna", reason="the sweep extra (pip install 'clothcli[sweep]') is not installed")
runner = CliRunner()
SPACE = "optim.lr: {log: [0.005, 0.2]}\ntrain.label_smoothing: {float: [0.0, 0.2]}\n"


def _sets(*extra: str) -> list[str]:
    return [a for kv in [*TINY_OVERRIDES, *extra] for a in ("--set", kv)]


def test_the_space_is_checked_against_the_config(tmp_path):
    space = tmp_path / "space.yaml"
    cases = {
        "optim.lrr: {log: [0.001, 0.1]}": "did you mean 'optim.lr'",
        "optim.lr: {log: [0.0, 0.1]}": "a log range needs low > 0",
        "optim.lr: {float: [0.1, 0.01]}": "low (0.1) must be below high (0.01)",
        "train.label_smoothing: {float: [0.0, 2.0]}": "train.label_smoothing = 2.0",
        "train.epochs: {int: [2.5, 6]}": "whole numbers",
        "optim.lr: {uniform: [0.001, 0.1]}": "needs exactly one of log, float, int, choice",
        "train.imbalance: {choice: [none, weird]}": "train.imbalance = 'weird'",
        "optim.lr: {log: [0.001, 0.1], step: 2}": "unknown entry 'step'",
        "model.name: {choice: {a: missing.safetensors, b: missing.safetensors}}": "weights file for a not found",
        "": "the search space is empty",
    }
    for text, expected in cases.items():
        space.write_text(text)
        with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            read_space(space, None, [o for o in TINY_OVERRIDES if not o.startswith("model.name")])
    space.write_text(SPACE)
    with pytest.raises(UserError, match="both in the search space and set on the command line"):
        read_space(space, None, [*TINY_OVERRIDES, "optim.lr=0.1"])
    (tmp_path / "w.safetensors").write_bytes(b"x")
    models = "model.name: {choice: {test_efficientnet: w.safetensors, test_byobnet: w.safetensors}}\n"
    space.write_text(SPACE + "train.epochs: {int: [2, 4]}\n" + models)
    found = {d.key: d for d in read_space(space, None, [o for o in TINY_OVERRIDES if "model.name" not in o])}
    assert found["optim.lr"].kind == "log" and found["train.epochs"].low == 2
    assert dict(found["model.name"].weights)["test_byobnet"] == str((tmp_path / "w.safetensors").resolve())


def test_schedules_of_several_lengths_report_at_the_same_fractions():
    assert [pruning_step(e, 10, False) for e in (1, 2, 10)] == [1, 2, 10]
    assert [pruning_step(e, 10, True) for e in range(1, 11)] == list(range(10, 101, 10))
    assert [pruning_step(e, 4, True) for e in range(1, 5)] == [20, 50, 70, 100]
    assert pruning_step(1, 14, True) is None and pruning_step(14, 14, True) == 100


@pytest.fixture
def tiny_data(tmp_path):
    return make_dataset(tmp_path / "data", {"train": 6, "validation": 3, "test": 2})


def test_a_sweep_writes_its_trials_summary_and_a_best_config_that_loads(tiny_data, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    out = tmp_path / "runs"
    args = ["sweep", "--space", str(space), "--trials", "4", "--data", str(tiny_data), "--epochs", "3",
            "--output-dir", str(out), "--name", "tiny", "--json", str(tmp_path / "s.json"), *_sets()]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    folder = out / "tiny-sweep"
    report = json.loads((tmp_path / "s.json").read_text())
    finished = [t for t in report["trials"] if t["state"] in ("complete", "pruned")]
    assert len(finished) == 4
    for trial in report["trials"]:
        assert Path(trial["run"]).parent == folder / "trials" and (Path(trial["run"]) / "metrics.csv").is_file()
        assert 0.005 <= trial["params"]["optim.lr"] <= 0.2
    best = load_config(folder / "best.yaml")
    assert best.optim.lr == pytest.approx(report["best"]["params"]["optim.lr"])
    assert best.train.epochs == 3 and best.name == "tiny-best"
    summary = (folder / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("trial,state,val_acc,epochs_run,optim.lr,train.label_smoothing") and len(summary) == 5
    assert (folder / "importance.png").is_file() or report["importance_note"]
    again = runner.invoke(app, args)  # finished: nothing more runs, the summary is written again
    assert again.exit_code == 0 and len(json.loads((tmp_path / "s.json").read_text())["trials"]) == 4


def test_bad_sweep_requests_are_one_line(tiny_data, tmp_path, monkeypatch):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    base = ["sweep", "--space", str(space), "--data", str(tiny_data), "--output-dir", str(tmp_path / "o"), *_sets()]
    cases = {
        "search space not found": ["sweep", "--space", str(tmp_path / "none.yaml"), *_sets()],
        "both in the search space and set on the command line": [*base, "--set", "optim.lr=0.1"],
    }
    for expected, args in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and expected in " ".join(result.output.split()), result.output
    monkeypatch.setitem(sys.modules, "optuna", None)
    missing = runner.invoke(app, base)
    assert missing.exit_code == 2 and "clothcli[sweep]" in missing.output


def test_a_killed_sweep_continues_where_it_stopped(tiny_data, tmp_path):
    """SIGKILL while a trial trains; the same command again marks it failed, resumes its run folder in a
    new trial with the same values, and finishes the total asked for."""
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    out = tmp_path / "runs"
    command = [sys.executable, "-m", "clothcli", "sweep", "--space", str(space), "--trials", "3", "--data",
               str(tiny_data), "--epochs", "3", "--output-dir", str(out), "--name", "k", *_sets()]  # fmt: skip
    env = {**os.environ, "CLOTHCLI_FAULT_DELAY": "0.15", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / "k-sweep" / "trials" / "trial-001" / "state" / "trainer_state.json"
    deadline = time.monotonic() + 240
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run([*command, "--json", str(tmp_path / "s.json")], capture_output=True, text=True,
                          timeout=600, env={**env, "CLOTHCLI_FAULT_DELAY": ""})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    trials = json.loads((tmp_path / "s.json").read_text())["trials"]
    killed = next(t for t in trials if t["trial"] == 1)
    assert killed["state"] == "fail"
    resumed = [t for t in trials if t["run"] == killed["run"] and t["trial"] != 1]
    assert len(resumed) == 1 and resumed[0]["params"] == killed["params"] and resumed[0]["state"] != "fail"
    assert len([t for t in trials if t["state"] in ("complete", "pruned")]) == 3
    assert "trial 1 was killed: marked failed, its values queued to resume" in " ".join(
        (done.stdout + done.stderr).split()
    )


def test_seeds_rank_the_best_configurations_by_their_mean(tiny_data, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {log: [0.01, 0.1]}\n")
    out = tmp_path / "runs"
    args = ["sweep", "--space", str(space), "--trials", "2", "--seeds", "2", "--data", str(tiny_data), "--epochs",
            "2", "--output-dir", str(out), "--name", "s", "--json", str(tmp_path / "s.json"), *_sets()]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    seeds = json.loads((tmp_path / "s.json").read_text())["seeds"]
    assert 1 <= len(seeds) <= 2 and all(len(s["values"]) == 2 and s["seeds"] == [42, 43] for s in seeds)
    assert [s["mean"] for s in seeds] == sorted((s["mean"] for s in seeds), reverse=True)
    assert all((out / "s-sweep" / "seeds" / f"trial-{s['trial']:03d}-seed-43" / "best").is_dir() for s in seeds)
    assert "mean ± std" in result.output


def test_time_limit_stops_before_an_epoch_that_would_pass_it(tiny_data, tmp_path):
    cfg = load_config(None, [*TINY_OVERRIDES, "train.epochs=4", f"data.root={tiny_data}",
                             f"output_dir={tmp_path / 'runs'}", "train.time_limit=0.0001"])  # fmt: skip
    messages = []

    class Listener:
        def message(self, text):
            messages.append(text)

        def run_started(self, run_dir): ...
        def epoch_start(self, epoch, epochs, steps): ...
        def step(self, *args): ...
        def epoch_end(self, row): ...

    result = train(cfg, reporter=Listener())
    assert result.stopped_by_time and len(result.history) == 1 and (result.run_dir / "best").is_dir()
    assert any("time limit: stopped before epoch 2 of 4" in m and "not compressed" in m for m in messages)
    resumed = runner.invoke(app, ["train", "--resume", str(result.run_dir), "--time-limit", "5"])
    assert resumed.exit_code == 2 and "--time-limit and --folds apply to a new run" in resumed.output


def test_jobs_share_one_study(tiny_data, tmp_path, monkeypatch):
    """--jobs 2: a worker process beside the main one, both on the sweep's database; the total is kept."""
    monkeypatch.setenv("CLOTHCLI_FAULT_DELAY", "0.2")  # trials slower than a process start, so both take some
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    args = ["sweep", "--space", str(space), "--trials", "4", "--jobs", "2", "--data", str(tiny_data), "--epochs",
            "3", "--output-dir", str(tmp_path / "runs"), "--name", "j", "--json", str(tmp_path / "s.json"),
            *_sets()]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    trials = json.loads((tmp_path / "s.json").read_text())["trials"]
    finished = [t for t in trials if t["state"] in ("complete", "pruned")]
    assert 4 <= len(finished) <= 5  # a process may finish the trial it started as the other reached the total
    assert len({t["process"] for t in finished}) == 2 and "2 processes share" in result.output
