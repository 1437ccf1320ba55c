"""`clothcli export` and the torch-free ONNX Runtime path of `predict` and `evaluate`."""

import json
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from typer.testing import CliRunner

from clothcli.calibration import calibration as torch_calibration
from clothcli.checkpoint import save_checkpoint
from clothcli.cli import app
from clothcli.config import load_config
from clothcli.data.images import load_rgb
from clothcli.data.loading import decode_size, eval_transform
from clothcli.evaluation import evaluate_checkpoint
from clothcli.metrics import classification_report as torch_report
from clothcli.models import Preprocess
from clothcli.ood import separation as torch_separation
from clothcli.predict import predict_files
from clothcli.training import train
from conftest import COLORS, TINY_OVERRIDES, make_dataset, make_image

pytest.importorskip("onnxruntime", reason="the export extra (pip install 'clothcli[export]') is not installed")

from clothcli import numpy_metrics
from clothcli.export import export_onnx, int8_path_for
from clothcli.onnx_inference import ImagePreprocess, load_onnx

runner = CliRunner()
TORCH_FAMILY = ("torch", "timm", "torchvision")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained run and its dataset."""
    root = tmp_path_factory.mktemp("export")
    data = make_dataset(root / "data", {"train": 8, "validation": 3, "test": 3})
    cfg = load_config(
        None,
        [*TINY_OVERRIDES, "train.epochs=6", "optim.lr=0.05", f"data.root={data}", f"output_dir={root / 'runs'}"],
    )
    return train(cfg).run_dir, data


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    run, data = trained
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    report = export_onnx(run, path, verify_data=data, int8=True, calibration_data=data, calibration_images=12)
    return path, report


def test_export_verifies_and_carries_the_checkpoint(trained, exported):
    run, _ = trained
    path, report = exported
    check = report.verification
    assert check.passed and check.images == 9 and check.top1_agreement == 1.0
    assert check.max_abs_diff <= 1e-5 * max(1.0, check.logit_scale)  # float32 rounding, nothing more
    assert check.source.endswith("validation")
    model = load_onnx(path)
    meta = json.loads((run / "best" / "checkpoint.json").read_text())
    assert model.classes == meta["classes"] and model.meta["preprocess"] == meta["preprocess"]
    # a dynamic batch dimension: one image and five give the same logits per image
    images = model.preprocess.normalise(np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    assert np.allclose(model.logits(images[:1]), model.logits(images)[:1], atol=1e-5)


def test_int8_is_written_beside_and_reports_both_accuracies(exported):
    path, report = exported
    int8 = report.int8
    quantized = int8_path_for(path)
    assert int8.path == str(quantized) and quantized.is_file() and int8.bytes == quantized.stat().st_size
    assert int8.calibration_images == 12 and int8.images == 9
    assert 0.0 <= int8.int8_accuracy <= 1.0 and 0.0 <= int8.top1_agreement <= 1.0
    assert load_onnx(quantized).meta["quantization"] == "int8 QDQ"


def test_onnx_predictions_match_the_checkpoint(trained, exported, tmp_path):
    run, _ = trained
    path, _ = exported
    files = [
        make_image(tmp_path / f"{c}{i}.jpg", COLORS[c], size=(90 + 7 * i, 60), seed=i) for c in COLORS for i in range(3)
    ]
    files.append(tmp_path / "broken.jpg")
    files[-1].write_text("not an image")
    by_torch = list(predict_files(run, files, batch_size=4, workers=0, top_k=2))
    by_onnx = list(predict_files(path, files, batch_size=4, workers=2, top_k=2))
    assert [(p.path, p.labels, bool(p.error)) for p in by_onnx] == [(p.path, p.labels, bool(p.error)) for p in by_torch]
    for a, b in zip(by_onnx, by_torch):
        assert np.allclose(a.probs, b.probs, atol=0.02)


def test_onnx_evaluate_report_equals_the_checkpoint(trained, exported):
    run, data = trained
    path, _ = exported
    from clothcli.onnx_evaluation import evaluate_onnx

    by_onnx = evaluate_onnx(path, data, "test", batch_size=4, workers=0, tta_flip=True, ood=data / "validation")
    by_torch = evaluate_checkpoint(run, data, "test", batch_size=4, workers=0, tta_flip=True, ood=data / "validation")
    assert (by_onnx.n, by_onnx.correct, by_onnx.confusion_matrix) == (
        by_torch.n,
        by_torch.correct,
        by_torch.confusion_matrix,
    )
    assert [f["predicted"] for f in by_onnx.files] == [f["predicted"] for f in by_torch.files]
    assert by_onnx.calibration.keys() == by_torch.calibration.keys()
    assert all(abs(by_onnx.calibration[k] - by_torch.calibration[k]) < 0.02 for k in by_onnx.calibration)
    assert [r["score"] for r in by_onnx.ood] == ["msp", "energy"]


def _without_torch(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run `script` in a fresh interpreter, then print which of torch, timm and torchvision it imported."""
    check = f"\nimport sys\nprint('LOADED', [m for m in {TORCH_FAMILY!r} if m in sys.modules])\n"
    return subprocess.run([sys.executable, "-c", script + check, *args], capture_output=True, text=True, timeout=120)


