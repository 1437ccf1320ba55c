import csv
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from clothcli.cli import app
from clothcli.config import ModelConfig, load_config
from clothcli.errors import UserError
from clothcli.models.build import build_model
from clothcli.models.checkpoint import load_checkpoint
from clothcli.training import SilentReporter, prepare, train
from conftest import TINY_OVERRIDES, comparable

runner = CliRunner()
TINY = [*TINY_OVERRIDES, "optim.lr=0.05", "schedule.name=cosine"]


def tiny_config(data: Path, out: Path, *extra: str, epochs: int = 3):
    return load_config(None, [*TINY, f"data.root={data}", f"output_dir={out}", f"train.epochs={epochs}", *extra])


def rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def cli_train_args(data: Path, out: Path, name: str) -> list[str]:
    """`clothcli train` arguments for a 2-epoch tiny run named `name`."""
    return [
        "train",
        *("--data", str(data), "--output-dir", str(out), "--name", name, "--epochs", "2"),
        *[a for kv in TINY for a in ("--set", kv)],
    ]


class StopAfter(SilentReporter):
    """Interrupts a run as Ctrl-C would, once epoch `epoch` is saved."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def epoch_end(self, row):
        if row["epoch"] == self.epoch:
            raise KeyboardInterrupt


def cut_and_resume(cfg, stop_after: int):
    """Train `cfg`, interrupt it after epoch `stop_after`, and resume it from that mid-run state."""
    with pytest.raises(KeyboardInterrupt):
        train(cfg, reporter=StopAfter(stop_after))
    run = Path(cfg.output_dir) / cfg.name
    assert len(rows(run)) == stop_after < cfg.train.epochs, "the run must be stopped before its end"
    return train(None, resume=run)


def assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_train_writes_run_folder(tiny_dataset, tmp_path):
    result = train(tiny_config(tiny_dataset, tmp_path / "runs"))
    run = result.run_dir
    assert run == tmp_path / "runs" / "experiment"
    assert (run / "config.yaml").is_file()
    assert len(rows(run)) == 3
    assert set(rows(run)[0]) >= {"train_loss", "train_acc", "val_loss", "val_acc", "val_f1", "lr", "seconds"}
    # recorded for every epoch (the tiny validation may take under the 10 ms metrics.csv resolves)
    assert all(float(r["val_seconds"]) >= 0 for r in rows(run))
    for name in ("best", "last"):
        meta = json.loads((run / name / "checkpoint.json").read_text())
        assert meta["classes"] == ["blue", "green", "red"]
        assert meta["preprocess"]["input_size"] == 32
        assert meta["arch"] == "test_efficientnet"
    assert json.loads((run / "last" / "checkpoint.json").read_text())["epoch"] == 3
    assert not list(run.glob(".*staging*"))
    # the tiny colour task is learnable
    assert result.history[-1]["train_acc"] > 0.5


def test_same_config_same_metrics(tiny_dataset, tmp_path):
    a = train(tiny_config(tiny_dataset, tmp_path / "a", epochs=2))
    b = train(tiny_config(tiny_dataset, tmp_path / "b", epochs=2))
    assert comparable(a.history) == comparable(b.history)


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["train.ema.enabled=true", "train.imbalance=sampler", "train.grad_accum=2"],
        ["train.swa.enabled=true", "train.swa.start=0.5", "train.swa.lr=0.01", "train.imbalance=loss"],
        # persistent workers start in the resumed epoch; dropout draws from the global RNG after that
        ["data.num_workers=2", "model.drop_rate=0.5"],
    ],
)
def test_resume_matches_uninterrupted(tiny_dataset, tmp_path, extra):
    full = train(tiny_config(tiny_dataset, tmp_path / "full", *extra, epochs=4))
    resumed = cut_and_resume(tiny_config(tiny_dataset, tmp_path / "cut", *extra, epochs=4), stop_after=2)
    assert comparable(resumed.history) == comparable(full.history)
    assert_same_weights(resumed.run_dir / "last", full.run_dir / "last")


@pytest.mark.parametrize("cache", ["none", "memory"])
def test_augmentation_does_not_depend_on_worker_count(tiny_dataset, tmp_path, cache):
    """Each draw carries its own seed, so persistent workers (any number of them) see the same stream."""
    # RandAugment: timm's (no cache) draws from NumPy, torchvision's (cache) from torch
    extra = ["augment.color_jitter=0.3", "augment.auto_augment=rand-m9-mstd0.5", f"data.cache={cache}"]
    extra.append(f"data.cache_dir={tmp_path / 'cache'}")
    inline = train(tiny_config(tiny_dataset, tmp_path / "w0", *extra, "data.num_workers=0", epochs=2))
    workers = train(tiny_config(tiny_dataset, tmp_path / "w2", *extra, "data.num_workers=2", epochs=2))
    assert comparable(inline.history) == comparable(workers.history)


@pytest.mark.skipif("forkserver" not in multiprocessing.get_all_start_methods(), reason="no fork server")
def test_training_loader_workers_start_from_a_fork_server_not_the_trainer(tiny_dataset, tmp_path):
    """A worker forked from the trainer once its heap holds a step's activations makes the trainer copy every
    page it writes next; workers from the fork server share none of that heap (and still see the same draws:
    test_augmentation_does_not_depend_on_worker_count)."""
    setup = prepare(tiny_config(tiny_dataset, tmp_path / "runs", "data.num_workers=1", epochs=1))
    for loader in (setup.data.train_loader, setup.data.val_loader):
        assert loader.multiprocessing_context.get_start_method() == "forkserver"
    images, targets, *_ = next(iter(setup.data.val_loader))  # the datasets travel to such workers
    assert len(images) == len(targets) > 0
    # those workers map the decode cache's file themselves, so this process does not read it into memory
    assert not setup.data.train_loader.dataset.images.in_memory
    inline = prepare(tiny_config(tiny_dataset, tmp_path / "inline", "data.num_workers=0", epochs=1))
    assert inline.data.train_loader.dataset.images.in_memory


EARLY_SERVER_SCRIPT = """
import sys
import clothcli.data.worker_server as worker_server
from clothcli.cli import main

