"""Files from someone else: every model, run folder and metadata file is read as data.

Each crafted file is refused with one line and exit code 2; nothing is written outside the folders
asked for, and nothing is executed.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
from typer.testing import CliRunner

from clothcli.cli import app
from clothcli.config import load_config
from clothcli.data.preprocess import Preprocess
from clothcli.errors import UserError
from clothcli.models.checkpoint import save_checkpoint
from clothcli.names import check_class_names, class_folders, folder_name
from clothcli.safe_files import open_inside, place_file
from clothcli.training import train
from conftest import COLORS, TINY_OVERRIDES, make_dataset, make_image

runner = CliRunner()
HOSTILE_NAMES = ["../escaped", "..", "sub/../../x", "/tmp/absolute", "."]


def one_line_exit_2(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (args, result.output)
    assert ("Traceback" not in result.output and result.exception is None) or isinstance(result.exception, SystemExit)
    assert len(result.output.strip().splitlines()) <= 3, result.output  # one line, wrapped by the terminal
    return " ".join(result.output.split())


def tiny_checkpoint(folder: Path, classes: list[str]) -> Path:
    model = timm.create_model("test_efficientnet", num_classes=len(classes)).eval()
    pre = Preprocess(32, "bilinear", (0.5,) * 3, (0.5,) * 3, 0.875)
    meta = {"arch": "test_efficientnet", "classes": classes, "preprocess": pre.to_dict(), "num_classes": len(classes)}
    return save_checkpoint(model, folder, meta)


def with_classes(checkpoint: Path, classes: list) -> Path:
    meta_file = checkpoint / "checkpoint.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "classes": classes}))
    return checkpoint


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    for i, (name, color) in enumerate(COLORS.items()):
        for j in range(4):
            make_image(tmp_path / "photos" / f"{name}{j}.jpg", color, seed=10 * i + j)
    return tmp_path / "photos"


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("bad", HOSTILE_NAMES)
def test_a_checkpoint_whose_classes_are_paths_writes_nothing_outside(tmp_path, photos, bad):
    checkpoint = with_classes(tiny_checkpoint(tmp_path / "ckpt", ["a", "b", "c"]), ["a", bad, "c"])
    before = tree(tmp_path)
    for mode in ("--copy-to", "--move-to"):
        text = one_line_exit_2(["predict", str(checkpoint), str(photos), mode, str(tmp_path / "sorted")])
        assert "checkpoint.json" in text and "bad class name" in text
    assert tree(tmp_path) == before  # nothing written anywhere, the photos where they were
    assert not Path("/tmp/absolute").exists()


def test_the_class_name_rule(tmp_path):
    assert check_class_names(["T-shirt/top", "dress", "Ünïcode"], "x") == ["T-shirt/top", "dress", "Ünïcode"]
    cases = {
        "same name up to case": ["Shirt", "shirt"],
        "same name up to case or form": ["caf\u00e9", "cafe\u0301"],  # NFC and NFD spellings of one word
        "reserved": ["unknown", "a"],
        "control or invisible": ["a\x1b[31m", "b"],
        "an empty name": ["  ", "b"],
        "characters (at most": ["x" * 500],
        "must be a list": "abc",
        "is not text": [3, "b"],
    }
    for expected, names in cases.items():
        with pytest.raises(UserError, match=expected.replace("(", r"\(")):
            check_class_names(names, "labels.csv")
    for bad in HOSTILE_NAMES:
        with pytest.raises(UserError, match="labels.csv"):
            check_class_names([bad, "b"], "labels.csv")
    assert folder_name("T-shirt/top") == "T-shirt_top" and folder_name(".hidden") == "_.hidden"
    with pytest.raises(UserError, match="would share the folder"):
        class_folders(["T-shirt/top", "T-shirt_top"])


def test_a_label_with_a_slash_is_kept_and_sorted_into_its_own_folder(tmp_path, photos):
    checkpoint = with_classes(tiny_checkpoint(tmp_path / "ckpt", ["a", "b", "c"]), ["T-shirt/top", "dress", "bag"])
    out = tmp_path / "sorted"
    result = runner.invoke(app, ["predict", str(checkpoint), str(photos), "--copy-to", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} <= {"T-shirt_top", "dress", "bag"}
    assert sum(1 for _ in out.rglob("*.jpg")) == 12
    result = runner.invoke(
        app, ["evaluate", str(checkpoint), str(out), "--workers", "0", "--json", str(tmp_path / "e")]
    )
    assert result.exit_code == 0, result.output  # the sorted folder reads back as a class-laid-out folder


def test_the_writer_refuses_paths_and_links_by_itself(tmp_path):
    source = make_image(tmp_path / "in.jpg", (1, 2, 3))
    root = tmp_path / "sorted"
    for bad in ["..", "../x", "a/b", "", "."]:
        with pytest.raises(UserError, match="not a plain name"):
            place_file(source, root, bad)
    outside = tmp_path / "outside"
    outside.mkdir()
    root.mkdir(exist_ok=True)
    (root / "red").symlink_to(outside)  # planted inside the target
    with pytest.raises(UserError, match="symbolic link"):
        place_file(source, root, "red")
    with pytest.raises(UserError, match="symbolic link"):
        open_inside(root, "red")
    assert list(outside.iterdir()) == []
    (root / "green").mkdir()
    (root / "green" / "in.jpg").symlink_to(outside / "target.jpg")  # a link where the file would go
    written = place_file(source, root, "green")
    assert written.name == "in-1.jpg" and not (outside / "target.jpg").exists()
    moved = place_file(written, root, "blue", move=True)
    assert moved.read_bytes() == source.read_bytes() and not written.exists()


def onnx_file(path: Path, meta: object, external: str | None = None) -> Path:
    """A tiny graph (global average pool and a 3x3 matrix) with the clothcli metadata `meta`."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.eye(3, dtype=np.float32), "weight")
    if external is not None:
        weight.data_location = TensorProto.EXTERNAL
        for key, value in (("location", external), ("offset", "0"), ("length", "36")):
            entry = weight.external_data.add()
            entry.key, entry.value = key, value
        weight.ClearField("raw_data")
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "weight"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    entry = model.metadata_props.add()
    entry.key, entry.value = "clothcli", meta if isinstance(meta, str) else json.dumps(meta)
    onnx.save(model, str(path))
    return path


