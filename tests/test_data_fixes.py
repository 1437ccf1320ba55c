"""analyze-data --label-issues (cleanlab on out-of-sample probabilities) and --fix-split."""

import json
import os
import shutil

import pytest
import timm
from safetensors.torch import save_file
from typer.testing import CliRunner

from clothcli.cli import app
from clothcli.data.audit import audit_dataset
from clothcli.data.fix_split import fix_split
from conftest import COLORS, make_dataset, make_image

runner = CliRunner()


@pytest.fixture
def backbone(tmp_path):
    """A tiny timm model with random weights: colours of solid images still separate in its features."""
    path = tmp_path / "tiny.safetensors"
    model = timm.create_model("test_efficientnet", num_classes=1000)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_flipped_labels_are_found(tmp_path, backbone):
    from clothcli.engines.label_issues import find_label_issues

    root = make_dataset(tmp_path / "data", {"train": 20, "validation": 5, "test": 5})
    flipped = []
    for i, (cls, wrong) in enumerate([("red", "green"), ("green", "blue"), ("blue", "red")]):
        source = root / "train" / cls / f"{cls}_{i}.jpg"
        target = root / "train" / wrong / f"flipped_{i}.jpg"
        shutil.move(source, target)
        flipped.append(str(target))
    found = find_label_issues(root, model_name="test_efficientnet", weights=backbone, workers=0)
    top = [issue["path"] for issue in found.issues[: len(flipped)]]
    assert set(top) == set(flipped)
    suggested = {issue["path"]: issue["suggested"] for issue in found.issues}
    assert [suggested[p] for p in flipped] == ["red", "green", "blue"]
    assert found.images == 3 * 30 and found.out_of_sample_accuracy > 0.9


def test_cli_label_issues_writes_csv_json_and_contact_sheet(tmp_path, backbone):
    root = make_dataset(tmp_path / "data", {"train": 10, "validation": 5})
    shutil.move(root / "train" / "red" / "red_0.jpg", root / "train" / "blue" / "odd.jpg")
    args = ["analyze-data", str(root), "--label-issues", "--model", "test_efficientnet", "--weights", str(backbone)]
    sheet = tmp_path / "sheet.png"
    result = runner.invoke(app, [*args, "--issues", str(tmp_path / "i.csv"), "--contact-sheet", str(sheet)])
    assert result.exit_code == 0, result.output
    assert "Suspected label errors" in result.output and sheet.read_bytes()[:4] == b"\x89PNG"
    rows = (tmp_path / "i.csv").read_text().splitlines()
    assert rows[0] == "path,split,given,suggested,quality" and rows[1].startswith(
        str(root / "train" / "blue" / "odd.jpg")
    )
    result = runner.invoke(app, [*args, "--issues", str(tmp_path / "i.json")])
    assert json.loads((tmp_path / "i.json").read_text())["issues"][0]["suggested"] == "red"
    bad = runner.invoke(app, ["analyze-data", str(root), "--label-issues"])
    assert bad.exit_code == 2 and "needs a backbone" in bad.output


def test_missing_data_extra_is_one_line(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_cleanlab(name, *args, **kwargs):
        if name.startswith("cleanlab"):
            raise ImportError("No module named 'cleanlab'", name="cleanlab")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_cleanlab)
    root = make_dataset(tmp_path / "data", {"train": 2})
    result = runner.invoke(app, ["analyze-data", str(root), "--label-issues", "--model", "x", "--weights", "y"])
    assert result.exit_code == 2 and "pip install 'clothcli[data]'" in result.output
    assert "Images per class" not in result.output  # checked before any image is read


