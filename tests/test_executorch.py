"""The ExecuTorch backend: `export -o model.pte` (XNNPACK), and predict, evaluate and calibrate through it.

ExecuTorch is not in the dev extras (its wheels are built for one torch release): `nox -s executorch`
runs this file in a virtualenv that has it; elsewhere the file is skipped."""

import hashlib
import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from clothcli.backends import load_classifier
from clothcli.cli import app
from clothcli.engines.evaluate import evaluate
from clothcli.engines.predict import predict_files
from conftest import make_dataset, train_tiny

pytest.importorskip("executorch.runtime", reason="ExecuTorch is not installed (nox -s executorch runs these)")

from clothcli.backends.executorch_runtime import MAX_BATCH, ExecuTorchClassifier, sidecar_path
from clothcli.engines.export import export_onnx

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("executorch")
    data = make_dataset(root / "data", {"train": 8, "validation": 3, "test": 3})
    run = train_tiny(root, data, epochs=4)
    pte = root / "pte" / "tiny.pte"
    pte.parent.mkdir()
    report = export_onnx(checkpoint=run, output=pte, verify_data=data)
    return run, data, pte, report


def test_the_program_verifies_and_carries_the_checkpoint(exported):
    run, _, pte, report = exported
    check = report.verification
    assert check.passed and check.runtime == "executorch" and check.top1_agreement == 1.0
    assert check.max_abs_diff <= 1e-4 * max(1.0, check.logit_scale)
    assert sorted(p.name for p in pte.parent.iterdir()) == ["tiny.pte", "tiny.pte.json"]  # nothing left behind
    assert report.bytes == pte.stat().st_size + sidecar_path(pte).stat().st_size
    model = load_classifier(pte)
    meta = json.loads((run / "best" / "checkpoint.json").read_text())
    assert isinstance(model, ExecuTorchClassifier) and model.format == "executorch"
    assert model.classes == meta["classes"] and model.meta["preprocess"] == meta["preprocess"]
    assert model.has_features and model.schema_version == 1


def test_predictions_match_pytorch_and_large_batches_run_in_slices(exported):
    run, data, pte, _ = exported
    files = sorted(data.rglob("*.jpg"))
    by_program = list(predict_files(load_classifier(pte), files, batch_size=4, workers=0, top_k=2))
    by_checkpoint = list(predict_files(load_classifier(run, in_workers=False), files, batch_size=4, workers=0, top_k=2))
    assert [p.labels[0] for p in by_program] == [p.labels[0] for p in by_checkpoint]
    model = load_classifier(pte)
    side = model.preprocess.input_size
    images = np.random.default_rng(0).standard_normal((MAX_BATCH + 6, 3, side, side), dtype=np.float32)
    logits, features = model.infer(images, features=True)
    assert logits.shape == (MAX_BATCH + 6, len(model.classes)) and len(features) == MAX_BATCH + 6
    assert np.allclose(logits[-6:], model.forward(images[-6:]), atol=1e-5)
    report = evaluate(model=pte, data=data, split="test", workers=0)
    assert report.n == 9


def test_calibrate_rewrites_only_the_sidecar(exported, tmp_path):
    _, data, pte, _ = exported
    copy = tmp_path / "copy.pte"
    shutil.copy(pte, copy)
    shutil.copy(sidecar_path(pte), sidecar_path(copy))
    result = runner.invoke(app, ["calibrate", str(copy), "--data", str(data), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert copy.read_bytes() == pte.read_bytes()
    stored = load_classifier(copy)
    assert stored.temperature != 1.0 and stored.meta["temperature_fitted_on"] == "validation"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.pte", "copy.pte.json"]


def test_a_sidecar_belongs_to_one_program(exported, tmp_path):
    _, data, pte, _ = exported
    lonely = tmp_path / "lonely.pte"
    shutil.copy(pte, lonely)
    other = tmp_path / "other.pte"
    other.write_bytes(pte.read_bytes()[:-1] + b"\0")
    shutil.copy(sidecar_path(pte), sidecar_path(other))
    garbage = tmp_path / "garbage.pte"
    garbage.write_bytes(b"not a program")
    record = json.loads(sidecar_path(pte).read_text())
    record["program_sha256"] = hashlib.sha256(garbage.read_bytes()).hexdigest()
    sidecar_path(garbage).write_text(json.dumps(record))
    cases = {lonely: "is missing beside it", other: "another program", garbage: "not a loadable ExecuTorch program"}
    for path, expected in cases.items():
        result = runner.invoke(app, ["predict", str(path), str(data / "test")])
        assert result.exit_code == 2 and expected in " ".join(result.output.split()), result.output
