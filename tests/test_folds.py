"""k-fold cross-validation: folds stratified and grouped by duplicates, `train --folds` with out-of-fold
predictions, `compare` of two fold groups by the corrected resampled t-test, and `sweep --folds`."""

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import t as student_t
from typer.testing import CliRunner

from clothcli.cli import app
from clothcli.data.folds import fold_numbers
from clothcli.engines.fold_comparison import corrected_resampled_t
from clothcli.errors import UserError
from conftest import TINY_OVERRIDES, make_dataset, make_image

pytest.importorskip("sklearn", reason="the data extra (pip install 'clothcli[data]') is not installed")
runner = CliRunner()


def _sets(*extra: str) -> list[str]:
    return [a for kv in [*TINY_OVERRIDES, *extra] for a in ("--set", kv)]


def test_folds_are_stratified_and_keep_duplicates_together(tmp_path):
    items = []
    for label, colour in (("red", (200, 30, 30)), ("green", (30, 180, 30))):
        for i in range(9):
            items.append((make_image(tmp_path / label / f"{i}.png", colour, seed=100 * len(items) + i), label))
    copy = tmp_path / "red" / "copy.png"
    shutil.copy(items[0][0], copy)  # an exact duplicate of red/0.png
    items.append((copy, "red"))
    numbers = fold_numbers(items, 3, seed=0)
    assert numbers[0] == numbers[-1]  # the copy sits in its original's fold
    for label in ("red", "green"):
        per_fold = np.bincount([n for (_, lab), n in zip(items, numbers) if lab == label], minlength=3)
        assert per_fold.min() >= 2  # every fold holds some of every class
    assert fold_numbers(items, 3, seed=0) == numbers and fold_numbers(items, 3, seed=1) != numbers
    with pytest.raises(UserError, match="need at least 12 images of every class"):
        fold_numbers(items, 12, seed=0)


def test_the_corrected_t_test_matches_its_formula():
    differences = [0.02, -0.01, 0.03, 0.01, 0.0]
    statistic, p = corrected_resampled_t(differences, n_train=800, n_test=200)
    d = np.array(differences)
    expected = d.mean() / math.sqrt((1 / 5 + 200 / 800) * d.var(ddof=1))
    assert statistic == pytest.approx(expected) and p == pytest.approx(2 * student_t.sf(abs(expected), 4))
    naive = d.mean() / math.sqrt(d.var(ddof=1) / 5)
    assert abs(statistic) < abs(naive)  # the correction widens the variance: fewer false "differences"
    assert corrected_resampled_t([0.0, 0.0], 10, 5) == (0.0, 1.0)


@pytest.fixture(scope="module")
def fold_groups(tmp_path_factory):
    root = tmp_path_factory.mktemp("folds")
    data = make_dataset(root / "data", {"train": 6, "validation": 3, "test": 2})
    groups = {}
    for name, lr in (("fast", "0.05"), ("slow", "0.001")):
        args = ["train", "--data", str(data), "--output-dir", str(root / "runs"), "--name", name, "--epochs", "2",
                "--folds", "3", *_sets(f"optim.lr={lr}")]  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        groups[name] = (root / "runs" / f"{name}-3fold", result.output, args)
    return data, groups


def test_train_folds_writes_out_of_fold_predictions_for_every_pooled_image(fold_groups):
    data, groups = fold_groups
    folder, output, args = groups["fast"]
    record = json.loads((folder / "folds.json").read_text())
    assert record["folds"] == 3 and record["model"] == "last" and len(record["results"]) == 3
    with open(folder / "oof.csv", newline="") as handle:
        oof = list(csv.DictReader(handle))
    pooled = sorted(
        str(p.relative_to(data)) for split in ("train", "validation") for p in (data / split).rglob("*.jpg")
    )
    assert sorted(r["path"] for r in oof) == pooled  # each pooled image exactly once
    assert {r["fold"] for r in oof} == {"0", "1", "2"}
    for result in record["results"]:
        rows = [r for r in oof if r["fold"] == str(result["fold"])]
        assert result["images"] == len(rows)
        assert result["accuracy"] == pytest.approx(np.mean([r["true"] == r["predicted"] for r in rows]))
        splits = (folder / f"fold-{result['fold']}" / "splits.csv").read_text()
        assert splits.count(",validation,") == len(rows)
    accuracies = [r["accuracy"] for r in record["results"]]
    assert record["mean_accuracy"] == pytest.approx(np.mean(accuracies))
    assert record["std_accuracy"] == pytest.approx(np.std(accuracies, ddof=1))
    assert "± " in output and (folder / "summary.md").is_file()
    again = runner.invoke(app, args)  # finished folds are kept, not trained again
    assert again.exit_code == 0 and again.output.count("finished before, kept") == 3


