import pytest

from clothcli.data.layout import index_dataset, index_folder
from clothcli.errors import UserError
from conftest import make_dataset, make_image


def test_counts_and_classes(tiny_dataset):
    index = index_dataset(tiny_dataset)
    assert index.classes == ["blue", "green", "red"]
    assert {k: len(v.samples) for k, v in index.splits.items()} == {"train": 24, "validation": 12, "test": 12}


def test_val_alias(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": 2, "val": 1})
    assert "validation" in index_dataset(root).splits


def test_hidden_non_image_and_uppercase(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": 2})
    make_image(root / "train" / "red" / "UPPER.JPG", (200, 0, 0))
    make_image(root / "train" / "red" / "nested" / "deep.Png", (200, 0, 0), fmt="PNG")
    (root / "train" / "red" / ".DS_Store").write_bytes(b"junk")
    (root / "train" / "red" / "notes.txt").write_text("hi")
    (root / "train" / ".hidden_class").mkdir()
    (root / "train" / "red" / ".cache").mkdir()
    (root / "train" / "stray.jpg").write_bytes(b"x")
    index = index_dataset(root)
    train = index.splits["train"]
    names = {p.name for p in train.paths}
    assert {"UPPER.JPG", "deep.Png"} <= names
    assert ".DS_Store" not in names and "notes.txt" not in names
    reasons = {s.path.name: s.reason for s in train.skipped}
    assert reasons[".DS_Store"] == "hidden file"
    assert reasons["notes.txt"] == "not an image extension"
    assert reasons["stray.jpg"] == "not inside a class folder"
    assert index.classes == ["blue", "green", "red"]


def test_missing_root_and_train(tmp_path):
    with pytest.raises(UserError, match="not found"):
        index_dataset(tmp_path / "missing")
    (tmp_path / "d" / "test" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="no train/"):
        index_dataset(tmp_path / "d")


def test_empty_class_is_an_error(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": 2})
    (root / "train" / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        index_dataset(root)


def test_extra_class_in_other_split_is_an_error(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": 2, "test": 1})
    make_image(root / "test" / "purple" / "a.jpg", (100, 0, 100))
    with pytest.raises(UserError, match="purple"):
        index_dataset(root)


def test_missing_class_and_empty_split_are_warnings(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": 2, "validation": 1})
    for f in (root / "validation" / "red").iterdir():
        f.unlink()
    (root / "test").mkdir()
    index = index_dataset(root)
    text = " ".join(index.warnings)
    assert "red" in text and "test" in text


def test_index_folder_unknown_class(tmp_path):
    make_image(tmp_path / "f" / "cat" / "a.jpg", (1, 2, 3))
    with pytest.raises(UserError, match="cat"):
        index_folder(tmp_path / "f", ["dog"])


def test_class_difference_names_what_differs():
    from clothcli.data.layout import class_difference

    assert class_difference(["a", "b", "c"], ["a", "c", "d"]) == "lacks b; adds d"
    assert class_difference(["a", "b"], ["b", "a"]) == "orders them b, a"
    assert class_difference(["a", "b"], ["a", "b"]) == ""