def onnx_meta(classes: list) -> dict:
    pre = Preprocess(32, "bilinear", (0.5,) * 3, (0.5,) * 3, 0.875)
    return {"arch": "tiny", "classes": classes, "preprocess": pre.to_dict()}


def test_exported_metadata_follows_the_same_rule(tmp_path, photos):
    pytest.importorskip("onnxruntime")
    good = onnx_file(tmp_path / "good.onnx", onnx_meta(["red", "green", "blue"]))
    result = runner.invoke(app, ["predict", str(good), str(photos), "--copy-to", str(tmp_path / "ok")])
    assert result.exit_code == 0, result.output
    for i, bad in enumerate(HOSTILE_NAMES):
        model = onnx_file(tmp_path / f"bad{i}.onnx", onnx_meta(["red", bad, "blue"]))
        text = one_line_exit_2(["predict", str(model), str(photos), "--move-to", str(tmp_path / "sorted")])
        assert f"bad{i}.onnx" in text and "bad class name" in text
    deep = onnx_file(tmp_path / "deep.onnx", "[" * 100_000 + "]" * 100_000)
    assert "not readable JSON" in one_line_exit_2(["predict", str(deep), str(photos)])
    nested = onnx_file(tmp_path / "nested.onnx", {**onnx_meta(["a", "b", "c"]), "x": json.loads("[" * 80 + "]" * 80)})
    assert "nested more than" in one_line_exit_2(["predict", str(nested), str(photos)])
    huge = onnx_file(tmp_path / "huge.onnx", {**onnx_meta(["a", "b", "c"]), "padding": "x" * (17 << 20)})
    assert "more than the" in one_line_exit_2(["evaluate", str(huge), str(photos)])
    assert len(list(photos.iterdir())) == 12


def test_external_data_outside_the_model_folder_is_refused(tmp_path, photos):
    pytest.importorskip("onnxruntime")
    folder = tmp_path / "models"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(np.ones(9, dtype=np.float32).tobytes())
    model = onnx_file(folder / "m.onnx", onnx_meta(["red", "green", "blue"]), external="../secret.bin")
    text = one_line_exit_2(["predict", str(model), str(photos)])
    assert "outside the model's folder" in text or "escapes model directory" in text


def test_checkpoint_metadata_that_is_huge_nested_or_lies(tmp_path, photos):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", ["a", "b", "c"])
    meta_file = checkpoint / "checkpoint.json"
    original = meta_file.read_text()
    meta_file.write_text("[" * 100_000 + "]" * 100_000)
    assert "not readable JSON" in one_line_exit_2(["predict", str(checkpoint), str(photos)])
    meta_file.write_text(json.dumps({**json.loads(original), "padding": "x" * (17 << 20)}))
    assert "more than the" in one_line_exit_2(["predict", str(checkpoint), str(photos)])
    meta_file.write_text(json.dumps({**json.loads(original), "preprocess": {"input_size": "big"}}))
    assert "not a preprocessing description" in one_line_exit_2(["predict", str(checkpoint), str(photos)])
    meta_file.write_text(original)
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 10**9  # claims a gigabyte more than the file holds
    text = json.dumps(header).encode()
    weights.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + header_length :])
    assert "cannot load weights" in one_line_exit_2(["predict", str(checkpoint), str(photos)])
    weights.write_bytes((10**15).to_bytes(8, "little") + b"{}")  # a header length of a petabyte
    assert "cannot load weights" in one_line_exit_2(["predict", str(checkpoint), str(photos)])