def test_predict_and_evaluate_on_onnx_never_import_torch(trained, exported, tmp_path):
    _, data = trained
    path, _ = exported
    out = tmp_path / "out.csv"
    script = (
        "import sys\nfrom clothcli.cli import app\n"
        "try:\n    app(sys.argv[1:], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
    )
    predicted = _without_torch(script, "predict", str(path), str(data / "test"), "-o", str(out))
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert predicted.stdout.strip().splitlines()[-1] == "LOADED []"
    assert len(out.read_text().splitlines()) == 1 + 9
    evaluated = _without_torch(script, "evaluate", str(path), str(data), "--json", str(tmp_path / "e.json"))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert evaluated.stdout.strip().splitlines()[-1] == "LOADED []"
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 9


@pytest.mark.parametrize("arch", ["tf_mobilenetv3_small_100", "tf_efficientnet_lite0"])
def test_tf_same_padding_models_export(arch, tmp_path):
    """timm's tf_ models pad explicitly ('same'); both shipped families export and verify."""
    model = timm.create_model(arch, num_classes=3).eval()
    pre = Preprocess(64, "bicubic", (0.5,) * 3, (0.5,) * 3, 0.875)
    meta = {"arch": arch, "classes": ["a", "b", "c"], "preprocess": pre.to_dict(), "num_classes": 3}
    checkpoint = save_checkpoint(model, tmp_path / "ckpt", meta)
    report = export_onnx(checkpoint, tmp_path / "m.onnx")
    assert report.verification.passed and report.verification.source == "generated"


def test_failed_verification_writes_nothing(trained, tmp_path, monkeypatch):
    run, _ = trained
    import clothcli.export as export

    real = export._run_both
    # every logit off by a tenth of the largest: far beyond the allowed difference, the top-1 unchanged
    monkeypatch.setattr(export, "_run_both", lambda *a: (lambda r, o: (r, o + 0.1 * (1 + abs(r).max())))(*real(*a)))
    result = runner.invoke(app, ["export", str(run), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output and not (tmp_path / "m.onnx").exists()
    assert list(tmp_path.iterdir()) == []


def test_export_bad_inputs_are_one_line(trained, tmp_path):
    run, data = trained
    cases = {
        "must end in .onnx": ["export", str(run), "-o", str(tmp_path / "m.pt")],
        "output folder not found": ["export", str(run), "-o", str(tmp_path / "nope" / "m.onnx")],
        "--int8 needs --calibration": ["export", str(run), "-o", str(tmp_path / "m.onnx"), "--int8"],
    }
    other = tmp_path / "other.onnx"
    other.write_bytes(b"\x08\x07garbage")
    cases["not a readable ONNX model"] = ["predict", str(other), str(data / "test")]
    cases["model not found"] = ["evaluate", str(tmp_path / "missing.onnx"), str(data)]
    for expected, args in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output and "Traceback" not in result.output


def test_missing_extra_names_it(exported, trained, monkeypatch):
    path, _ = exported
    run, data = trained
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    for args in (["predict", str(path), str(data / "test")], ["export", str(run), "-o", "x.onnx"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "pip install 'clothcli[export]'" in result.output, result.output


def test_numpy_preprocessing_matches_the_torch_transform(tmp_path):
    """Real-looking images (gradients, texture, odd sizes, JPEG): the PIL resize against torch's within rounding."""
    rng = np.random.default_rng(0)
    pre = Preprocess(192, "bicubic", (0.5,) * 3, (0.5,) * 3, 0.875)
    mine, theirs = ImagePreprocess.from_dict(pre.to_dict()), eval_transform(pre)
    for i, size in enumerate([(640, 480), (300, 700), (219, 219), (1200, 250)]):
        w, h = size
        ramp = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.3, 1, h)[:, None, None]
        pixels = np.clip(ramp + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        a = mine.normalise(mine.load(path)[None])[0]
        b = theirs(load_rgb(path, decode_size(pre))).numpy()
        levels = np.abs(a - b) * 0.5 * 255  # back to 0-255 levels (std 0.5)
        assert a.shape == b.shape == (3, 192, 192)
        assert levels.max() <= 3.0 and levels.mean() < 0.5, (size, levels.max(), levels.mean())


def test_numpy_metrics_equal_torchmetrics():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (300, 5)).astype(np.float32)
    targets = rng.integers(0, 4, 300)  # class 4 never occurs as a target
    preds = logits.argmax(1)
    classes = list("abcde")
    mine, theirs = (
        numpy_metrics.classification_report(preds, targets, classes),
        torch_report(torch.from_numpy(preds), torch.from_numpy(targets), classes),
    )
    assert mine.confusion_matrix == theirs.confusion_matrix and mine.correct == theirs.correct
    for average in ("weighted", "micro", "macro"):
        for k, v in theirs.averages[average].items():
            assert mine.averages[average][k] == pytest.approx(v, abs=1e-6), (average, k)
    assert mine.balanced_accuracy == pytest.approx(theirs.balanced_accuracy, abs=1e-6)
    for a, b in zip(mine.per_class, theirs.per_class):
        assert a == pytest.approx(b, abs=1e-6)
    log_probs = torch.from_numpy(logits).log_softmax(1)
    expected = torch_calibration(log_probs, torch.from_numpy(targets)).to_dict()
    got = numpy_metrics.calibration(log_probs.numpy().astype(np.float64), targets)
    assert got == pytest.approx(expected, abs=1e-5)
    outside = rng.normal(0, 1, (40, 5)).astype(np.float32)
    expected_ood = [r.to_dict() for r in torch_separation(torch.from_numpy(logits), torch.from_numpy(outside), 1.3)]
    got_ood = numpy_metrics.separation(logits, outside, 1.3)
    for a, b in zip(got_ood, expected_ood):
        assert a["score"] == b["score"]
        assert {k: a[k] for k in a if k != "score"} == pytest.approx({k: b[k] for k in b if k != "score"}, abs=1e-5)