def test_a_killed_loader_worker_in_a_fold_is_one_line_and_the_same_command_continues(
    tmp_path, monkeypatch, forked_workers
):
    """The out-of-memory killer takes a DataLoader worker in the second fold: one line with the cause and how
    to go on, exit 1; the same command keeps the first fold and finishes the group."""
    import os
    import signal

    import torch

    from clothcli.data import loading

    data = make_dataset(tmp_path / "data", {"train": 6, "validation": 3, "test": 2})
    group = tmp_path / "runs" / "oom-2fold"
    read = loading.ImageFiles.__getitem__

    def killed_in_the_second_fold(self, key):
        if torch.utils.data.get_worker_info() is not None and (group / "fold-1").is_dir():
            os.kill(os.getpid(), signal.SIGKILL)
        return read(self, key)

    args = ["train", "--data", str(data), "--output-dir", str(tmp_path / "runs"), "--name", "oom", "--epochs", "1",
            "--folds", "2", *_sets("data.num_workers=1", "data.cache=none")]  # fmt: skip
    monkeypatch.setattr(loading.ImageFiles, "__getitem__", killed_in_the_second_fold)
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "DataLoader worker" in result.output and "out of memory" in result.output
    assert "the same command continues" in result.output and "Traceback" not in result.output
    monkeypatch.setattr(loading.ImageFiles, "__getitem__", read)
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("finished before, kept") == 1 and (group / "folds.json").is_file()


def test_compare_tests_two_fold_groups_fold_by_fold(fold_groups, tmp_path):
    _, groups = fold_groups
    fast, slow = groups["fast"][0], groups["slow"][0]
    out = tmp_path / "c.json"
    result = runner.invoke(app, ["compare", str(fast), str(slow), "-o", str(out)])
    assert result.exit_code == 0, result.output
    found = json.loads(out.read_text())
    pair = found["pairs"][0]
    a = json.loads((fast / "folds.json").read_text())["results"]
    b = json.loads((slow / "folds.json").read_text())["results"]
    differences = [x["accuracy"] - y["accuracy"] for x, y in zip(a, b)]
    assert pair["mean_difference"] == pytest.approx(np.mean(differences))
    assert "corrected resampled t-test" in result.output
    other = tmp_path / "other"
    shutil.copytree(slow, other)
    record = json.loads((other / "folds.json").read_text())
    record["digest"] = "0" * 16
    (other / "folds.json").write_text(json.dumps(record))
    refused = runner.invoke(app, ["compare", str(fast), str(other)])
    assert refused.exit_code == 2 and "held out different images" in refused.output
    assert runner.invoke(app, ["compare", str(fast / "fold-0")]).exit_code == 2  # a run needs --data


def test_sweep_over_folds(fold_groups, tmp_path):
    pytest.importorskip("optuna", reason="the sweep extra is not installed")
    data, _ = fold_groups
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {log: [0.01, 0.1]}\n")
    args = ["sweep", "--space", str(space), "--trials", "2", "--folds", "2", "--data", str(data), "--epochs", "1",
            "--output-dir", str(tmp_path / "runs"), "--name", "f", "--json", str(tmp_path / "s.json"),
            *_sets()]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["monitor"] == "fold_accuracy" and len(report["trials"]) == 2
    for trial in report["trials"]:
        assert trial["run"].endswith("-2fold") and (tmp_path / "runs" / "f-sweep" / "trials").is_dir()
        record = json.loads((Path(trial["run"]) / "folds.json").read_text())
        assert trial["value"] == pytest.approx(record["mean_accuracy"])
    both = runner.invoke(app, [*args, "--seeds", "2"])
    assert both.exit_code == 2 and "--folds or --seeds" in both.output
