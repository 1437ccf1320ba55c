"""The benchmarks run in a tiny mode in CI: they must produce their table, not a speed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_throughput.py", "predict_throughput.py", "predict_formats.py"])
def test_benchmark_tiny_mode(script, tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "images/s" in proc.stdout and out.is_file()
    if script == "train_throughput.py":
        splits = [r["time_split_seconds"] for r in json.loads(out.read_text())["results"] if "time_split_seconds" in r]
        # validation of the tiny data can take under the 10 ms that metrics.csv resolves, so it may read 0
        assert splits and all(s["train"] > 0 and s["validation"] >= 0 and s["other"] >= 0 for s in splits)
    elif script == "predict_formats.py":  # every format's command, against ONNX Runtime and decoding alone
        rows = {row["model"]: row for row in json.loads(out.read_text())["rows"]}
        assert set(rows) == {"ONNX Runtime fp32", "OpenVINO f32", "OpenVINO bf16", "OpenVINO int8", "decoding only"}
        assert rows["ONNX Runtime fp32"]["vs_onnx_fp32"] == 1.0 and rows["decoding only"]["vs_decoding"] == 1.0
        assert rows["OpenVINO f32"]["agreement_with_onnx_fp32"] == 1.0
        assert all(row["images_per_s"] > 0 for row in rows.values())
    else:  # the exported model ran through the same command, fp32 and int8
        result = json.loads(out.read_text())
        assert set(result["onnx_top1_agreement"]) == {"fp32", "int8"}
        assert set(result["one_image_seconds"]) == {"pytorch", "onnx fp32", "onnx int8"}


def _load_train_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "benchmarks" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_rounds_alternate_order_and_ratios_are_taken_within_a_round():
    bench = _load_train_benchmark()
    calls = []
    speeds = {"plain": [10.0, 20.0, 30.0], "fast": [15.0, 20.0, 60.0]}

    def pipeline(name):
        calls.append(name)
        return {"pipeline": name, "images_per_s": speeds[name][calls.count(name) - 1]}

    rounds = bench.run_rounds([(pipeline, ("plain",)), (pipeline, ("fast",))], 3, runner=lambda fn, *args: fn(*args))
    assert calls == ["plain", "fast", "fast", "plain", "plain", "fast"]
    plain, fast = bench.combine_rounds(rounds)
    assert fast["round_ratios"] == [1.5, 1.0, 2.0]
    assert fast["ratio"] == 1.5 and plain["ratio"] == 1.0
    assert fast["images_per_s"] == 20.0 and plain["images_per_s"] == 20.0


@pytest.mark.parametrize("script", ["duplicate_search.py", "analyze_at_scale.py"])
def test_scale_benchmarks_tiny_mode(script, tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    if script == "duplicate_search.py":  # the index finds what comparing every pair finds
        assert all(row["same_groups_as_all_pairs"] and row["groups"] > 0 for row in result["results"])
    else:  # one in a hundred images is a re-encoded copy
        assert result["images"] == 600 and result["duplicate_groups"] >= 5


def test_train_step_profile_tiny_mode(tmp_path):
    """The step is timed phase by phase through clothcli's own training_step, and the optimizer's ways
    are compared against the one-tensor-at-a-time way."""
    out = tmp_path / "p.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_step_profile.py"), "--tiny", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    phases = result["phases_ms"]
    assert {"data wait", "forward + loss", "backward", "optimizer step", "EMA update"} <= set(phases)
    assert all(ms >= 0 for ms in phases.values()) and sum(phases.values()) <= result["step_ms"] * 1.05
    assert 0.5 < sum(op["share"] for op in result["top_operators"]) <= 1.0001
    ways = {row["way"]: row for row in result["optimizer"]}
    assert ways["one tensor at a time"]["bit_identical_to_first"] is None
    others = [ways[w] for w in ("foreach", "fused") if "error" not in ways[w]]
    assert others and all(isinstance(row["bit_identical_to_first"], bool) for row in others)


def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_train_vs_timm_runs_the_seeds_over_in_alternating_order():
    bench = _load_script("train_vs_timm")
    order = bench.schedule([42, 43], 2, ["timm", "clothcli"])
    assert order == [
        (42, "timm"), (42, "clothcli"), (43, "clothcli"), (43, "timm"),
        (42, "timm"), (42, "clothcli"), (43, "clothcli"), (43, "timm"),
    ]  # fmt: skip
    assert bench.schedule([42], 3, ["a", "b"]) == [(42, "a"), (42, "b"), (42, "b"), (42, "a"), (42, "a"), (42, "b")]


def test_train_vs_timm_maps_the_recipe_to_timm_flags(tmp_path):
    from clothcli.config import load_config

    bench = _load_script("train_vs_timm")
    cfg = load_config(ROOT / "conf" / "mobilenet-cpu.yaml")
    flags = bench.timm_flags(cfg, tmp_path / "data", tmp_path / "w.safetensors", 10, 7, tmp_path / "out")

    def value(flag):
        return flags[flags.index(flag) + 1]

    assert value("--model") == cfg.model.name and value("--opt") == cfg.optim.name == "sgd"
    assert float(value("--lr")) == cfg.optim.lr and float(value("--momentum")) == cfg.optim.momentum
    assert int(value("--epochs")) == cfg.train.epochs and int(value("-b")) == cfg.train.batch_size
    assert float(value("--smoothing")) == cfg.train.label_smoothing and value("--seed") == "7"
    assert [float(s) for s in flags[flags.index("--scale") + 1 : flags.index("--scale") + 3]] == list(cfg.augment.scale)
    assert "--channels-last" in flags and "--sched-on-updates" in flags
    assert ("--model-ema" in flags) == cfg.train.ema.enabled
    assert float(value("--clip-grad")) == cfg.train.clip_grad


@pytest.mark.parametrize("bad", [["--rounds", "0"], ["--timm-precisions", "fp16"]])
def test_train_vs_timm_refuses_bad_options_as_usage_errors(tmp_path, bad):
    args = ["--timm-train", str(tmp_path / "train.py"), "--config", str(ROOT / "conf" / "mobilenet-cpu.yaml")]
    args += ["--data", str(tmp_path), "--weights", str(tmp_path / "w"), *bad]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_vs_timm.py"), *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "error:" in proc.stderr