def record(workers):
    print("torch imported:", "torch" in sys.modules)
    raise SystemExit(0)

worker_server.start_worker_server = record
sys.argv = ["clothcli", *sys.argv[1:]]
main()
"""


def test_train_starts_the_worker_server_before_it_imports_torch(tiny_dataset, tmp_path):
    """The server's imports (about 3.5 s) then overlap this process's own, instead of delaying the first batch."""
    script = tmp_path / "early.py"
    script.write_text(EARLY_SERVER_SCRIPT)
    args = [*cli_train_args(tiny_dataset, tmp_path / "runs", "early"), "--set", "data.num_workers=1"]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "torch imported: False" in done.stdout


@pytest.mark.parametrize("data", [["data.cache=none"], ["data.cache=memory"], ["data.augment_on=device"]])
def test_training_crops_smaller_than_the_evaluation_size(tiny_dataset, tmp_path, data):
    """augment.crop_size sets the training crops only: validation and the checkpoint keep the input size."""
    cfg = tiny_config(tiny_dataset, tmp_path / "runs", "augment.crop_size=24", *data, epochs=1)
    cfg.data.cache_dir = str(tmp_path / "cache")
    setup = prepare(cfg)
    train_images = next(iter(setup.train_loader))[0]
    val_images = next(iter(setup.val_loader))[0]
    assert train_images.shape[1:] == (3, 24, 24)
    assert val_images.shape[1:] == (3, 32, 32)
    messages = []

    class Recorder(SilentReporter):
        def message(self, text):
            messages.append(text)

    run = train(cfg, reporter=Recorder()).run_dir
    assert json.loads((run / "best" / "checkpoint.json").read_text())["preprocess"]["input_size"] == 32
    assert "training on 24 px crops; validation and the checkpoint use 32 px" in messages


def test_crop_size_out_of_range_is_a_user_error(tiny_dataset, tmp_path):
    with pytest.raises(UserError, match="crop_size"):
        tiny_config(tiny_dataset, tmp_path, "augment.crop_size=4")


def test_seeded_draws_depend_on_seed_and_epoch_only():
    import random

    from clothcli.data.loading import CachedImages, SeededDraws

    generator = torch.Generator()
    draws = SeededDraws(torch.utils.data.RandomSampler(range(8), generator=generator), generator, seed=3)
    epochs = []
    for epoch in (0, 1, 0):
        draws.set_epoch(epoch)
        epochs.append(list(draws))
    assert epochs[0] == epochs[2] != epochs[1]
    assert sorted(i for i, _ in epochs[0]) == list(range(8))
    assert len({s for _, s in epochs[0] + epochs[1]}) == 16

    class Images:
        errors = [""] * 8

        def get(self, index):
            return torch.zeros(3, 4, 4)

    noisy = CachedImages(Images(), [0] * 8, lambda image: image + torch.rand(()) + random.random())
    torch.manual_seed(0)
    random.seed(0)
    first = noisy[(5, 123)][0]
    after = (torch.rand(()), random.random())
    torch.manual_seed(0)
    random.seed(0)
    assert (torch.rand(()), random.random()) == after, "the training process's RNG was disturbed"
    assert torch.equal(noisy[(2, 123)][0], first) and not torch.equal(noisy[(5, 124)][0], first)


def test_compiled_model_trains_resumes_and_saves_plain_weights(tiny_dataset, tmp_path):
    """torch.compile through Accelerate (the cheap 'eager' backend here; 'inductor' is the real one)."""
    extra = ["train.compile=eager", "train.ema.enabled=true"]
    full = train(tiny_config(tiny_dataset, tmp_path / "full", *extra, epochs=2))
    assert full.compile_seconds is not None and full.compile_seconds > 0
    model, _ = load_checkpoint(full.run_dir / "last")
    assert not any(k.startswith("_orig_mod") for k in model.state_dict())
    eager = train(tiny_config(tiny_dataset, tmp_path / "eager", "train.ema.enabled=true", epochs=2))
    assert eager.compile_seconds is None
    assert comparable(full.history) == comparable(eager.history)

    resumed = cut_and_resume(tiny_config(tiny_dataset, tmp_path / "cut", *extra, epochs=2), stop_after=1)
    assert comparable(resumed.history) == comparable(full.history)

    bad = runner.invoke(app, [*cli_train_args(tiny_dataset, tmp_path, "bad"), "--set", "train.compile=turbo"])
    assert bad.exit_code == 2 and "inductor" in bad.output


def test_compiled_kernels_are_cached_in_the_users_cache(monkeypatch, tmp_path):
    """A compiling run points torch's inductor cache at clothcli's user cache (kept across reboots), unless
    the user already chose a folder; an eager run leaves the setting alone."""
    from clothcli.runtime import check_compile_backend, make_accelerator

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    make_accelerator("no", device=torch.device("cpu"))
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    make_accelerator("no", device=torch.device("cpu"), compile_backend="inductor")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "xdg" / "clothcli" / "inductor")
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing timm leaves there
    check_compile_backend("inductor")  # train's first check
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "xdg" / "clothcli" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    make_accelerator("no", device=torch.device("cpu"), compile_backend="inductor")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_plain_timm_loads_checkpoint(tiny_dataset, tmp_path):
    result = train(tiny_config(tiny_dataset, tmp_path / "runs", epochs=1))
    model, meta = load_checkpoint(result.run_dir)
    plain = timm.create_model(
        meta["arch"],
        num_classes=len(meta["classes"]),
        checkpoint_path=str(result.run_dir / "best" / "model.safetensors"),
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x), atol=1e-6)


def test_checkpoint_write_is_atomic(tiny_dataset, tmp_path, monkeypatch):
    result = train(tiny_config(tiny_dataset, tmp_path / "runs", epochs=1))
    best = result.run_dir / "best"
    before = (best / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    from clothcli.models import checkpoint

    monkeypatch.setattr(checkpoint, "save_file", crash)
    model, meta = load_checkpoint(best)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(model, best, meta)
    assert (best / "model.safetensors").read_bytes() == before
    load_checkpoint(best)


def test_local_weights_drop_imagenet_head(tmp_path):
    source = timm.create_model("test_efficientnet", num_classes=1000)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = build_model(ModelConfig(name="test_efficientnet", weights=str(path)), 3)
    assert model.get_classifier().out_features == 3
    assert torch.equal(model.conv_stem.weight, source.conv_stem.weight)


def test_freeze_keeps_pretrained_layers_and_checkpoint_stays_plain(tiny_dataset, tmp_path):
    source = timm.create_model("test_efficientnet", num_classes=1000)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    frozen = "model.freeze=[conv_stem, bn1, blocks.0]"
    result = train(tiny_config(tiny_dataset, tmp_path / "runs", f"model.weights={weights}", frozen, epochs=2))
    model, _ = load_checkpoint(result.run_dir / "last")
    trained, pretrained = model.state_dict(), source.state_dict()
    kept = ("conv_stem.weight", "bn1.weight", "bn1.running_var", "blocks.0.0.conv.weight", "blocks.0.0.bn1.bias")
    for key in kept:
        assert torch.equal(trained[key], pretrained[key]), key
    assert not torch.equal(trained["blocks.1.0.conv_exp.weight"], pretrained["blocks.1.0.conv_exp.weight"])
    assert result.history[-1]["train_acc"] > 0.5
    cut = tiny_config(tiny_dataset, tmp_path / "cut", f"model.weights={weights}", frozen, epochs=2)
    resumed = cut_and_resume(cut, stop_after=1)
    assert comparable(resumed.history) == comparable(result.history)
    assert_same_weights(resumed.run_dir / "last", result.run_dir / "last")

    args = [*cli_train_args(tiny_dataset, tmp_path / "runs", "bad"), "--set", "model.freeze=[block.0]"]
    bad = runner.invoke(app, args)
    assert bad.exit_code == 2 and "did you mean blocks.0" in bad.output


def test_freeze_bn_keeps_every_norm_at_pretrained_values_and_checkpoint_loads_plain(tiny_dataset, tmp_path):
    source = timm.create_model("test_efficientnet", num_classes=1000)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    built = build_model(ModelConfig(name="test_efficientnet", weights=str(weights), freeze_bn=True), 3)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in built.modules())
    result = train(tiny_config(tiny_dataset, tmp_path / "runs", f"model.weights={weights}", "model.freeze_bn=true"))
    model, _ = load_checkpoint(result.run_dir / "last")
    trained, pretrained = model.state_dict(), source.state_dict()
    norms = [k for k in pretrained if ".bn" in k or k.startswith("bn")]
    assert norms and all(torch.equal(trained[k], pretrained[k]) for k in norms if "num_batches" not in k)
    assert not torch.equal(trained["conv_stem.weight"], pretrained["conv_stem.weight"])
    cut = tiny_config(tiny_dataset, tmp_path / "cut", f"model.weights={weights}", "model.freeze_bn=true")
    resumed = cut_and_resume(cut, stop_after=2)
    assert comparable(resumed.history) == comparable(result.history)
    assert_same_weights(resumed.run_dir / "last", result.run_dir / "last")


def test_pretrained_offline_is_one_clear_line(tiny_dataset, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(tiny_dataset),
            "--model",
            "test_efficientnet",
            "--set",
            "model.pretrained=true",
            "--set",
            "train.mixed_precision=no",  # nothing to measure first: the message is what is tested
            "--output-dir",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "--weights" in result.output and "Traceback" not in result.output


def test_hub_transport_failure_is_reported(tmp_path, monkeypatch):
    """Online but the transfer fails: the fake transport raises, the user gets the same advice."""
    import timm.models._hub as hub

    from clothcli.errors import UserError

    monkeypatch.setattr("clothcli.models.build.hub_reachable", lambda *a, **k: True)

    def broken(*args, **kwargs):
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(hub, "hf_hub_download", broken)
    with pytest.raises(UserError, match="--weights PATH"):
        build_model(ModelConfig(name="test_efficientnet", pretrained=True), 3)


def test_cli_bad_inputs_exit_2(tiny_dataset, tmp_path):
    cases = [
        ["train", "--data", str(tmp_path / "missing")],
        ["train", "--data", str(tiny_dataset), "--model", "resnet_5O"],
        ["train", "--data", str(tiny_dataset), "--set", "train.epoch=3"],
        ["train", "--data", str(tiny_dataset), "--weights", str(tmp_path / "none.safetensors")],
        ["train", "--resume", str(tmp_path)],
    ]
    for args in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output
    assert "did you mean" in runner.invoke(app, cases[1]).output


def test_a_killed_loader_worker_is_one_line_with_the_resume_command(
    tiny_dataset, tmp_path, monkeypatch, forked_workers
):
    """The kernel's out-of-memory killer takes a DataLoader worker: one line naming the likely cause and how
    to continue, exit 1, no traceback."""
    from clothcli.data import loading

    read = loading.ImageFiles.__getitem__
    run = tmp_path / "runs" / "oom"

    def killed_in_a_worker(self, key):  # in epoch 2, once epoch 1 is saved
        if torch.utils.data.get_worker_info() is not None and (run / "state").is_dir():
            os.kill(os.getpid(), signal.SIGKILL)
        return read(self, key)

    monkeypatch.setattr(loading.ImageFiles, "__getitem__", killed_in_a_worker)
    args = [*cli_train_args(tiny_dataset, tmp_path / "runs", "oom"), "--set", "data.num_workers=1"]
    result = runner.invoke(app, [*args, "--set", "data.cache=none"])
    assert result.exit_code == 1, result.output
    assert "DataLoader worker" in result.output and "out of memory" in result.output
    assert f"clothcli train --resume {run}" in result.output and "Traceback" not in result.output
    monkeypatch.setattr(loading.ImageFiles, "__getitem__", read)
    resumed = runner.invoke(app, ["train", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    assert len((run / "metrics.csv").read_text().splitlines()) == 3  # the header and both epochs


def test_resume_without_a_recorded_config_is_one_line(tiny_dataset, tmp_path):
    run = train(tiny_config(tiny_dataset, tmp_path / "runs", epochs=1)).run_dir
    (run / "config.yaml").unlink()
    result = runner.invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 2 and "config file not found" in result.output
    assert "Traceback" not in result.output


def test_cli_train_then_evaluate(tiny_dataset, tmp_path):
    result = runner.invoke(app, cli_train_args(tiny_dataset, tmp_path / "runs", "cli"))
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "cli"
    out = tmp_path / "report.json"
    errors = tmp_path / "errors.csv"
    md = tmp_path / "report.md"
    png = tmp_path / "cm.png"
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(run),
            str(tiny_dataset),
            "--json",
            str(out),
            "--errors",
            str(errors),
            "--markdown",
            str(md),
            "--confusion-png",
            str(png),
            "--tta",
            "--workers",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["n"] == 12 and f"[{report['correct']}/12]" in result.output
    assert set(report["averages"]) == {"weighted", "micro", "macro"}
    assert sum(map(sum, report["confusion_matrix"])) == 12
    with open(errors) as fh:
        assert len(list(csv.DictReader(fh))) == 12 - report["correct"]
    assert "Confusion matrix" in md.read_text()
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_evaluate_unknown_class_is_an_error(tiny_dataset, tmp_path):
    result = train(tiny_config(tiny_dataset, tmp_path / "runs", epochs=1))
    from conftest import make_image

    make_image(tmp_path / "other" / "purple" / "a.jpg", (120, 0, 120))
    out = runner.invoke(app, ["evaluate", str(result.run_dir), str(tmp_path / "other"), "--workers", "0"])
    assert out.exit_code == 2 and "purple" in out.output


def test_evaluate_reports_unreadable(tiny_dataset, tmp_path):
    result = train(tiny_config(tiny_dataset, tmp_path / "runs", epochs=1))
    (tiny_dataset / "test" / "red" / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    from clothcli.engines.evaluate import evaluate

    report = evaluate(model=result.run_dir, data=tiny_dataset, workers=0)
    assert report.n == 12
    assert [u["path"].endswith("broken.jpg") for u in report.unreadable] == [True]


def test_evaluate_at_another_test_size(tiny_dataset, tmp_path):
    result = train(tiny_config(tiny_dataset, tmp_path / "runs", epochs=1))
    from clothcli.engines.evaluate import evaluate

    trained = evaluate(model=result.run_dir, data=tiny_dataset, workers=0)
    larger = evaluate(model=result.run_dir, data=tiny_dataset, workers=0, input_size=48, crop_pct=1.0)
    assert trained.preprocess["input_size"] == 32
    assert larger.preprocess["input_size"] == 48 and larger.preprocess["crop_pct"] == 1.0
    assert larger.n == trained.n == 12
    out = runner.invoke(app, ["evaluate", str(result.run_dir), str(tiny_dataset), "--input-size", "8"])
    assert out.exit_code == 2 and "input-size" in out.output


@pytest.mark.slow
def test_two_cpu_processes_with_torchrun(tiny_dataset, tmp_path):
    """Several CPU processes (gloo). `accelerate launch --cpu --num_processes 2` would start only one
    (Accelerate needs mpirun for that), which an earlier version of this test did not notice."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "clothcli",
        *cli_train_args(tiny_dataset, tmp_path / "runs", "ddp"),
        *("--set", "train.log_with=tensorboard"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert [r.name for r in runs] == ["ddp"]
    history = rows(runs[0])
    assert len(history) == 2
    assert (runs[0] / "best" / "model.safetensors").is_file()
    output = proc.stdout + proc.stderr
    assert output.count("epoch   1 ") == 1 and output.count("best epoch") == 1  # only the main process reports
    assert "2 processes (MULTI_CPU)" in output
    # one set of TensorBoard events (scalars, and hparams in a sub-folder), written by the main process only
    events = list((runs[0] / "logs").rglob("events.out.tfevents.*"))
    assert len(events) == 2 and len({path.name.split(".")[-2] for path in events}) == 1  # one writer's pid


def test_cli_ctrl_c_then_resume(tiny_dataset, tmp_path, monkeypatch):
    from clothcli import render

    def interrupt(self, row):
        raise KeyboardInterrupt

    args = cli_train_args(tiny_dataset, tmp_path / "runs", "cut")
    with monkeypatch.context() as patch:
        patch.setattr(render.TrainProgress, "epoch_end", interrupt)
        result = runner.invoke(app, args)
    run = tmp_path / "runs" / "cut"
    assert result.exit_code == 130
    assert f"--resume {run}" in result.output.replace("\n", "")
    assert (run / "last" / "model.safetensors").is_file()
    result = runner.invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert len(rows(run)) == 2


class LearningRates(SilentReporter):
    """Records the learning rate the loop reports during each epoch."""

    def __init__(self):
        self.by_epoch: list[list[float]] = []

    def epoch_start(self, epoch, epochs, steps):
        self.by_epoch.append([])

    def step(self, step, loss, acc, lr, images_per_s):
        self.by_epoch[-1].append(lr)


def test_warm_up_climbs_within_the_first_epoch(tiny_dataset, tmp_path):
    """A one-epoch warm-up rises step by step, so the first epoch is not spent at warmup_lr."""
    lrs = LearningRates()
    warmup = ["schedule.warmup_epochs=1", "schedule.warmup_lr=0.0001", "train.batch_size=2"]
    train(tiny_config(tiny_dataset, tmp_path / "runs", *warmup, epochs=2), reporter=lrs)
    first, second = lrs.by_epoch
    # reported at steps 5 and 10 of 12; the last value is already the cosine's, after the warm-up
    assert len(first) == 3 and 0.0001 < first[0] < first[1] <= 0.05
    assert second == sorted(second, reverse=True) and second[-1] < second[0] <= 0.05


def test_validation_runs_the_model_as_evaluate_does(tiny_dataset, tmp_path):
    """Batch norms folded into their convolutions, as evaluate and predict run a checkpoint: the validation
    loss a run records is, to the last bit, what its best checkpoint gives when run that way."""
    from clothcli.models.fusion import prepare_for_inference
    from clothcli.training.setup import validate

    cfg = tiny_config(tiny_dataset, tmp_path / "runs", epochs=2)
    result = train(cfg)
    model, _ = load_checkpoint(result.run_dir / "best")
    setup = prepare(cfg)
    inference = prepare_for_inference(model, setup.pre.input_size)
    assert inference is not model  # folded
    metrics = validate(inference, setup.val_loader, setup.accelerator, setup.channels_last, 3)
    assert metrics["val_loss"] == result.best["val_loss"]
    assert metrics["val_acc"] == result.best["val_acc"]
