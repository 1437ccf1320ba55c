"""`clothcli compare`: the statistics, the cache, and the command on tiny runs."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from clothcli.cli import app
from clothcli.config import load_config
from clothcli.engines.compare import cache_folder, compare_models
from clothcli.engines.comparison import mcnemar_exact, pareto_front, wilson_interval
from clothcli.training import train
from conftest import TINY_OVERRIDES, make_dataset, make_image

runner = CliRunner()


def tiny_run(data, out, name, epochs=2, seed=0, *extra):
    cfg = load_config(
        None,
        [*TINY_OVERRIDES, f"train.epochs={epochs}", "optim.lr=0.05", f"train.seed={seed}", f"data.root={data}",
         f"output_dir={out}", f"name={name}", *extra],
    )  # fmt: skip
    return train(cfg).run_dir


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    data = make_dataset(root / "data", {"train": 8, "validation": 2, "test": 4})
    return data, tiny_run(data, root / "runs", "a", seed=0), tiny_run(data, root / "runs", "b", epochs=3, seed=1)


def test_mcnemar_exact_worked_example():
    # 12 discordant images, 10 against 2: p = 2 * (C(12,0) + C(12,1) + C(12,2)) / 2**12 = 158 / 4096
    assert mcnemar_exact(10, 2) == pytest.approx(158 / 4096)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)  # 6 to 0: the smallest p with 6 discordant images


def test_wilson_interval_known_values():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(10, 10)
    assert low == pytest.approx(0.7225, abs=1e-4) and high == pytest.approx(1.0)
    low, high = wilson_interval(336, 372)
    assert low < 336 / 372 < high and high - low == pytest.approx(0.0598, abs=1e-3)


def test_pareto_front():
    # (cost, accuracy): the second is dominated by the first (dearer and worse); equal points both stay
    assert pareto_front([(1, 0.9), (2, 0.8), (3, 0.95), (3, 0.95)]) == [True, False, True, True]


def test_compare_times_caches_and_writes(two_runs, tmp_path):
    data, a, b = two_runs
    first = compare_models(models=[a, b], data=data, split="test", threads=1)
    assert [r.name for r in first.rows] == ["a", "b"] and not any(r.cached for r in first.rows)
    for row in first.rows:
        assert row.n == 12 and 0 <= row.correct <= 12 and row.ci_low <= row.accuracy <= row.ci_high
        assert row.ms_batch1 > 0 and row.ms_batch64 > 0 and row.macs > 0 and row.params > 0
        assert row.receptive_field and row.epochs in (2, 3) and row.train_seconds > 0 and "sgd" in row.recipe
    assert len(first.pairs) == 1 and 0.0 <= first.pairs[0].p_value <= 1.0
    # one network (architecture, input size) is timed once: its copies cannot differ by timing noise
    assert (first.rows[0].ms_batch1, first.rows[0].ms_batch64) == (first.rows[1].ms_batch1, first.rows[1].ms_batch64)
    assert first.chosen in ("a", "b") and first.verdict.startswith(first.chosen)
    again = compare_models(models=[a, b], data=data, split="test", latency=False)
    assert all(r.cached for r in again.rows)
    assert [(r.correct, r.n) for r in again.rows] == [(r.correct, r.n) for r in first.rows]
    assert compare_models(models=[a], data=data, split="test", latency=False, use_cache=False).rows[0].cached is False
    result = runner.invoke(
        app,
        ["compare", str(a), str(b), "--data", str(data), "--no-latency", "-o", str(tmp_path / "t.md"),
         "--plot", str(tmp_path / "p.png")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Verdict" in result.output and "McNemar" in (tmp_path / "t.md").read_text()
    assert (tmp_path / "p.png").stat().st_size > 0
    for kind in ("json", "csv"):
        out = tmp_path / f"t.{kind}"
        assert (
            runner.invoke(app, ["compare", str(a), "--data", str(data), "--no-latency", "-o", str(out)]).exit_code == 0
        )
    assert json.loads((tmp_path / "t.json").read_text())["rows"][0]["name"] == "a"


def test_cache_follows_the_data_and_the_checkpoint(two_runs, tmp_path):
    data, a, _ = two_runs
    copy_data, copy_run = tmp_path / "data", tmp_path / "a"
    shutil.copytree(data, copy_data)
    shutil.copytree(a, copy_run)
    shutil.rmtree(cache_folder(), ignore_errors=True)  # the evaluations of `a` on the same images would be hits
    assert compare_models(models=[copy_run], data=copy_data, latency=False).rows[0].cached is False
    assert compare_models(models=[copy_run], data=copy_data, latency=False).rows[0].cached is True
    make_image(copy_data / "test" / "red" / "new.jpg", (200, 30, 30), seed=99)
    changed_data = compare_models(models=[copy_run], data=copy_data, latency=False).rows[0]
    assert changed_data.cached is False and changed_data.n == 13
    weights = copy_run / "best" / "model.safetensors"
    state = load_file(str(weights))
    save_file({k: v * 1.01 if v.is_floating_point() else v for k, v in state.items()}, str(weights))
    assert compare_models(models=[copy_run], data=copy_data, latency=False).rows[0].cached is False
    assert compare_models(models=[copy_run], data=copy_data, latency=False).rows[0].cached is True
    # the cache is the user's (here the tests' private XDG_CACHE_HOME), never beside the model
    assert any(cache_folder().iterdir()) and not any(p.name == "compare-cache" for p in copy_run.rglob("*"))


def test_reference_rows_are_shown_apart(two_runs, tmp_path):
    data, a, _ = two_runs
    refs = tmp_path / "refs.yaml"
    refs.write_text("- {name: earlier, arch: resnet50, accuracy: 0.8844, macro_f1: 0.8573, macs: 4.1e9, source: x}\n")
    result = compare_models(models=[a], data=data, latency=False, references=refs)
    assert [r.reference for r in result.rows] == [False, True]
    assert result.rows[1].macs == 4.1e9 and result.pairs == [] and result.chosen == "a"
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {name: x}\n")
    out = runner.invoke(app, ["compare", str(a), "--data", str(data), "--no-latency", "--reference", str(bad)])
    assert out.exit_code == 2 and "needs at least name and accuracy" in out.output


def test_mismatched_classes_and_bad_options_exit_2(two_runs, tmp_path):
    data, a, _ = two_runs
    other_data = make_dataset(
        tmp_path / "other", {"train": 4, "validation": 1, "test": 1}, classes=("red", "green", "cyan")
    )
    other = tiny_run(other_data, tmp_path / "runs", "other", epochs=1)
    cases = {
        "other classes": ["compare", str(a), str(other), "--data", str(data), "--no-latency"],
        "must end in .md": ["compare", str(a), "--data", str(data), "-o", str(tmp_path / "t.txt")],
        "output folder not found": ["compare", str(a), "--data", str(data), "--plot", str(tmp_path / "no" / "p.png")],
        "checkpoint not found": ["compare", str(tmp_path / "missing"), "--data", str(data)],
    }
    for expected, args in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and expected in result.output, (args, result.output)
    assert "lacks blue" in runner.invoke(app, cases["other classes"]).output


def test_each_network_is_timed_once(two_runs, tmp_path, monkeypatch):
    """a and b are one network; c is the same architecture at another input size, so another network."""
    data, a, b = two_runs
    c = tiny_run(data, tmp_path, "c", 1, 0, "preprocess.input_size=40")
    timed = []

    def fake_latency(classifier, size, batch):
        timed.append((size, batch))
        return float(len(timed))

    monkeypatch.setattr("clothcli.engines.compare.latency_ms", fake_latency)
    rows = compare_models(models=[a, b, c], data=data, split="test", use_cache=False).rows
    assert [size[-1] for size, _ in timed] == [32, 32, 40, 40]
    assert [(r.ms_batch1, r.ms_batch64) for r in rows] == [(1.0, 2.0), (1.0, 2.0), (3.0, 4.0)]
