import json
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

from clothcli.backends import load_classifier
from clothcli.cli import app
from clothcli.config import load_config
from clothcli.engines.calibrate import calibrate, fit_temperature
from clothcli.engines.evaluate import evaluate
from clothcli.engines.predict import predict_files
from clothcli.metrics import calibration
from clothcli.training import train
from conftest import TINY_OVERRIDES

runner = CliRunner()


def test_temperature_scaling_recovers_the_temperature_the_labels_were_drawn_with():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6000, 5, generator=generator) * 3
    targets = torch.multinomial((logits / 2.0).softmax(1), 1, generator=generator).squeeze(1)
    assert fit_temperature(logits, targets) == pytest.approx(2.0, abs=0.1)
    assert calibration(logits, targets, 2.0).nll < calibration(logits, targets).nll


def test_ece_nll_and_brier_on_a_worked_example():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.62, 0.38], [0.38, 0.62]])
    targets = torch.tensor([0, 1, 0, 1])
    result = calibration(probs.log(), targets)
    # bin of 0.9: accuracy 1/2, confidence 0.9; bin of 0.62: accuracy 1, confidence 0.62; half the images each
    assert result.ece == pytest.approx(0.5 * 0.4 + 0.5 * 0.38, abs=1e-6)
    assert result.nll == pytest.approx(-(math.log(0.9) + math.log(0.1) + 2 * math.log(0.62)) / 4, abs=1e-6)
    assert result.brier == pytest.approx((0.02 + 1.62 + 2 * 2 * 0.38**2) / 4, abs=1e-6)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import make_dataset

    root = tmp_path_factory.mktemp("calib")
    data = make_dataset(root / "data")
    cfg = load_config(
        None,
        [*TINY_OVERRIDES, "train.epochs=3", "optim.lr=0.05", "train.label_smoothing=0.3",
         f"data.root={data}", f"output_dir={root / 'runs'}"],
    )  # fmt: skip
    return train(cfg).run_dir, data


def test_calibrate_stores_a_temperature_that_evaluate_and_predict_use(run, tmp_path):
    run_dir, data = run
    weights = (run_dir / "best" / "model.safetensors").read_bytes()
    raw = evaluate(model=run_dir, data=data, split="validation", workers=0)
    assert raw.temperature == 1.0 and set(raw.calibration) == {"ece", "nll", "brier"}
    report = calibrate(model=run_dir, data=data, workers=0)
    assert set(report.splits) == {"validation", "test"}
    assert report.splits["validation"]["after"].nll <= report.splits["validation"]["before"].nll + 1e-6
    meta = json.loads((run_dir / "best" / "checkpoint.json").read_text())
    assert meta["temperature"] == pytest.approx(report.temperature) and meta["temperature_fitted_on"] == "validation"
    assert (run_dir / "best" / "model.safetensors").read_bytes() == weights  # the weights are untouched
    scaled = evaluate(model=run_dir, data=data, split="validation", workers=0)
    assert scaled.temperature == pytest.approx(report.temperature)
    assert scaled.calibration["nll"] == pytest.approx(report.splits["validation"]["after"].nll, abs=1e-4)
    assert [f["predicted"] for f in scaled.files] == [f["predicted"] for f in raw.files]  # T never changes a class
    unscaled = evaluate(model=run_dir, data=data, split="validation", workers=0, calibrated=False)
    assert unscaled.calibration == raw.calibration
    files = sorted((data / "test").rglob("*.jpg"))[:4]
    top = [p.probs[0] for p in predict_files(load_classifier(run_dir), files, workers=0)]
    plain = [p.probs[0] for p in predict_files(load_classifier(run_dir, calibrated=False), files, workers=0)]
    assert top != plain and all(abs(a - b) < 1 for a, b in zip(top, plain))