@pytest.fixture(scope="module")
def resumable(tmp_path_factory):
    """A tiny run with EMA cut after its first epoch of two: something to resume."""
    root = tmp_path_factory.mktemp("hostile-run")
    data = make_dataset(root / "data", {"train": 4, "validation": 2, "test": 1})
    cfg = load_config(
        None,
        [*TINY_OVERRIDES, "train.epochs=1", "train.ema.enabled=true", f"data.root={data}", f"output_dir={root}"],
    )
    run = train(cfg).run_dir
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("epochs: 1", "epochs: 2"))
    return run


class RunsACommand:
    """A pickle that runs a shell command when it is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / run.name
    shutil.copytree(run, target, symlinks=True)
    return target


@pytest.mark.parametrize("planted", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"])
def test_resume_never_unpickles_code(resumable, tmp_path, planted):
    run = copy_run(resumable, tmp_path)
    marker = tmp_path / "ran"
    (run / "state" / planted).write_bytes(pickle.dumps(RunsACommand(marker)))
    best = (run / "best" / "model.safetensors").read_bytes()
    text = one_line_exit_2(["train", "--resume", str(run)])
    assert planted in text and "untouched" in text
    assert not marker.exists()
    assert (run / "best" / "model.safetensors").read_bytes() == best


def test_resume_of_a_corrupt_state_file_is_one_line(resumable, tmp_path):
    run = copy_run(resumable, tmp_path)
    (run / "state" / "averaged_weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    assert "averaged_weights.safetensors" in one_line_exit_2(["train", "--resume", str(run)])
    run = copy_run(resumable, tmp_path / "second")
    (run / "state" / "trainer_state.json").write_text("[" * 50_000)
    assert "trainer_state.json" in one_line_exit_2(["train", "--resume", str(run)])


def test_the_genuine_state_holds_no_pickle_of_objects(resumable):
    names = sorted(p.name for p in (resumable / "state").iterdir())
    assert "averaged_weights.safetensors" in names and not any(n.startswith("custom_checkpoint") for n in names)


def test_links_in_a_run_folder_are_refused_where_clothcli_writes(resumable, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(resumable / "state", elsewhere)
    run = copy_run(resumable, tmp_path / "linked")
    shutil.rmtree(run / "state")
    (run / "state").symlink_to(elsewhere)
    before = tree(elsewhere)
    assert "symbolic link" in one_line_exit_2(["train", "--resume", str(run)])
    assert tree(elsewhere) == before
    run = copy_run(resumable, tmp_path / "meta")
    outside = tmp_path / "outside.json"
    shutil.move(run / "best" / "checkpoint.json", outside)
    (run / "best" / "checkpoint.json").symlink_to(outside)
    data, before = Path(json.loads(outside.read_text())["config"]["data"]["root"]), outside.read_text()
    text = one_line_exit_2(["calibrate", str(run), "--data", str(data), "--workers", "0"])
    assert "symbolic link" in text and outside.read_text() == before


def test_a_fifo_named_like_an_image_is_skipped_not_waited_on(tmp_path, photos):
    data = make_dataset(tmp_path / "data", {"train": 2, "validation": 1, "test": 1})
    os.mkfifo(photos / "pipe.jpg")
    os.mkfifo(data / "test" / "red" / "pipe.jpg")
    checkpoint = tiny_checkpoint(tmp_path / "ckpt", ["blue", "green", "red"])
    commands = [["predict", str(checkpoint), str(photos), "--workers", "0"],
                ["evaluate", str(checkpoint), str(data), "--workers", "0"],
                ["analyze-data", str(data)]]  # fmt: skip
    script = (  # the three commands in one process (a start-up each cost seconds); a hang hits the timeout
        "import json, sys\nfrom clothcli.cli import app\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    try:\n        app(args, standalone_mode=False)\n    except SystemExit as exc:\n"
        "        assert not exc.code, (args, exc.code)\n    print('done', args[0], flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, json.dumps(commands)], capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("done ") == 3


def test_a_training_folder_named_like_the_reserved_answer_is_refused(tmp_path):
    data = make_dataset(tmp_path / "data", {"train": 2, "validation": 1, "test": 1}, classes=("red", "unknown"))
    text = one_line_exit_2(["analyze-data", str(data)])
    assert "reserved" in text and "train" in text
