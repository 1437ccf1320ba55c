"""Feature-space out-of-distribution scores: the bank, the choice `calibrate --ood` makes, and the
rejection `predict --min-confidence auto` applies with it, on every format."""

import csv
import importlib.util
import json
import pickle
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from clothcli.backends import load_classifier
from clothcli.cli import app
from clothcli.engines.calibrate import calibrate
from clothcli.engines.evaluate import model_outputs
from clothcli.engines.predict import run_predict
from clothcli.engines.rejection import rejector_for
from clothcli.errors import UserError
from clothcli.feature_scores import fit_bank, load_bank
from clothcli.metrics import auroc, ood_scores
from conftest import TINY_OVERRIDES, make_dataset, make_image, train_tiny

runner = CliRunner()


def _planted(rng, n, classes=3, dim=16):
    """Features of `classes` clusters in the first dimensions, small noise elsewhere."""
    targets = rng.integers(0, classes, n)
    features = rng.normal(0, 0.05, (n, dim))
    features[np.arange(n), targets] += 1.0
    return features.astype(np.float32), targets


def test_a_planted_cluster_is_rejected_by_the_feature_scores_where_the_softmax_score_fails():
    """Out-of-distribution features that push class 0's logit far up (the softmax is surest on them) but
    point where no training image does: MSP ranks them above the real images, kNN and Mahalanobis below."""
    rng = np.random.default_rng(0)
    head = np.eye(3, 16, dtype=np.float32) * 4.0  # logits = features @ head.T
    train_features, train_targets = _planted(rng, 300)
    inside, _ = _planted(rng, 100)
    outside = rng.normal(0, 0.05, (40, 16)).astype(np.float32)
    outside[:, 0] += 3.0
    outside[:, 8:] += rng.normal(0, 2.0, (40, 8))
    bank = fit_bank(train_features, train_targets, 3, k=5)
    msp_in, msp_out = ood_scores(inside @ head.T)["msp"], ood_scores(outside @ head.T)["msp"]
    assert auroc(msp_in, msp_out) < 0.5
    for score in ("knn", "mahalanobis"):
        found = bank.scores(inside)[score], bank.scores(outside)[score]
        assert auroc(*found) > 0.99, score


def test_mahalanobis_stays_exact_when_the_features_barely_vary():
    """Near-constant features (a small or collapsed model) give a precision matrix with entries in the
    thousands: the distance must still be the plain squared difference, as float64 computes it."""
    rng = np.random.default_rng(3)
    base = rng.normal(size=32)
    features = (base + rng.normal(0, 1e-3, (200, 32))).astype(np.float32)
    targets = rng.integers(0, 3, 200)
    bank = fit_bank(features, targets, 3, k=5)
    assert np.abs(bank.precision).max() > 1e3
    query = (base + rng.normal(0, 2e-3, (50, 32))).astype(np.float32)
    unit = query / np.linalg.norm(query, axis=1, keepdims=True)
    differences = unit[:, None, :].astype(np.float64) - bank.means[None].astype(np.float64)
    exact = -np.einsum("ncd,de,nce->nc", differences, bank.precision.astype(np.float64), differences).min(1)
    assert np.allclose(bank.mahalanobis(query), exact, rtol=1e-4, atol=1e-3)


