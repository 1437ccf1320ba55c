"""Datasets that do not come as split folders: unsplit class folders, label files, a run's splits.csv."""

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clothcli.cli import app
from clothcli.config import DataConfig, SplitConfig, load_config
from clothcli.data.sources import open_dataset
from clothcli.data.splits import MIN_GROUPS, plan_splits
from clothcli.engines.evaluate import evaluate
from clothcli.errors import UserError
from clothcli.training import train
from conftest import COLORS, TINY_OVERRIDES

runner = CliRunner()
TINY_OPTIONS = [word for override in TINY_OVERRIDES for word in ("--set", override)]


def photo(path: Path, color: tuple[int, int, int], seed: int, size=(64, 48)) -> Path:
    """A smooth random pattern tinted by `color`: its difference hash survives resizing and re-encoding,
    as a real photo's does, and differs from every other seed's."""
    rng = np.random.default_rng(seed)
    pattern = Image.fromarray((rng.random((6, 8)) * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    tint = np.asarray(color, dtype=np.float32) / 255
    pixels = (np.asarray(pattern, dtype=np.float32)[..., None] * (0.5 + tint)).clip(0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def unsplit(root: Path, per_class: int = 20, classes=tuple(COLORS), first_seed: int = 0) -> Path:
    seed = first_seed
    for name in classes:
        for i in range(per_class):
            seed += 1
            photo(root / name / f"{name}_{i}.jpg", COLORS.get(name, (120, 120, 120)), seed)
    return root


def plant_copies(root: Path, count: int = 6) -> list[tuple[Path, Path]]:
    """Resized, re-encoded copies of the first images of each class, beside them."""
    pairs = []
    for name in COLORS:
        for i in range(count // len(COLORS)):
            original = root / name / f"{name}_{i}.jpg"
            copy = root / name / f"copy_{i}.png"
            Image.open(original).resize((96, 72)).save(copy)
            pairs.append((original, copy))
    return pairs


def tiny_cfg(data: Path, out: Path, *extra: str):
    return load_config(None, [*TINY_OVERRIDES, "train.epochs=1", f"data.root={data}", f"output_dir={out}", *extra])


def read_split(path: Path) -> dict[str, str]:
    with open(path, newline="") as fh:
        return {row["path"]: row["split"] for row in csv.DictReader(fh)}


def test_an_unsplit_folder_is_split_with_every_duplicate_group_in_one_split(tmp_path):
    data = unsplit(tmp_path / "photos")
    pairs = plant_copies(data)
    run = train(tiny_cfg(data, tmp_path / "runs")).run_dir
    split = read_split(run / "splits.csv")
    assert len(split) == 66 and set(split.values()) == {"train", "validation", "test"}
    for original, copy in pairs:
        key = lambda p: str(p.relative_to(data))  # noqa: E731
        assert split[key(original)] == split[key(copy)]
    with open(run / "splits.csv", newline="") as fh:
        groups = [row["group"] for row in csv.DictReader(fh)]
    assert len(groups) - len(set(groups)) == len(pairs)  # each copy shares its original's group
    # the test set is the run's: evaluate on the same folder sees those images only
    report = evaluate(model=run, data=data, split="test", workers=0)
    assert report.n == sum(s == "test" for s in split.values())
    # a training seed never moves the test set
    other = train(tiny_cfg(data, tmp_path / "runs", "train.seed=7", "name=seed7")).run_dir
    assert read_split(other / "splits.csv") == split


def test_adding_images_never_moves_the_ones_assigned(tmp_path):
    data = unsplit(tmp_path / "photos")
    before = {str(a.path): a.split for a in open_dataset(data).plan.assignments}
    for i in range(20, 30):
        photo(data / "red" / f"red_{i}.jpg", COLORS["red"], 1000 + i)
    after = {str(a.path): a.split for a in open_dataset(data).plan.assignments}
    assert len(after) == len(before) + 10 and all(after[p] == s for p, s in before.items())


def test_small_classes_stay_in_train_and_conflicts_are_left_out(tmp_path):
    data = unsplit(tmp_path / "photos", per_class=MIN_GROUPS + 5, classes=("red", "green"))
    unsplit(tmp_path / "small", per_class=3, classes=("blue",), first_seed=500)
    shutil.copytree(tmp_path / "small" / "blue", data / "blue")
    shutil.copy(data / "red" / "red_0.jpg", data / "green" / "also_red.jpg")  # one photo, two labels
    source = open_dataset(data)
    assert source.plan.small_classes == ["blue"]
    assert all(a.split == "train" for a in source.plan.assignments if a.label == "blue")
    assert len(source.plan.left_out) == 1 and source.plan.left_out[0]["labels"] == ["green", "red"]
    assert not any(a.path.name in ("red_0.jpg", "also_red.jpg") for a in source.plan.assignments)
    kept = plan_splits([(p, "x") for p in [data / "red" / "red_0.jpg", data / "green" / "also_red.jpg"]],
                       SplitConfig(keep_conflicts=True))  # fmt: skip
    assert len(kept.assignments) == 2


def test_a_label_file_reports_each_bad_row_and_trains_on_the_rest(tmp_path):
    data = unsplit(tmp_path / "photos")
    (tmp_path / "photos" / "notes.txt").write_text("x")
    os.mkfifo(tmp_path / "photos" / "pipe.jpg")
    rows = [["path", "label"]]
    rows += [[str(p.relative_to(data)), p.parent.name] for p in sorted(data.rglob("*.jpg")) if p.is_file()]
    bad = {
        "missing.jpg": "red",  # no such file
        "red/red_1.jpg": "",  # empty label (and a duplicate path)
        "../outside.jpg": "red",  # climbs out of the folder
        "notes.txt": "red",  # not an image
        "pipe.jpg": "red",  # not a regular file
        "green/green_3.jpg": "blue",  # listed again with another label
        "green/green_4.jpg": "un\x1bknown",  # a control character
    }
    rows += [[path, label] for path, label in bad.items()]
    labels = data / "labels.csv"
    with open(labels, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    source = open_dataset(labels)
    assert len(source.bad_rows) == len(bad)
    numbers = [int(line.split()[1].rstrip(":")) for line in source.bad_rows]
    assert numbers == list(range(len(rows) - len(bad) + 1, len(rows) + 1))
    total = sum(len(s.samples) for s in source.index.splits.values())
    assert total == 60 - 1  # green_3 had two labels: left out
    result = runner.invoke(app, ["train", "--data", str(labels), *TINY_OPTIONS,
                                 "--epochs", "1", "--output-dir", str(tmp_path / "runs")])  # fmt: skip
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "row 62" in text and "listed again with another label" in text
    with pytest.raises(UserError, match="no usable rows"):
        bad_only = tmp_path / "bad.csv"
        bad_only.write_text("path,label\nmissing.jpg,red\n")
        open_dataset(bad_only)


def test_a_split_file_freezes_the_split_and_compare_refuses_runs_split_apart(tmp_path):
    data = unsplit(tmp_path / "photos")
    frozen = data / "splits.csv"
    result = runner.invoke(app, ["analyze-data", str(data), "--write-splits", str(frozen)])
    assert result.exit_code == 0, result.output
    run = train(tiny_cfg(frozen, tmp_path / "runs", "name=frozen")).run_dir
    assert read_split(run / "splits.csv") == read_split(frozen)
    other = train(tiny_cfg(data, tmp_path / "runs", "data.split.seed=5", "name=other")).run_dir
    assert read_split(other / "splits.csv") != read_split(frozen)
    first = train(tiny_cfg(data, tmp_path / "runs", "name=first")).run_dir
    refused = runner.invoke(app, ["compare", str(first), str(other), "--data", str(data), "--no-latency"])
    assert refused.exit_code == 2 and "different images" in refused.output
    outside = runner.invoke(app, ["analyze-data", str(data), "--write-splits", str(data / "red" / "s.csv")])
    assert outside.exit_code == 2 and "outside its folder" in " ".join(outside.output.split())


def test_validation_is_carved_out_of_a_train_only_dataset_when_asked(tmp_path):
    data = unsplit(tmp_path / "folders" / "train")
    no_validation = runner.invoke(app, ["train", "--data", str(tmp_path / "folders"),
                                        *TINY_OPTIONS, "--epochs", "1",
                                        "--output-dir", str(tmp_path / "runs")])  # fmt: skip
    text = " ".join(no_validation.output.split())
    assert (
        no_validation.exit_code == 0 and "no validation images" in text and "best/" not in text.split("run folder")[-1]
    )
    carved = open_dataset(tmp_path / "folders", DataConfig(split=SplitConfig(carve_validation=True)))
    assert set(carved.index.splits) == {"train", "validation"} and len(carved.index.splits["validation"].samples) > 0
    assert data.is_dir()


def test_a_parquet_label_file_and_one_with_images_inside(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    data = unsplit(tmp_path / "photos")
    files = sorted(data.rglob("*.jpg"))
    table = pa.table({
        "file": [str(p.relative_to(data)) for p in files],
        "category": [p.parent.name for p in files],
        "fold": ["test" if i % 5 == 0 else "train" for i in range(len(files))],
    })  # fmt: skip
    pq.write_table(table, data / "labels.parquet")
    cfg = DataConfig(path_column="file", label_column="category", split_column="fold")
    source = open_dataset(data / "labels.parquet", cfg)
    assert len(source.index.splits["test"].samples) == 12 and source.plan is None  # the file's own split
    inside = pa.table({"image": [p.read_bytes() for p in files[:3]], "label": ["red"] * 3})
    pq.write_table(inside, data / "inside.parquet")
    with pytest.raises(UserError, match="stored inside the file"):
        open_dataset(data / "inside.parquet")
    (data / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        open_dataset(data / "broken.parquet")
