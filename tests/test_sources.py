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


def test_a_parquet_label_file_with_paths(tmp_path):
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
    (data / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="not a readable Parquet file"):
        open_dataset(data / "broken.parquet")


def hugging_face_parquet(path: Path, photos: Path, extra_rows: list[tuple[bytes | None, int]]) -> list[Path]:
    """A Parquet file laid out as Hugging Face `datasets` exports one: an Image column (a struct of bytes
    and the original file name) and a ClassLabel column (integers, their names in the schema metadata)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    names = sorted(COLORS)
    files = sorted(photos.rglob("*.jpg"))
    images = [{"bytes": f.read_bytes(), "path": f.name} for f in files] + [
        {"bytes": data, "path": "extra.jpg"} for data, _ in extra_rows
    ]
    labels = [names.index(f.parent.name) for f in files] + [label for _, label in extra_rows]
    features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
    table = pa.table({"image": images, "label": labels})
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(table, path, row_group_size=16)
    return files


def test_a_parquet_file_with_its_images_inside_is_a_dataset_for_every_command(tmp_path):
    pytest.importorskip("pyarrow")
    photos = unsplit(tmp_path / "photos")
    data = tmp_path / "hf" / "train.parquet"
    data.parent.mkdir()
    files = hugging_face_parquet(data, photos, [(None, 0), (b"not an image", 1), (b"x", 7)])
    source = open_dataset(data)
    assert source.index.classes == sorted(COLORS)
    assert [line.split(": ", 1)[0] for line in source.bad_rows] == ["row 61", "row 63"]
    assert "no image bytes" in source.bad_rows[0] and "class number 7 is not one of 3" in source.bad_rows[1]
    ids = {str(p) for split in source.index.splits.values() for p in split.paths}
    assert str(data) + "#1" in ids and len(ids) == 61  # 60 photos and the undecodable row
    # the split groups a photo stored twice, as it groups files
    twice = tmp_path / "twice" / "train.parquet"
    twice.parent.mkdir()
    hugging_face_parquet(twice, photos, [(files[0].read_bytes(), sorted(COLORS).index(files[0].parent.name))])
    plan = open_dataset(twice).plan
    assert len({a.split for a in plan.assignments if str(a.path).endswith(("#1", "#61"))}) == 1
    assert plan.groups_kept_together == 1

    run = train(tiny_cfg(data, tmp_path / "runs")).run_dir
    split = read_split(run / "splits.csv")
    assert "train.parquet#1" in split and len(split) == 61
    tested = [k for k, v in split.items() if v == "test"]
    errors = tmp_path / "errors.csv"
    result = runner.invoke(app, ["evaluate", str(run), str(data), "--split", "test", "--errors", str(errors)])
    assert result.exit_code == 0, result.output
    with open(errors, newline="") as fh:
        assert all(Path(row["path"]).name in tested for row in csv.DictReader(fh))
    predictions = tmp_path / "predictions.csv"
    result = runner.invoke(app, ["predict", str(run), "--from-list", str(data), "-o", str(predictions)])
    assert result.exit_code == 0, result.output
    with open(predictions, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 63 and rows[0]["path"].endswith("train.parquet#1") and rows[0]["label"] in COLORS
    assert rows[60]["error"] == "no image bytes in this row" and "not an image" in rows[61]["error"]
    refused = runner.invoke(app, ["predict", str(run), "--from-list", str(data), "--copy-to", str(tmp_path / "s")])
    assert refused.exit_code == 2 and "inside a Parquet file" in refused.output
    compared = runner.invoke(app, ["compare", str(run), str(run), "--data", str(data), "--no-latency"])
    assert compared.exit_code == 0, compared.output
    report = tmp_path / "report.html"
    result = runner.invoke(app, ["report", str(run), str(data), "-o", str(report)])
    assert result.exit_code == 0 and "audit" in result.output, result.output
    assert "data:image/jpeg;base64," in report.read_text()
    # a label file naming stored images by id: rows past the file's end are bad rows
    listed = data.parent / "listed.csv"
    listed.write_text("path,label\ntrain.parquet#2,red\ntrain.parquet#999,red\nother.parquet#1,red\n")
    source = open_dataset(listed, DataConfig(split=SplitConfig(validation=0, test=0)))
    assert len(source.index.splits["train"].samples) == 1
    assert "the file has 63 rows" in source.bad_rows[0] and "no such regular file" in source.bad_rows[1]


def test_the_image_column_is_named_when_a_file_has_several(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    photos = unsplit(tmp_path / "photos", per_class=MIN_GROUPS)
    files = sorted(photos.rglob("*.jpg"))
    table = pa.table({
        "photo": [f.read_bytes() for f in files],
        "mask": [b"" for _ in files],
        "label": [f.parent.name for f in files],
    })  # fmt: skip
    pq.write_table(table, tmp_path / "two.parquet")
    with pytest.raises(UserError, match="several image columns"):
        open_dataset(tmp_path / "two.parquet")
    with pytest.raises(UserError, match="'label' holds no images; image columns: photo, mask"):
        open_dataset(tmp_path / "two.parquet", DataConfig(image_column="label"))
    source = open_dataset(tmp_path / "two.parquet", DataConfig(image_column="photo"))
    assert sum(len(s.samples) for s in source.index.splits.values()) == len(files) and not source.bad_rows
