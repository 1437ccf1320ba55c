"""Fault injection: training runs killed with SIGKILL at chosen and random moments, including inside
checkpoint and state writes (CLOTHCLI_FAULT_DELAY pauses there), then resumed, must end exactly as an
uninterrupted run; and no checkpoint on disk is ever a partial one."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clothcli.io_utils import FAULT_DELAY_ENV
from clothcli.models.checkpoint import load_checkpoint
from conftest import TINY_OVERRIDES, comparable, make_dataset

pytestmark = pytest.mark.slow

SETTINGS = [*TINY_OVERRIDES, "train.ema.enabled=true", "model.drop_rate=0.3", "data.num_workers=2", "optim.lr=0.05"]
EPOCHS = 4
DELAY = 0.15


def train_args(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    sets = [a for kv in [*SETTINGS, *extra] for a in ("--set", kv)]
    return ["train", "--data", str(data), "--output-dir", str(out), "--name", name, "--epochs", str(EPOCHS), *sets]


def start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "clothcli", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]


def kill_when(proc: subprocess.Popen, ready, extra: float = 0.0, timeout: float = 120) -> bool:
    """SIGKILL `proc` `extra` seconds after `ready()` holds; False if it ended first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    time.sleep(extra)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def metric_rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    return comparable(rows)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_nothing_partial(run: Path) -> None:
    """Every checkpoint a reader can find loads whole, and metrics.csv parses."""
    for name in ("best", "last"):
        if (run / name).exists() or (run / f".{name}.old").exists():
            model, meta = load_checkpoint(run / name)  # recovers an interrupted swap first
            assert meta["classes"] == ["blue", "green", "red"] and model is not None
    if (run / "metrics.csv").exists():
        metric_rows(run)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = make_dataset(root / "data")
    env = {**os.environ, "XDG_CACHE_HOME": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    finish(start(train_args(data, root / "runs", "full"), env))
    return data, root, env, root / "runs" / "full"


def files_exist(*paths: Path):
    return lambda: all(p.exists() for p in paths)


def state_epoch_at_least(run: Path, epoch: int):
    def ready() -> bool:
        try:
            import json

            return json.loads((run / "state" / "trainer_state.json").read_text())["epoch"] >= epoch
        except (OSError, ValueError, KeyError):
            return False

    return ready


@pytest.mark.parametrize(
    "moment",
    [
        "inside the swap of state/",  # state/ renamed away, the new one not yet in place
        "inside the swap of last/",
        "while writing last/",  # weights written, metadata not yet
        "inside the state write",  # accelerate's files written, trainer_state.json not yet
        "random",
    ],
)
def test_killed_and_resumed_runs_end_as_the_uninterrupted_one(uninterrupted, moment):
    data, root, env, full = uninterrupted
    name = moment.replace(" ", "-").replace("/", "")
    run = root / "runs" / name
    faulty = {**env, FAULT_DELAY_ENV: str(DELAY)}
    rng = random.Random(name)
    kills = 0
    proc = start(train_args(data, root / "runs", name), faulty)
    # the first kill lands at the chosen moment of epoch 2's writes (or at random once epoch 1 is saved)
    ready = {
        "inside the swap of state/": files_exist(run / ".state.old"),
        "inside the swap of last/": files_exist(run / ".last.old"),
        "while writing last/": files_exist(run / ".last.staging" / "model.safetensors"),
        "inside the state write": files_exist(run / ".state.staging" / "model.safetensors"),
        "random": state_epoch_at_least(run, 0),
    }[moment]
    extra = rng.uniform(0.0, 3.0) if moment == "random" else DELAY / 3
    if moment != "random":
        first = ready
        ready = lambda: state_epoch_at_least(run, 0)() and first()  # noqa: E731 (epoch 2's writes, not epoch 1's)
    kills += kill_when(proc, ready, extra)
    assert_nothing_partial(run)
    # a second kill at a random moment of the resumed run, then a resume to the end
    proc = start(["train", "--resume", str(run)], faulty)
    kills += kill_when(proc, lambda: True, rng.uniform(3.0, 6.0))
    assert_nothing_partial(run)
    finish(start(["train", "--resume", str(run)], env))
    assert kills >= 1, "no kill landed: the run ended first"
    assert metric_rows(run) == metric_rows(full)
    for name_ in ("best", "last"):
        a, b = tensors(run / name_), tensors(full / name_)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name_
        # identical tensors make identical files (the safetensors header is written in a fixed order)
        assert (run / name_ / "model.safetensors").read_bytes() == (full / name_ / "model.safetensors").read_bytes()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")], "staging, old or temporary files left"


def test_a_full_disk_is_one_line_and_the_run_resumes_once_space_is_freed(tmp_path, monkeypatch):
    import errno

    from typer.testing import CliRunner

    from clothcli.cli import app
    from clothcli.models import checkpoint

    data = make_dataset(tmp_path / "data")
    runner = CliRunner()
    in_process = "data.num_workers=0"  # no loader workers to start: the test only needs the writes
    assert runner.invoke(app, train_args(data, tmp_path / "runs", "full", in_process)).exit_code == 0
    real_save = checkpoint.save_file
    calls = []

    def fills_up(*a, **k):
        calls.append(1)
        if len(calls) >= 3:  # epoch 1 writes last/ and best/; epoch 2's last/ meets a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_file", fills_up)
        result = runner.invoke(app, train_args(data, tmp_path / "runs", "x", in_process))
    run = tmp_path / "runs" / "x"
    assert result.exit_code == 2, result.output
    assert "no space left on the device while saving epoch 2" in result.output
    assert f"clothcli train --resume {run}" in result.output.replace("\n", "") and "Traceback" not in result.output
    _, meta = load_checkpoint(run / "last")  # the previous checkpoint, whole
    assert meta["epoch"] == 1 and not (run / ".last.staging").exists()
    resumed = runner.invoke(app, ["train", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    assert metric_rows(run) == metric_rows(tmp_path / "runs" / "full")


def test_runs_started_together_with_one_name_get_their_own_folders(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from clothcli.training.run_folder import create_run_dir

    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: create_run_dir(tmp_path / "t", "same"), range(16)))
    assert len(set(made)) == 16 and {p.name for p in made} == {"same", *(f"same-{i}" for i in range(2, 17))}

    data = make_dataset(tmp_path / "data")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = train_args(data, tmp_path / "runs", "same", "data.num_workers=0")
    args[args.index("--epochs") + 1] = "1"
    procs = [start(args, env) for _ in range(2)]
    for proc in procs:
        finish(proc)
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["same", "same-2"]
    for name in runs:
        assert len(metric_rows(tmp_path / "runs" / name)) == 1
        load_checkpoint(tmp_path / "runs" / name)


OWNER_SCRIPT = """
import os, signal, sys
import torch
from torch.utils.data import Dataset
from clothcli.data.loading import make_loader
from clothcli.data.worker_server import worker_context


class WorkerPids(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.tensor(os.getpid())


if __name__ == "__main__":
    loader = make_loader(WorkerPids(), 1, 2, collate_fn=torch.stack, context=worker_context())
    with open(sys.argv[1], "w") as out:
        out.write(" ".join(str(pid) for pid in {int(b) for b in loader}))
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_workers_from_the_fork_server_end_when_the_trainer_is_killed(tmp_path):
    """They are the server's children, not the trainer's, so PyTorch's own watch on the parent never fires."""
    from clothcli.data.worker_server import worker_context
    from clothcli.processes import process_alive

    if worker_context() is None:
        pytest.skip("no fork server on this platform")
    script = tmp_path / "owner.py"
    script.write_text(OWNER_SCRIPT)
    pids = tmp_path / "workers.txt"
    # no pipes: workers left behind would hold them open, and the run would never seem to end
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    done = subprocess.run([sys.executable, str(script), str(pids)], **quiet)
    assert done.returncode == -signal.SIGKILL
    workers = [int(pid) for pid in pids.read_text().split()]
    assert len(workers) == 2
    deadline = time.monotonic() + 30
    while any(process_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in workers if process_alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left
