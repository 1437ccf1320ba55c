"""Distillation from a trained clothcli model with timm's LogitDistillationTask."""

import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch.nn import functional as F
from typer.testing import CliRunner

from clothcli.cli import app
from clothcli.config import load_config
from clothcli.models.loading import load_for_inference
from clothcli.training import SilentReporter, prepare, train
from conftest import TINY_OVERRIDES, comparable, make_dataset

runner = CliRunner()


def tiny(data, out, name, *extra, epochs=2):
    return load_config(
        None,
        [*TINY_OVERRIDES, "optim.lr=0.05", f"data.root={data}", f"output_dir={out}", f"name={name}",
         f"train.epochs={epochs}", *extra],
    )  # fmt: skip


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A teacher at another input size and normalisation than the students below."""
    root = tmp_path_factory.mktemp("distill")
    data = make_dataset(root / "data")
    cfg = tiny(data, root / "runs", "teacher", "preprocess.input_size=40", "preprocess.mean=[0.5, 0.5, 0.5]",
               "preprocess.std=[0.25, 0.25, 0.25]", epochs=3)  # fmt: skip
    return train(cfg).run_dir, data


class Messages(SilentReporter):
    def __init__(self):
        self.lines = []

    def message(self, text):
        self.lines.append(text)


def teacher_logits(run, images, student_pre, size, mean, std):
    """By hand: the student's view renormalised for a teacher and resized to its side, folded teacher."""
    folded = load_for_inference(run, "cpu")
    mean_s, std_s = torch.tensor(student_pre.mean).view(1, 3, 1, 1), torch.tensor(student_pre.std).view(1, 3, 1, 1)
    view = (images * std_s + mean_s - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    view = F.interpolate(view, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        return folded.model(view)


def expected_loss(setup, images, targets, teacher, alpha, temperature):
    """By hand: the student sees the shared view resized to its own side."""
    side, mode = setup.pre.input_size, setup.pre.interpolation  # bicubic for test_efficientnet
    view = images
    if images.shape[-1] != side:
        view = F.interpolate(images, size=(side, side), mode=mode, antialias=True)
    with torch.no_grad():
        student = setup.model(view)
    kl = F.kl_div(F.log_softmax(student / temperature, 1), F.log_softmax(teacher / temperature, 1),
                  reduction="batchmean", log_target=True)  # fmt: skip
    return (1 - alpha) * setup.loss_fn(student, targets) + alpha * temperature**2 * kl


@pytest.mark.parametrize("views", [None, 32])
def test_the_loss_is_timms_logit_distillation_on_the_teachers_view(teacher, tmp_path, views):
    """The views are drawn at the 40-px teacher's side (the 32-px student gets them resized down), or
    with distill.view_size=32 at the student's (the teacher gets them resized up)."""
    run, data = teacher
    extra = [f"distill.view_size={views}"] if views else []
    cfg = tiny(
        data, tmp_path, "student", f"distill.teacher={run}", "distill.alpha=0.7", "distill.temperature=3", *extra
    )
    setup = prepare(cfg)
    assert setup.pre.input_size == 32
    images, targets, _, _ = next(iter(setup.train_loader))
    assert images.shape[-2:] == (views or 40, views or 40)
    out = setup.task(images, targets)
    logits = teacher_logits(run, images, setup.pre, 40, (0.5,) * 3, (0.25,) * 3)
    expected = expected_loss(setup, images, targets, logits, 0.7, 3)
    assert float(out["loss"]) == pytest.approx(float(expected), rel=1e-4)


def test_an_ensemble_of_teachers_averages_their_logits(teacher, tmp_path):
    run, data = teacher
    # a second teacher at the student's own size and normalisation, listed in a config file
    second = train(tiny(data, tmp_path / "runs", "second", epochs=1)).run_dir
    config = tmp_path / "conf" / "student.yaml"
    config.parent.mkdir()
    config.write_text(f"distill:\n  teacher: [{run}, ../runs/second]\n  alpha: 0.5\n  temperature: 2\n")
    cfg = load_config(config, [*TINY_OVERRIDES, f"data.root={data}", f"output_dir={tmp_path / 'out'}"])
    assert cfg.distill.teacher == [str(run), str(second)]  # relative to the config file's folder
    setup = prepare(cfg)
    images, targets, _, _ = next(iter(setup.train_loader))
    assert images.shape[-1] == 40  # the larger teacher's side
    out = setup.task(images, targets)
    mean = tuple(setup.pre.mean)
    logits = (
        teacher_logits(run, images, setup.pre, 40, (0.5,) * 3, (0.25,) * 3)
        + teacher_logits(second, images, setup.pre, 32, mean, tuple(setup.pre.std))
    ) / 2
    expected = expected_loss(setup, images, targets, logits, 0.5, 2)
    assert float(out["loss"]) == pytest.approx(float(expected), rel=1e-4)


def test_distilled_student_trains_resumes_and_stays_plain(teacher, tmp_path):
    run, data = teacher
    extra = [f"distill.teacher={run}", "train.ema.enabled=true", "train.swa.enabled=true", "train.swa.start=0.5"]
    messages = Messages()
    full = train(tiny(data, tmp_path / "full", "s", *extra, epochs=4), reporter=messages)
    assert any(line.startswith("distilling from") and "at 40 px" in line for line in messages.lines)
    assert sum(line.startswith("teacher: ") for line in messages.lines) == 4
    epochs = [row for row in full.history if row["epoch"] != "swa"]  # the SWA row has no timings
    assert len(epochs) == 4 and all(0 < row["teacher_seconds"] <= row["seconds"] for row in epochs)
    with pytest.raises(KeyboardInterrupt):

        class Stop(SilentReporter):
            def epoch_end(self, row):
                if row["epoch"] == 2:
                    raise KeyboardInterrupt

        train(tiny(data, tmp_path / "cut", "s", *extra, epochs=4), reporter=Stop())
    resumed = train(None, resume=tmp_path / "cut" / "s")
    assert comparable(resumed.history) == comparable(full.history)
    # the student alone is saved: the checkpoint loads in plain timm, with no teacher weights in it
    state = load_file(str(full.run_dir / "best" / "model.safetensors"))
    model = timm.create_model("test_efficientnet", num_classes=3)
    model.load_state_dict(state)
    assert not any("teacher" in key for key in state)
    assert not any("teacher" in key for key in load_file(str(full.run_dir / "state" / "model.safetensors")))


def test_teacher_on_other_classes_is_one_line(teacher, tmp_path):
    run, _ = teacher
    data = make_dataset(tmp_path / "other", {"train": 2, "validation": 1}, classes=("red", "green", "cyan"))
    result = runner.invoke(
        app,
        ["train", "--data", str(data), "--output-dir", str(tmp_path / "o"), "--epochs", "1",
         "--set", f"distill.teacher={run}", *[a for kv in TINY_OVERRIDES for a in ("--set", kv)]],
    )  # fmt: skip
    assert result.exit_code == 2 and "trained on other classes: it lacks cyan; adds blue" in result.output, (
        result.output
    )


def test_a_teacher_on_every_process(teacher, tmp_path):
    run, data = teacher
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "clothcli",
           "train", "--data", str(data), "--output-dir", str(tmp_path), "--name", "ddp", "--epochs", "2",
           "--set", f"distill.teacher={run}", *[a for kv in TINY_OVERRIDES for a in ("--set", kv)]]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("distilling from") == 1  # both load it, the main one reports
    assert (tmp_path / "ddp" / "best" / "model.safetensors").is_file()
