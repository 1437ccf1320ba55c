import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clothcli.backends import load_classifier
from clothcli.cli import app
from clothcli.config import load_config
from clothcli.data.images import ImageReadError, load_rgb
from clothcli.data.inputs import collect_inputs
from clothcli.data.loading import ImageFiles, decode_size, eval_transform
from clothcli.data.preprocess import Preprocess
from clothcli.engines.predict import predict_files, run_predict
from clothcli.errors import UserError
from clothcli.models.checkpoint import load_checkpoint
from clothcli.training import train
from conftest import COLORS, TINY_OVERRIDES, make_dataset, make_image

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("pred")
    data = make_dataset(root / "data", {"train": 8, "validation": 2})
    cfg = load_config(
        None,
        [
            *TINY_OVERRIDES,
            "train.epochs=8",
            "optim.lr=0.05",
            f"data.root={data}",
            f"output_dir={root / 'runs'}",
            f"data.cache_dir={root / 'cache'}",
        ],
    )
    return train(cfg).run_dir


def every_kind(folder: Path) -> dict[str, Path]:
    """One file of each kind a phone or the web produces, plus the broken ones."""
    red = COLORS["red"]
    folder.mkdir(parents=True, exist_ok=True)
    base = Image.new("RGB", (60, 40), red)
    files = {}
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    files["exif"] = folder / "exif.jpg"
    base.save(files["exif"], exif=exif)
    files["rgba"] = folder / "alpha.png"
    Image.new("RGBA", (30, 30), (*red, 128)).save(files["rgba"])
    files["palette"] = folder / "pal.png"
    base.convert("P").save(files["palette"])
    files["16bit"] = folder / "deep.png"
    Image.new("I;16", (30, 30), 40000).save(files["16bit"])
    files["gray"] = folder / "gray.jpg"
    base.convert("L").save(files["gray"])
    files["cmyk"] = folder / "cmyk.jpg"
    base.convert("CMYK").save(files["cmyk"])
    files["webp"] = folder / "web.webp"
    base.save(files["webp"])
    files["bmp"] = folder / "bitmap.bmp"
    base.save(files["bmp"])
    files["tiff"] = folder / "scan.tiff"
    base.save(files["tiff"])
    files["gif"] = folder / "anim.gif"
    base.save(files["gif"], save_all=True, append_images=[Image.new("RGB", (60, 40), (0, 0, 255))])
    files["upper"] = make_image(folder / "UPPER.JPEG", red)
    files["unicode"] = make_image(folder / "chemise_été_シャツ.jpg", red)
    files["large"] = make_image(folder / "large.jpg", red, size=(2400, 1800))
    files["zero"] = folder / "zero.jpg"
    files["zero"].write_bytes(b"")
    files["text"] = folder / "note.png"
    files["text"].write_text("this is not a png")
    good = make_image(folder / "tmp.jpg", red, size=(200, 200)).read_bytes()
    (folder / "tmp.jpg").unlink()
    files["truncated"] = folder / "truncated.jpg"
    files["truncated"].write_bytes(good[: len(good) // 3])
    return files


BROKEN = {"zero", "text", "truncated"}


def test_exif_orientation_is_applied(tmp_path):
    files = every_kind(tmp_path)
    assert load_rgb(files["exif"]).size == (40, 60)
    for kind in set(files) - BROKEN:
        assert load_rgb(files[kind]).mode == "RGB", kind
    assert load_rgb(files["16bit"]).getpixel((0, 0))[0] > 100  # scaled, not clipped to white or black


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = make_image(tmp_path / "bomb.png", (1, 2, 3), size=(100, 100), fmt="PNG")
    with pytest.raises(ImageReadError, match="decompression bomb"):
        load_rgb(path)


def test_every_kind_is_classified_and_broken_ones_reported(checkpoint, tmp_path):
    files = every_kind(tmp_path / "in")
    out = tmp_path / "out.csv"
    summary = run_predict(model=checkpoint, inputs=[str(tmp_path / "in")], output=out, workers=2, batch_size=4)
    assert summary.total == len(files)
    assert summary.classified == len(files) - len(BROKEN)
    reasons = {Path(p).name: r for p, r in summary.errors}
    assert set(reasons) == {files[k].name for k in BROKEN}
    assert "0 bytes" in reasons["zero.jpg"] and "not an image" in reasons["note.png"]
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    assert len(rows) == len(files)
    assert all(r["error"] for r in rows if Path(r["path"]).name in reasons)
    assert sum(r["label"] == "red" for r in rows) >= 10


def uint8_classifier(checkpoint: Path):
    from clothcli.backends.pytorch import TorchClassifier
    from clothcli.models.loading import load_for_inference

    return TorchClassifier(load_for_inference(checkpoint), uint8_transfer=True)


def test_uint8_transfer_gives_the_same_outputs(checkpoint, tmp_path):
    """The GPU path (uint8 batches normalised on the device), exercised on the CPU."""
    files = sorted(every_kind(tmp_path / "in").values())
    plain = list(predict_files(load_classifier(checkpoint), files, batch_size=4, workers=0, top_k=3))
    shipped = list(predict_files(uint8_classifier(checkpoint), files, batch_size=4, workers=0, top_k=3))
    assert [(p.labels, p.error) for p in plain] == [(p.labels, p.error) for p in shipped]
    for a, b in zip(plain, shipped):
        assert all(abs(x - y) < 1e-5 for x, y in zip(a.probs, b.probs))


def test_probabilities_are_the_checkpoints_own_model_on_its_preprocessing(checkpoint, tmp_path):
    """predict folds batch norm and runs channels_last; its probabilities must still be those of the
    checkpoint's model, unfused, on the checkpoint's eval preprocessing."""
    files = sorted(make_image(tmp_path / f"{name}.png", color, (50, 30)) for name, color in COLORS.items())
    predictions = list(predict_files(load_classifier(checkpoint), files, batch_size=2, workers=0, top_k=3))
    model, meta = load_checkpoint(checkpoint)
    pre = Preprocess.from_dict(meta["preprocess"])
    dataset = ImageFiles([(path, 0) for path in files], eval_transform(pre), decode_size(pre))
    with torch.inference_mode():
        expected = model(torch.stack([dataset[i][0] for i in range(len(files))])).softmax(1)
    for prediction, probs in zip(predictions, expected):
        top = probs.topk(3)
        assert prediction.labels == [meta["classes"][i] for i in top.indices.tolist()]
        assert prediction.probs == pytest.approx(top.values.tolist(), abs=1e-5)


def test_model_in_workers_gives_the_same_outputs(checkpoint, tmp_path):
    """The CPU default with workers (each worker decodes and classifies) against the model in this
    process, on every file kind including the unreadable ones."""
    files = sorted(every_kind(tmp_path / "in").values())
    here = list(predict_files(load_classifier(checkpoint, in_workers=False), files, batch_size=4, workers=2, top_k=3))
    in_workers = list(
        predict_files(load_classifier(checkpoint, in_workers=True), files, batch_size=4, workers=2, top_k=3)
    )
    assert [(p.path, p.labels, p.error) for p in here] == [(p.path, p.labels, p.error) for p in in_workers]
    for a, b in zip(here, in_workers):
        assert all(abs(x - y) < 1e-5 for x, y in zip(a.probs, b.probs))
    with pytest.raises(UserError, match="at least one worker"):
        next(predict_files(load_classifier(checkpoint, in_workers=True), files, workers=0))


def test_model_in_workers_does_not_hang_after_the_parent_used_openmp(checkpoint, tmp_path):
    """Workers are forked; GNU OpenMP deadlocks in a forked child that asks for more threads than one
    once the parent has used its pool. One worker on a multi-thread torch is the case that hung."""
    files = [make_image(tmp_path / "in" / f"{i}.jpg", COLORS["red"], seed=i) for i in range(6)]
    script = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from clothcli.backends import load_classifier\n"
        "from clothcli.engines.predict import predict_files\n"
        "torch.set_num_threads(2)\n"
        "torch.nn.functional.conv2d(torch.randn(4, 32, 64, 64), torch.randn(32, 32, 3, 3)).sum()\n"
        "files = [Path(p) for p in sys.argv[2:]]\n"
        "found = list(predict_files(load_classifier(sys.argv[1], in_workers=True), files, batch_size=2, workers=1))\n"
        "print(sum(not p.error for p in found))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(checkpoint), *map(str, files)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "6"


def test_inputs_nested_hidden_globs_and_symlink_loops(tmp_path):
    root = tmp_path / "tree"
    a = make_image(root / "a.jpg", (1, 1, 1))
    b = make_image(root / "sub" / "deeper" / "b.PNG", (1, 1, 1), fmt="PNG")
    make_image(root / ".hidden" / "c.jpg", (1, 1, 1))
    make_image(root / ".dot.jpg", (1, 1, 1))
    (root / "readme.txt").write_text("x")
    os.symlink(root, root / "sub" / "loop")
    os.symlink(a, root / "sub" / "link_to_a.jpg")
    found = collect_inputs([str(root)])
    assert [p.name for p in found.files] == ["a.jpg", "b.PNG"]
    assert collect_inputs([str(root)], recursive=False).files == [a]
    assert collect_inputs([str(root / "**" / "*.PNG")]).files == [b]
    assert collect_inputs([str(a), str(root)]).files == found.files
    assert collect_inputs([str(tmp_path / "nope")]).missing


def test_json_jsonl_topk_and_unknown(checkpoint, tmp_path):
    files = [make_image(tmp_path / "in" / f"{i}.jpg", COLORS["green"], seed=i) for i in range(5)]
    for ext in ("json", "jsonl"):
        out = tmp_path / f"r.{ext}"
        run_predict(
            model=checkpoint, inputs=[str(tmp_path / "in")], output=out, top_k=3, min_confidence=0.999, workers=0
        )
        text = out.read_text()
        records = json.loads(text) if ext == "json" else [json.loads(line) for line in text.splitlines()]
        assert len(records) == len(files)
        assert all(len(r["top_k"]) == 3 for r in records)
        probs = [t["probability"] for t in records[0]["top_k"]]
        assert probs == sorted(probs, reverse=True)
        assert all(r["label"] == "unknown" for r in records if r["top_k"][0]["probability"] < 0.999)


def test_copy_and_move_never_overwrite_or_lose(checkpoint, tmp_path):
    src = tmp_path / "src"
    make_image(src / "one" / "x.jpg", COLORS["red"], seed=1)
    make_image(src / "two" / "x.jpg", COLORS["red"], seed=2)
    (src / "bad.jpg").write_bytes(b"")
    dest = tmp_path / "sorted"
    run_predict(model=checkpoint, inputs=[str(src)], copy_to=dest, workers=0)
    copied = sorted(p.name for p in dest.rglob("*.jpg"))
    assert copied == ["x-1.jpg", "x.jpg"]
    assert (src / "one" / "x.jpg").exists()
    before = sorted(p.read_bytes() for p in dest.rglob("*.jpg"))
    summary = run_predict(model=checkpoint, inputs=[str(src)], move_to=dest, workers=0)
    assert summary.classified == 2
    assert sorted(p.name for p in dest.rglob("*.jpg")) == ["x-1.jpg", "x-2.jpg", "x-3.jpg", "x.jpg"]
    assert not (src / "one" / "x.jpg").exists() and (src / "bad.jpg").exists()
    after = sorted(p.read_bytes() for p in dest.rglob("*.jpg"))
    assert all(b in after for b in before)


def test_cli_exit_codes(checkpoint, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "b.jpg").write_bytes(b"nope")
    result = runner.invoke(app, ["predict", str(checkpoint), str(tmp_path / "bad"), "--workers", "0"])
    assert result.exit_code == 1 and "unreadable" in result.output
    make_image(tmp_path / "bad" / "ok.jpg", COLORS["blue"])
    result = runner.invoke(app, ["predict", str(checkpoint), str(tmp_path / "bad"), "--workers", "0", "--top-k", "2"])
    assert result.exit_code == 0, result.output
    assert "1 classified, 1 unreadable" in result.output
    for args in (
        ["predict", str(tmp_path / "nockpt"), str(tmp_path / "bad")],
        ["predict", str(checkpoint), str(tmp_path / "missing")],
        ["predict", str(checkpoint), str(tmp_path / "bad"), "-o", str(tmp_path / "r.xml")],
        ["predict", str(checkpoint), str(tmp_path / "bad"), "--min-confidence", "2"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output


def _mixed_folder(folder: Path, n: int = 30) -> Path:
    for i in range(n):
        make_image(folder / f"{i:03d}.jpg", list(COLORS.values())[i % 3], seed=i)
    (folder / "015_broken.jpg").write_bytes(b"\xff\xd8garbage")
    return folder


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_interrupted_predict_resumes_to_the_file_an_uninterrupted_run_writes(checkpoint, tmp_path, suffix):
    folder = _mixed_folder(tmp_path / "imgs")
    options = {"workers": 0, "batch_size": 4, "top_k": 2}
    full = tmp_path / f"full.{suffix}"
    run_predict(model=checkpoint, inputs=[str(folder)], output=full, **options)
    cut = tmp_path / f"cut.{suffix}"
    seen = []

    def interrupt_after_eleven(p):
        seen.append(p)
        if len(seen) == 11:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_predict(model=checkpoint, inputs=[str(folder)], output=cut, on_result=interrupt_after_eleven, **options)
    with open(cut, "a", encoding="utf-8") as fh:
        fh.write(f"{folder}/011.jpg,re")  # a kill in the middle of the next row
    classified = []
    summary = run_predict(
        model=checkpoint, inputs=[str(folder)], output=cut, on_result=classified.append, resume=True, **options
    )
    assert summary.already_done == 11 and len(classified) == 31 - 11
    assert cut.read_bytes() == full.read_bytes()
    # resuming a finished file classifies nothing and changes nothing
    again = run_predict(model=checkpoint, inputs=[str(folder)], output=cut, resume=True, **options)
    assert again.already_done == 31 and again.total == 0 and cut.read_bytes() == full.read_bytes()


def test_predict_killed_part_way_resumes_without_classifying_again(checkpoint, tmp_path):
    from clothcli.io_utils import FAULT_DELAY_ENV

    folder = _mixed_folder(tmp_path / "imgs", n=60)
    out, full = tmp_path / "out.csv", tmp_path / "full.csv"
    args = [sys.executable, "-m", "clothcli", "predict", str(checkpoint), str(folder), "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*args, "-o", str(full)], env=env, check=True, capture_output=True, timeout=120)
    proc = subprocess.Popen([*args, "-o", str(out)], env={**env, FAULT_DELAY_ENV: "0.05"}, stdout=subprocess.DEVNULL)
    while not out.exists() or out.read_text().count("\n") < 20:
        assert proc.poll() is None, "predict ended before it could be killed"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    rows = out.read_text().splitlines()
    assert 20 <= len(rows) < 62 and full.read_text().splitlines()[: len(rows)] == rows  # valid as far as it got
    done = subprocess.run([*args, "-o", str(out), "--resume"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{len(rows) - 1} image(s) were already in the output file" in done.stdout.replace("\n", " ")
    assert out.read_bytes() == full.read_bytes()


def test_predict_resume_refuses_what_it_cannot_continue(checkpoint, tmp_path):
    folder = _mixed_folder(tmp_path / "imgs", n=3)
    (tmp_path / "a.json").write_text("[\n  {")
    run_predict(model=checkpoint, inputs=[str(folder)], output=tmp_path / "top1.csv", workers=0)
    cases = [
        ([], "give it with -o"),
        (["-o", str(tmp_path / "a.json")], ".csv or .jsonl"),
        (["-o", str(tmp_path / "top1.csv"), "--top-k", "2"], "columns differ"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, ["predict", str(checkpoint), str(folder), "--resume", "--workers", "0", *extra])
        assert result.exit_code == 2 and message in result.output.replace("\n", " "), (extra, result.output)
