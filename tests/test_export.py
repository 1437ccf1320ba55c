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

from clothcli import metrics
from clothcli.backends import load_classifier
from clothcli.cli import app
from clothcli.config import load_config
from clothcli.data.images import load_rgb
from clothcli.data.loading import decode_size, eval_transform
from clothcli.data.preprocess import Preprocess
from clothcli.engines.evaluate import evaluate, model_outputs
from clothcli.engines.predict import predict_files
from clothcli.models.checkpoint import save_checkpoint
from clothcli.training import train
from conftest import COLORS, TINY_OVERRIDES, make_dataset, make_image

pytest.importorskip("onnxruntime", reason="the export extra (pip install 'clothcli[export]') is not installed")

from clothcli.backends.onnx_runtime import OnnxClassifier
from clothcli.engines.export import export_onnx
from clothcli.engines.quantize import int8_path_for
from clothcli.formats import export_path

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
    report = export_onnx(checkpoint=run, output=path, verify_data=data, int8=True, int8_data=data, int8_images=12)
    return path, report


def test_export_verifies_and_carries_the_checkpoint(trained, exported):
    run, _ = trained
    path, report = exported
    check = report.verification
    assert check.passed and check.images == 9 and check.top1_agreement == 1.0
    assert check.max_abs_diff <= 1e-5 * max(1.0, check.logit_scale)  # float32 rounding, nothing more
    assert check.source.endswith("validation")
    model = OnnxClassifier(path)
    meta = json.loads((run / "best" / "checkpoint.json").read_text())
    assert model.classes == meta["classes"] and model.meta["preprocess"] == meta["preprocess"]
    assert model.schema_version == 1 and model.has_features
    # a dynamic batch dimension: one image and five give the same logits per image
    images = model.preprocess.normalise(np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    assert np.allclose(model.forward(images[:1]), model.forward(images)[:1], atol=1e-5)


def test_both_backends_give_the_penultimate_features_the_logits_come_from(trained, exported):
    """The features output is what the classifier layer reads: logits = features @ W.T + b, on both backends."""
    run, data = trained
    path, _ = exported
    files = sorted((data / "test").rglob("*.jpg"))
    torch_backend, onnx_backend = load_classifier(run, in_workers=False), OnnxClassifier(path)
    head = torch_backend.model.get_classifier()
    weight, bias = head.weight.detach().numpy(), head.bias.detach().numpy()
    for backend in (torch_backend, onnx_backend):
        out = model_outputs(backend, files, batch_size=4, workers=0, features=True)
        assert out.features.shape[0] == len(files) == out.logits.shape[0]
        # the PyTorch backend runs in bf16 autocast where the CPU has bf16: 8 bits of mantissa
        scale = np.abs(out.logits).max() * (2e-2 if backend is torch_backend else 1e-5)
        assert np.allclose(out.features @ weight.T + bias, out.logits, atol=scale)
    onnx_features = model_outputs(onnx_backend, files, workers=0, features=True).features
    torch_features = model_outputs(torch_backend, files, workers=0, features=True).features
    assert np.corrcoef(onnx_features.ravel(), torch_features.ravel())[0, 1] > 0.99


def test_int8_is_written_beside_and_reports_both_accuracies(exported):
    path, report = exported
    int8 = report.int8
    quantized = int8_path_for(path)
    assert int8.path == str(quantized) and quantized.is_file() and int8.bytes == quantized.stat().st_size
    assert int8.calibration_images == 12 and int8.images == 9
    assert 0.0 <= int8.int8_accuracy <= 1.0 and 0.0 <= int8.top1_agreement <= 1.0
    assert OnnxClassifier(quantized).quantization == "int8 QDQ"


def test_onnx_predictions_match_the_checkpoint(trained, exported, tmp_path):
    run, _ = trained
    path, _ = exported
    files = [
        make_image(tmp_path / f"{c}{i}.jpg", COLORS[c], size=(90 + 7 * i, 60), seed=i) for c in COLORS for i in range(3)
    ]
    files.append(tmp_path / "broken.jpg")
    files[-1].write_text("not an image")
    by_torch = list(predict_files(load_classifier(run), files, batch_size=4, workers=0, top_k=2))
    by_onnx = list(predict_files(load_classifier(path), files, batch_size=4, workers=2, top_k=2))
    assert [(p.path, p.labels, bool(p.error)) for p in by_onnx] == [(p.path, p.labels, bool(p.error)) for p in by_torch]
    for a, b in zip(by_onnx, by_torch):
        assert np.allclose(a.probs, b.probs, atol=0.02)


def test_onnx_evaluate_report_equals_the_checkpoint(trained, exported):
    run, data = trained
    path, _ = exported
    options = {
        "data": data,
        "split": "test",
        "batch_size": 4,
        "workers": 0,
        "tta_flip": True,
        "ood": data / "validation",
    }
    by_onnx, by_torch = evaluate(model=path, **options), evaluate(model=run, **options)
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
    check = (
        f"\nimport sys\nprint('USED', sorted(m for m in sys.modules if m.startswith('clothcli.')))"
        f"\nprint('LOADED', [m for m in {TORCH_FAMILY!r} if m in sys.modules])\n"
    )
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
    used = evaluated.stdout.strip().splitlines()[-2]  # the modules the torch-free path went through
    for module in ("backends.onnx_runtime", "engines.evaluate", "metrics", "data.preprocess", "render.plots"):
        assert f"'clothcli.{module}'" in used, used


@pytest.mark.parametrize("arch", ["tf_mobilenetv3_small_100", "tf_efficientnet_lite0"])
def test_tf_same_padding_models_export(arch, tmp_path):
    """timm's tf_ models pad explicitly ('same'); both shipped families export and verify."""
    model = timm.create_model(arch, num_classes=3).eval()
    pre = Preprocess(64, "bicubic", (0.5,) * 3, (0.5,) * 3, 0.875)
    meta = {"arch": arch, "classes": ["a", "b", "c"], "preprocess": pre.to_dict(), "num_classes": 3}
    checkpoint = save_checkpoint(model, tmp_path / "ckpt", meta)
    report = export_onnx(checkpoint=checkpoint, output=tmp_path / "m.onnx")
    assert report.verification.passed and report.verification.source == "generated"


def test_failed_verification_writes_nothing(trained, tmp_path, monkeypatch):
    run, _ = trained
    real = OnnxClassifier.forward
    # every logit off by a tenth of the largest: far beyond the allowed difference, the top-1 unchanged
    monkeypatch.setattr(
        OnnxClassifier, "forward", lambda self, x: (lambda o: o + 0.1 * (1 + abs(o).max()))(real(self, x))
    )
    result = runner.invoke(app, ["export", str(run), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output and not (tmp_path / "m.onnx").exists()
    assert list(tmp_path.iterdir()) == []


def test_export_bad_inputs_are_one_line(trained, tmp_path):
    run, data = trained
    cases = {
        "must end in .onnx": ["export", str(run), "-o", str(tmp_path / "m.pt")],
        "output folder not found": ["export", str(run), "-o", str(tmp_path / "nope" / "m.onnx")],
        "--int8 needs --int8-data": ["export", str(run), "-o", str(tmp_path / "m.onnx"), "--int8"],
        "--format openvino writes a .xml file, but the output ends in .onnx": [
            "export", str(run), "-o", str(tmp_path / "m.onnx"), "--format", "openvino",
        ],
        "unknown export format 'tflite'": ["export", str(run), "-o", str(tmp_path / "m"), "--format", "tflite"],
    }  # fmt: skip
    other = tmp_path / "other.onnx"
    other.write_bytes(b"\x08\x07garbage")
    cases["not a readable ONNX model"] = ["predict", str(other), str(data / "test")]
    cases["model not found"] = ["evaluate", str(tmp_path / "missing.onnx"), str(data)]
    for expected, args in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.output and "Traceback" not in result.output


def test_format_names_the_suffix_when_the_output_has_none(trained, tmp_path):
    run, data = trained
    args = ["export", str(run), "-o", str(tmp_path / "model"), "--format", "onnx"]
    result = runner.invoke(app, [*args, "--int8", "--calibration", str(data), "--int8-images", "4"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.onnx", "model.onnx"]
    assert export_path(tmp_path / "m.ONNX", "onnx") == tmp_path / "m.ONNX"
    assert export_path(tmp_path / "m.v2", "openvino") == tmp_path / "m.v2.xml"


def test_missing_extra_names_it(exported, trained, monkeypatch):
    path, _ = exported
    run, data = trained
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    for args in (["predict", str(path), str(data / "test")], ["export", str(run), "-o", "x.onnx"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "pip install 'clothcli[export]'" in result.output, result.output


def test_missing_executorch_names_it(trained, tmp_path, monkeypatch):
    """ExecuTorch is outside the dev extras: exporting or running a .pte without it is one line, and
    nothing is written."""
    from clothcli.backends.executorch_runtime import write_sidecar

    run, data = trained
    monkeypatch.setitem(sys.modules, "executorch", None)
    monkeypatch.setitem(sys.modules, "executorch.runtime", None)
    program = tmp_path / "m.pte"
    result = runner.invoke(app, ["export", str(run), "-o", str(program)])
    assert result.exit_code == 2 and "needs ExecuTorch: pip install executorch" in result.output, result.output
    assert list(tmp_path.iterdir()) == []
    program.write_bytes(b"a program")
    write_sidecar(program, json.loads((run / "best" / "checkpoint.json").read_text()))
    result = runner.invoke(app, ["predict", str(program), str(data / "test")])
    assert result.exit_code == 2 and "needs ExecuTorch" in result.output, result.output
    int8 = runner.invoke(app, ["export", str(run), "-o", str(tmp_path / "n.pte"), "--int8", "--int8-data", str(data)])
    assert int8.exit_code == 2 and "exported in fp32" in int8.output


def test_numpy_preprocessing_matches_the_torch_transform(tmp_path):
    """Real-looking images (gradients, texture, odd sizes, JPEG): the PIL resize against torch's within rounding."""
    rng = np.random.default_rng(0)
    pre = Preprocess(192, "bicubic", (0.5,) * 3, (0.5,) * 3, 0.875)
    mine, theirs = pre, eval_transform(pre)
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


def _torchmetrics_report(preds: torch.Tensor, targets: torch.Tensor, k: int) -> dict:
    """The oracle: the same figures from torchmetrics' functional API."""
    from torchmetrics.functional import classification as tm

    args = {"preds": preds, "target": targets, "num_classes": k}
    averages = {
        average: {
            "precision": float(tm.multiclass_precision(**args, average=average, zero_division=0)),
            "recall": float(tm.multiclass_recall(**args, average=average, zero_division=0)),
            "f1": float(tm.multiclass_f1_score(**args, average=average, zero_division=0)),
        }
        for average in ("weighted", "micro", "macro")
    }
    per_class = [
        tm.multiclass_precision(**args, average="none", zero_division=0).tolist(),
        tm.multiclass_recall(**args, average="none", zero_division=0).tolist(),
        tm.multiclass_f1_score(**args, average="none", zero_division=0).tolist(),
    ]
    return {
        "averages": averages,
        "per_class": per_class,
        "confusion_matrix": tm.multiclass_confusion_matrix(**args).tolist(),
        "balanced_accuracy": float(tm.multiclass_accuracy(**args, average="macro")),
    }


def test_metrics_equal_torchmetrics():
    from torch.nn import functional as F
    from torchmetrics.functional.classification import binary_auroc, multiclass_calibration_error

    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (300, 5)).astype(np.float32)
    targets = rng.integers(0, 4, 300)  # class 4 never occurs as a target
    preds = logits.argmax(1)
    mine = metrics.classification_report(preds, targets, list("abcde"))
    theirs = _torchmetrics_report(torch.from_numpy(preds), torch.from_numpy(targets), 5)
    assert mine.confusion_matrix == theirs["confusion_matrix"]
    for average in ("weighted", "micro", "macro"):
        assert mine.averages[average] == pytest.approx(theirs["averages"][average], abs=1e-6), average
    assert mine.balanced_accuracy == pytest.approx(theirs["balanced_accuracy"], abs=1e-6)
    for name, column in zip(("precision", "recall", "f1"), theirs["per_class"]):
        assert [row[name] for row in mine.per_class] == pytest.approx(column, abs=1e-6)
    z, t = torch.from_numpy(logits), torch.from_numpy(targets)
    probs = (z / 1.3).softmax(1)
    expected = {
        "ece": float(multiclass_calibration_error(probs, t, 5, n_bins=15, norm="l1")),
        "nll": float(F.cross_entropy(z / 1.3, t)),
        "brier": float(((probs - F.one_hot(t, 5).float()) ** 2).sum(1).mean()),
    }
    assert metrics.calibration(logits, targets, 1.3).to_dict() == pytest.approx(expected, abs=1e-5)
    outside = rng.normal(0, 1, (40, 5)).astype(np.float32)
    labels = torch.cat([torch.ones(300), torch.zeros(40)]).long()
    for row in metrics.separation(logits, outside, 1.3):
        scores = np.concatenate(
            [metrics.ood_scores(logits, 1.3)[row.score], metrics.ood_scores(outside, 1.3)[row.score]]
        )
        assert row.auroc == pytest.approx(float(binary_auroc(torch.from_numpy(scores), labels)), abs=1e-6)


def test_compare_puts_a_run_beside_its_fp32_and_int8_exports(trained, exported):
    """McNemar's test on the same images answers whether int8 cost accuracy; each backend is timed for itself."""
    from clothcli.engines.compare import compare_models

    run, data = trained
    path, _ = exported
    comparison = compare_models(models=[run, path, int8_path_for(path)], data=data, split="test", use_cache=False)
    assert [r.name for r in comparison.rows] == [run.name, "tiny.onnx", "tiny.int8.onnx"]
    assert len({r.macs for r in comparison.rows}) == 1 and all(r.n == 9 for r in comparison.rows)
    assert len(comparison.pairs) == 3 and all(0.0 <= p.p_value <= 1.0 for p in comparison.pairs)
    latencies = [r.ms_batch1 for r in comparison.rows]
    assert all(ms > 0 for ms in latencies) and len(set(latencies)) == 3  # timed per backend, not per architecture
    exported_rows = comparison.rows[1:]
    assert all(r.train_seconds is None and r.recipe == "" for r in exported_rows)


def test_calibrate_an_export_writes_its_temperature_into_the_file(trained, exported, tmp_path):
    import shutil

    from clothcli.engines.calibrate import calibrate
    from clothcli.io_utils import file_sha256

    _, data = trained
    path, _ = exported
    copy = tmp_path / "copy.onnx"
    shutil.copy(path, copy)
    before = OnnxClassifier(copy)
    report = calibrate(model=copy, data=data, workers=0, ood=data / "test", recall=0.9)
    after = OnnxClassifier(copy)
    assert after.temperature == pytest.approx(report.temperature) != before.temperature
    assert after.ood_threshold == pytest.approx(report.rejection["threshold"])
    assert after.meta["temperature_fitted_on"] == "validation" and after.classes == before.classes
    # the file rewritten in place; beside it only the feature bank of --ood, named by the digest inside the file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.onnx", "copy.onnx.ood.safetensors"]
    assert after.meta["ood_bank_sha256"] == file_sha256(tmp_path / "copy.onnx.ood.safetensors")
    images = before.preprocess.normalise(np.zeros((2, 32, 32, 3), dtype=np.uint8))
    assert np.array_equal(before.forward(images), after.forward(images))  # the graph is untouched
    found = list(predict_files(after, sorted((data / "test").rglob("*.jpg")), workers=0, min_confidence="auto"))
    assert len(found) == 9 and all(p.probs for p in found)
