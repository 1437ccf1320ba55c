"""`train.mixed_precision: auto` on a CPU: measured, cached per host and model, recorded, reused on resume."""

import json

import pytest

from clothcli.config import load_config
from clothcli.training import format_choice, train
from clothcli.training.format_choice import Candidate, choose_format, decide
from conftest import TINY_OVERRIDES

FP32_CL, FP32, BF16_CL, BF16 = (
    Candidate("no", True),
    Candidate("no", False),
    Candidate("bf16", True),
    Candidate("bf16", False),
)
ORDER = [FP32_CL, FP32, BF16_CL, BF16]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test its own cache folder: a choice cached by one test is not another's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_the_fastest_wins_unless_a_preferred_one_is_within_the_noise():
    assert decide({FP32_CL: 100.0, FP32: 80.0, BF16_CL: 130.0, BF16: 90.0}, ORDER) == (BF16_CL, 1.3)
    # bf16 3% faster: inside the noise, fp32 (simpler, first in order) is kept
    chosen, margin = decide({FP32_CL: 100.0, FP32: 80.0, BF16_CL: 103.0, BF16: 90.0}, ORDER)
    assert chosen == FP32_CL and margin == pytest.approx(100 / 103)
    assert decide({FP32_CL: 60.0, FP32: 100.0, BF16_CL: 70.0, BF16: 50.0}, ORDER)[0] == FP32


def auto_config(tmp_path, *extra):
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("train.mixed_precision")]
    return load_config(None, [*overrides, "train.mixed_precision=auto", f"output_dir={tmp_path / 'runs'}", *extra])


def test_measured_once_per_host_model_and_batch(tmp_path):
    calls = []

    def timer(cfg, crop, options):
        calls.append((crop, cfg.train.batch_size, tuple(options)))
        return {option: 10.0 + i for i, option in enumerate(options)}

    cfg = auto_config(tmp_path)
    first = choose_format(cfg, timer=timer)
    assert first.chosen == BF16 and not first.cached and calls == [(32, 8, tuple(ORDER))]
    again = choose_format(cfg, timer=timer)
    assert again.cached and again.chosen == first.chosen and len(calls) == 1
    choose_format(auto_config(tmp_path, "train.batch_size=4"), timer=timer)
    assert len(calls) == 2  # another batch is another measurement
    # a configured memory format is not searched; a configured precision leaves nothing to measure
    one = choose_format(auto_config(tmp_path, "train.channels_last=true"), timer=timer)
    assert set(one.images_per_s) == {"fp32 channels_last", "bf16 channels_last"}
    assert choose_format(auto_config(tmp_path, "train.mixed_precision=no", "train.channels_last=true")) is None
    # a cache file cut short is measured again, never an error
    format_choice.cache_path().write_text("{")
    assert not choose_format(cfg, timer=timer).cached


def test_real_timing_gives_every_candidate_a_speed(tmp_path):
    cfg = auto_config(tmp_path)
    speeds = format_choice.time_candidates(cfg, 32, ORDER, rounds=1)
    assert set(speeds) == set(ORDER) and all(speed > 0 for speed in speeds.values())


def test_train_records_the_choice_and_resume_reuses_it(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(format_choice, "time_candidates", lambda cfg, crop, options: {
        o: (120.0 if o == FP32 else 100.0) for o in options})  # fmt: skip
    cfg = auto_config(tmp_path, f"data.root={tiny_dataset}", "train.epochs=2", "data.cache=none")
    result = train(cfg)
    recorded = load_config(result.run_dir / "config.yaml")
    assert recorded.train.mixed_precision == "no" and recorded.train.channels_last is False
    meta = json.loads((result.run_dir / "best" / "checkpoint.json").read_text())
    assert meta["config"]["train"]["channels_last"] is False
    assert meta["config"]["train"]["measured_format"]["chosen"] == "fp32 contiguous"
    assert meta["config"]["train"]["measured_format"]["margin"] == 1.2

    def refuse(*args):
        raise AssertionError("measured again on resume")

    monkeypatch.setattr(format_choice, "time_candidates", refuse)
    format_choice.cache_path().unlink()
    resumed = train(None, resume=result.run_dir)
    assert resumed.run_dir == result.run_dir


@pytest.mark.parametrize(
    ("trained", "native", "expected"),
    [("no", True, "no"), ("bf16", True, "bf16"), ("bf16", False, "no"), ("auto", True, "bf16"), (None, True, "no")],
)
def test_a_checkpoint_runs_on_a_cpu_in_the_precision_it_was_trained_in(monkeypatch, trained, expected, native):
    """evaluate reproduces training's validation numbers: an fp32 run is not run in bf16 because the CPU could."""
    from clothcli.backends import pytorch

    monkeypatch.setattr(pytorch, "cpu_supports_bf16", lambda: native)
    meta = {"config": {"train": {"mixed_precision": trained}}} if trained else {}
    assert pytorch.inference_precision(meta, "cpu") == expected