def test_cli_calibrate_and_its_bad_inputs(run, tmp_path):
    run_dir, data = run
    result = runner.invoke(
        app, ["calibrate", str(run_dir), "--workers", "0", "--dry-run", "--json", str(tmp_path / "c.json")]
    )
    assert result.exit_code == 0, result.output
    assert "Temperature scaling" in result.output and "not stored (--dry-run)" in result.output
    assert json.loads((tmp_path / "c.json").read_text())["temperature"] > 0
    (tmp_path / "only" / "train").mkdir(parents=True)
    bad = runner.invoke(app, ["calibrate", str(run_dir), "--data", str(tmp_path / "only")])
    assert bad.exit_code == 2 and "no validation/ split" in bad.output
    png = tmp_path / "r.png"
    out = runner.invoke(app, ["evaluate", str(run_dir), str(data), "--workers", "0", "--reliability-png", str(png)])
    assert out.exit_code == 0 and "Calibration" in out.output and png.read_bytes()[:4] == b"\x89PNG"


def test_a_perfectly_separated_set_has_auroc_1_and_no_false_positives():
    from clothcli.metrics import separation, threshold_for_recall

    inside = torch.tensor([[8.0, 0.0, 0.0]]).repeat(20, 1) + torch.linspace(0, 1, 20)[:, None]
    outside = torch.zeros(10, 3) + torch.linspace(0, 0.1, 10)[:, None]
    for result in separation(inside, outside, recall=0.95):
        assert result.auroc == pytest.approx(1.0) and result.fpr == 0.0 and result.recall >= 0.95 - 1e-6
    assert threshold_for_recall(torch.arange(100.0), 0.95) == 5.0  # keeps 95 of 100


def test_calibrate_with_ood_stores_the_threshold_predict_auto_rejects_with(run, tmp_path):
    from clothcli.engines.predict import run_predict
    from conftest import make_image

    run_dir, data = run
    ood = tmp_path / "ood"
    for i in range(6):  # grey pictures: none of red, green, blue
        make_image(ood / f"grey_{i}.jpg", (128, 128, 128), seed=100 + i)
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in [*sorted((data / "test").rglob("*.jpg"))[:6], *ood.iterdir()]:
        shutil.copy(path, folder / f"{path.parent.name}_{path.name}")
    no_threshold = runner.invoke(app, ["predict", str(run_dir), str(folder), "--min-confidence", "auto"])
    assert no_threshold.exit_code == 2 and "calibrate RUN --ood" in no_threshold.output.replace("\n", " ")
    report = calibrate(model=run_dir, data=data, workers=0, ood=ood, recall=0.9)
    threshold = json.loads((run_dir / "best" / "checkpoint.json").read_text())["ood_threshold"]
    assert threshold == pytest.approx(report.rejection["threshold"]) and report.rejection["kept"]["validation"] >= 0.9
    sorted_to = tmp_path / "sorted"
    summary = run_predict(model=run_dir, inputs=[str(folder)], workers=0, min_confidence="auto", copy_to=sorted_to)
    unknown = summary.per_class.get("unknown", 0)
    assert unknown > 0 and summary.classified == 12
    assert len(list((sorted_to / "unknown").iterdir())) == unknown
    method = report.rejection["method"]
    uncalibrated = ["predict", str(run_dir), str(folder), "--min-confidence", "auto", "--no-calibration"]
    if method in ("msp", "energy"):  # chosen on calibrated logits
        bad = runner.invoke(app, uncalibrated)
        assert bad.exit_code == 2 and "drop --no-calibration" in bad.output
    else:  # a feature score needs no temperature
        assert runner.invoke(app, uncalibrated).exit_code == 0
    evaluated = evaluate(model=run_dir, data=data, workers=0, ood=ood)
    assert {r["score"] for r in evaluated.ood} == {"msp", "energy", "knn", "mahalanobis"}
    assert all(0 <= r["auroc"] <= 1 for r in evaluated.ood) and evaluated.rejection["method"] == method


def test_the_stored_temperature_survives_a_resume_that_keeps_the_best_weights(run):
    run_dir, data = run
    report = calibrate(model=run_dir, data=data, workers=0)
    before = (run_dir / "best" / "model.safetensors").read_bytes()
    train(None, resume=run_dir)  # the run is complete: nothing is retrained, best/ stays as calibrated
    assert (run_dir / "best" / "model.safetensors").read_bytes() == before
    meta = json.loads((run_dir / "best" / "checkpoint.json").read_text())
    assert meta["temperature"] == pytest.approx(report.temperature)