def test_fix_split_puts_every_duplicate_group_in_one_split(tmp_path):
    root = make_dataset(tmp_path / "data", {"train": 3, "validation": 2, "test": 2})
    shutil.copy(root / "train" / "red" / "red_0.jpg", root / "test" / "red" / "leak.jpg")  # train wins
    # a tie between validation and test: validation (train > validation > test); the name is taken there
    shutil.copy(root / "test" / "green" / "green_0.jpg", root / "validation" / "green" / "leak.jpg")
    shutil.copy(root / "test" / "blue" / "blue_0.jpg", root / "validation" / "blue" / "v1.jpg")
    shutil.copy(root / "test" / "blue" / "blue_0.jpg", root / "validation" / "blue" / "v2.jpg")  # validation wins
    shutil.copy(root / "train" / "red" / "red_1.jpg", root / "test" / "green" / "conflict.jpg")  # labels disagree
    before = audit_dataset(root)
    assert sum(g["cross_split"] for g in before.duplicates) == 4
    out = tmp_path / "fixed"
    result = fix_split(root, out)
    after = audit_dataset(out)
    assert not any(g["cross_split"] for g in after.duplicates)
    assert not any(g["conflicting_labels"] for g in after.duplicates)
    assert (out / "train" / "red" / "red_0.jpg").exists() and not (out / "test" / "red" / "leak.jpg").exists()
    assert (out / "train" / "red" / "leak.jpg").exists()
    assert (out / "validation" / "green" / "leak.jpg").exists() and not (
        out / "test" / "green" / "green_0.jpg"
    ).exists()
    assert (out / "validation" / "green" / "green_0-test.jpg").exists()  # validation's own green_0.jpg is another image
    assert (out / "validation" / "blue" / "blue_0.jpg").exists() and not (out / "test" / "blue" / "blue_0.jpg").exists()
    left = {os.path.basename(item["source"]) for item in result.left_out}
    assert left == {"red_1.jpg", "conflict.jpg"}
    assert sum(1 for _ in out.rglob("*.jpg")) == sum(1 for _ in root.rglob("*.jpg")) - 2
    assert result.hard_links == result.files  # same file system: every file is a link
    assert (out / "train" / "red" / "red_2.jpg").stat().st_ino == (root / "train" / "red" / "red_2.jpg").stat().st_ino
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["files"]) == sum(1 for _ in root.rglob("*.jpg"))
    assert sorted(audit_dataset(root).to_dict()["splits"]) == sorted(before.to_dict()["splits"])  # source unchanged
    kept = fix_split(root, tmp_path / "kept", keep_conflicts=True)
    assert not kept.left_out and not any(g["cross_split"] for g in audit_dataset(tmp_path / "kept").duplicates)


def test_fix_split_bad_output_is_one_line(tmp_path):
    root = make_dataset(tmp_path / "data", {"train": 2})
    (tmp_path / "full").mkdir()
    make_image(tmp_path / "full" / "x.jpg", COLORS["red"])
    for out in (tmp_path / "full", root / "inside"):
        result = runner.invoke(app, ["analyze-data", str(root), "--fix-split", str(out)])
        assert result.exit_code == 2 and "Traceback" not in result.output


def test_label_issues_in_a_label_file(tmp_path, backbone):
    """The rows of a CSV are checked as folders are: a row given the wrong label comes first."""
    root = make_dataset(tmp_path / "data", {"train": 12, "validation": 4})
    rows = ["path,label,split"]
    for path in sorted(root.rglob("*.jpg")):
        label = "blue" if path.name == "red_0.jpg" and path.parent.parent.name == "train" else path.parent.name
        rows.append(f"{path.relative_to(root)},{label},{path.parent.parent.name}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    args = ["analyze-data", str(root / "labels.csv"), "--label-issues", "--model", "test_efficientnet"]
    result = runner.invoke(app, [*args, "--weights", str(backbone), "--issues", str(tmp_path / "i.json")])
    assert result.exit_code == 0, result.output
    top = json.loads((tmp_path / "i.json").read_text())["issues"][0]
    assert top["path"].endswith("train/red/red_0.jpg") and top["given"] == "blue" and top["suggested"] == "red"