def test_the_bank_is_tensors_it_loads_without_pickle_and_is_checked(tmp_path):
    rng = np.random.default_rng(1)
    features, targets = _planted(rng, 50)
    bank = fit_bank(features, targets, 3, k=4, size=20)
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_length])  # safetensors: a JSON header, then raw tensors
    assert header["features"]["dtype"] == "F16" and header["features"]["shape"] == [20, 16]
    assert header["__metadata__"]["k"] == "4" and header["__metadata__"]["trained_on"] == "50"
    loaded = load_bank(path, dim=16, classes=3)
    assert np.array_equal(loaded.features, bank.features) and loaded.k == 4
    query = rng.normal(size=(7, 16)).astype(np.float32)
    assert np.allclose(loaded.knn(query), bank.knn(query)) and np.allclose(
        loaded.mahalanobis(query), bank.mahalanobis(query)
    )
    hostile = tmp_path / "hostile.safetensors"
    hostile.write_bytes(pickle.dumps({"features": features}))
    cases = {hostile: "not a readable", path: "do not fit this model"}
    for case, expected in cases.items():
        with pytest.raises(UserError, match=expected):
            load_bank(case, dim=32 if case == path else None)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny run calibrated with an out-of-distribution folder of pictures unlike its classes."""
    root = tmp_path_factory.mktemp("ood")
    data = make_dataset(root / "data", {"train": 10, "validation": 6, "test": 6})
    run = train_tiny(root, data, epochs=4)
    ood = root / "ood"
    for i in range(8):  # yellow, magenta, cyan, grey: none of red, green, blue
        colour = [(220, 220, 40), (220, 40, 220), (40, 220, 220), (128, 128, 128)][i % 4]
        make_image(ood / f"other_{i}.jpg", colour, seed=500 + i)
    report = calibrate(model=run, data=data, workers=0, ood=ood, recall=0.9)
    return run, data, ood, report


def test_calibrate_stores_the_chosen_score_and_its_bank(calibrated):
    run, _, _, report = calibrated
    meta = json.loads((run / "best" / "checkpoint.json").read_text())
    rejection = report.rejection
    assert meta["ood_method"] == rejection["method"] and meta["ood_threshold"] == pytest.approx(rejection["threshold"])
    names = {r["score"] for r in rejection["separation"]}
    assert {"msp", "energy", "mahalanobis", "knn@1", "knn@5", "knn@10", "knn@20"} <= names
    best = min(rejection["separation"], key=lambda r: r["fpr"])
    assert next(r for r in rejection["separation"] if r["score"].startswith(rejection["method"]))["fpr"] == best["fpr"]
    bank = run / "best" / "ood_bank.safetensors"
    assert bank.is_file() and len(load_bank(bank).features) == 30  # every training image
    assert rejection["kept"]["validation"] >= 0.9


def _rejections(path):
    with open(path, newline="") as handle:
        return {row["path"].rsplit("/", 1)[-1]: row["rejected_by"] for row in csv.DictReader(handle)}


def test_predict_auto_says_which_score_rejected_and_exports_keep_the_decision(calibrated, tmp_path):
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    run, data, ood, report = calibrated
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in [*sorted((data / "test").rglob("*.jpg")), *sorted(ood.iterdir())]:
        shutil.copy(path, folder / f"{path.parent.name}_{path.name}")
    by_run = tmp_path / "run.csv"
    run_predict(model=run, inputs=[str(folder)], workers=0, min_confidence="auto", output=by_run)
    decisions = _rejections(by_run)
    assert set(decisions.values()) <= {"", report.rejection["method"]} and any(decisions.values())
    exported = tmp_path / "model.onnx"
    result = runner.invoke(app, ["export", str(run), "-o", str(exported)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model.onnx.ood.safetensors").read_bytes() == (
        run / "best" / "ood_bank.safetensors"
    ).read_bytes()
    models = {"checkpoint": run, "onnx": exported}
    if importlib.util.find_spec("openvino") is not None:
        ir = tmp_path / "ir" / "model.xml"
        ir.parent.mkdir()
        assert runner.invoke(app, ["export", str(run), "-o", str(ir)]).exit_code == 0
        models["openvino"] = ir
    files = sorted(folder.iterdir())
    scores, threshold = {}, None
    for name, path in models.items():
        classifier = load_classifier(path)
        rejector = rejector_for(classifier, "auto")
        threshold = rejector.threshold
        found = model_outputs(classifier, files, workers=0, features=rejector.needs_features)
        scores[name] = rejector.score(found.logits, found.features)
    # the same score wherever the model runs, up to the resize (the checkpoint resizes with torch, the exports
    # with PIL; the tiny model's near-constant features make its Mahalanobis precision large, which scales
    # that difference up with the score: a relative tolerance), and so the same decision on every image not
    # within that difference of the threshold
    for name in models:
        assert np.allclose(scores[name], scores["checkpoint"], rtol=0.02, atol=1e-3), name
        clear = np.abs(scores["checkpoint"] - threshold) > 0.02 * abs(threshold) + 1e-3
        assert np.array_equal((scores[name] < threshold)[clear], (scores["checkpoint"] < threshold)[clear])


def test_a_feature_score_needs_no_temperature_and_a_swapped_bank_is_refused(calibrated, tmp_path):
    run, _, ood, _ = calibrated
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    checkpoint = copy / "best" / "checkpoint.json"
    meta = json.loads(checkpoint.read_text())
    checkpoint.write_text(json.dumps({**meta, "ood_method": "knn"}))
    result = runner.invoke(app, ["predict", str(copy), str(ood), "--min-confidence", "auto", "--no-calibration"])
    assert result.exit_code == 0, result.output
    other = fit_bank(np.ones((4, 8), np.float32), np.array([0, 1, 2, 0]), 3, k=1)
    other.save(copy / "best" / "ood_bank.safetensors")
    result = runner.invoke(app, ["predict", str(copy), str(ood), "--min-confidence", "auto"])
    assert result.exit_code == 2 and "SHA-256 differs" in " ".join(result.output.split())


def test_resume_continues_a_file_written_before_the_rejected_by_column(calibrated, tmp_path):
    run, _, ood, _ = calibrated
    files = sorted(ood.iterdir())
    output = tmp_path / "old.csv"
    output.write_text(f"path,label,confidence,error\n{files[0]},red,0.500000,\n")
    run_predict(model=run, inputs=[str(ood)], workers=0, min_confidence="auto", output=output, resume=True)
    rows = list(csv.reader(output.read_text().splitlines()))
    assert rows[0] == ["path", "label", "confidence", "error"] and len(rows) == 1 + len(files)
    assert all(len(row) == 4 for row in rows) and [row[0] for row in rows[1:]] == [str(f) for f in files]


def test_train_calibrates_at_its_end_when_asked(tmp_path):
    data = make_dataset(tmp_path / "data", {"train": 6, "validation": 4, "test": 2})
    ood = tmp_path / "ood"
    for i in range(4):
        make_image(ood / f"other_{i}.jpg", (220, 220, 40), seed=900 + i)
    command = ["train", "--data", str(data), "--output-dir", str(tmp_path / "runs"), "--name", "r", "--epochs", "1",
               *[a for kv in TINY_OVERRIDES for a in ("--set", kv)]]  # fmt: skip
    missing = runner.invoke(app, [*command, "--calibrate-ood", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no images found" in missing.output and not (tmp_path / "runs").exists()
    result = runner.invoke(app, [*command, "--calibrate-ood", str(ood)])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "runs" / "r" / "best" / "checkpoint.json").read_text())
    assert meta["ood_method"] in ("msp", "energy", "knn", "mahalanobis") and "temperature" in meta
    assert (tmp_path / "runs" / "r" / "best" / "ood_bank.safetensors").is_file()
