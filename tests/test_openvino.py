"""The OpenVINO backend: `export -o model.xml`, and predict, evaluate, calibrate and compare through it."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from clothcli.backends import load_classifier
from clothcli.cli import app
from clothcli.engines.evaluate import evaluate
from clothcli.engines.predict import predict_files
from conftest import make_dataset, train_tiny

pytest.importorskip("onnxruntime", reason="the export extra is not installed")
pytest.importorskip("openvino", reason="the openvino extra (pip install 'clothcli[openvino]') is not installed")

from clothcli.backends.openvino_runtime import OpenVinoClassifier
from clothcli.engines.export import export_onnx

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("openvino")
    data = make_dataset(root / "data", {"train": 8, "validation": 3, "test": 3})
    run = train_tiny(root, data, epochs=4)
    xml, onnx = root / "ir" / "tiny.xml", root / "tiny.onnx"
    xml.parent.mkdir()
    report = export_onnx(checkpoint=run, output=xml, verify_data=data)
    export_onnx(checkpoint=run, output=onnx)
    return run, data, xml, onnx, report


def test_the_ir_verifies_and_carries_the_checkpoint(exported):
    run, _, xml, _, report = exported
    check = report.verification
    assert check.passed and check.top1_agreement == 1.0 and check.max_abs_diff <= 1e-4 * max(1.0, check.logit_scale)
    assert sorted(p.name for p in xml.parent.iterdir()) == ["tiny.bin", "tiny.xml"]  # nothing left behind
    assert report.bytes == xml.stat().st_size + xml.with_suffix(".bin").stat().st_size
    model = OpenVinoClassifier(xml)
    meta = json.loads((run / "best" / "checkpoint.json").read_text())
    assert model.classes == meta["classes"] and model.meta["preprocess"] == meta["preprocess"]
    assert model.has_features and model.schema_version == 1
    for graph in (model.pixel_graph, model.compiled):  # what predict runs, and the float graph export verifies
        assert graph.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"


def test_openvino_and_onnx_runtime_agree_on_every_image(exported):
    _, data, xml, onnx, _ = exported
    files = sorted(data.rglob("*.jpg"))
    by_openvino = list(predict_files(load_classifier(xml), files, batch_size=4, workers=0, top_k=3))
    by_onnx = list(predict_files(load_classifier(onnx), files, batch_size=4, workers=0, top_k=3))
    assert [p.labels for p in by_openvino] == [p.labels for p in by_onnx]
    for a, b in zip(by_openvino, by_onnx):
        assert np.allclose(a.probs, b.probs, atol=1e-4)
    options = {"data": data, "split": "test", "workers": 0, "tta_flip": True}
    by_ir, by_file = evaluate(model=xml, **options).files, evaluate(model=onnx, **options).files
    assert [(f["path"], f["predicted"]) for f in by_ir] == [(f["path"], f["predicted"]) for f in by_file]
    assert [f["confidence"] for f in by_ir] == pytest.approx([f["confidence"] for f in by_file], abs=1e-4)


def test_bf16_is_its_own_precision(exported):
    _, _, xml, _, _ = exported
    bf16 = OpenVinoClassifier(xml, precision="bf16")
    assert bf16.quantization == "bf16" and OpenVinoClassifier(xml).quantization == ""


def test_calibrate_writes_into_the_ir_and_compare_times_it_apart(exported, tmp_path):
    run, data, xml, onnx, _ = exported
    copy = tmp_path / "copy.xml"
    shutil.copy(xml, copy)
    shutil.copy(xml.with_suffix(".bin"), copy.with_suffix(".bin"))
    result = runner.invoke(app, ["calibrate", str(copy), "--data", str(data), "--workers", "0"])
    assert result.exit_code == 0, result.output
    stored = OpenVinoClassifier(copy)
    assert stored.temperature != 1.0 and stored.meta["temperature_fitted_on"] == "validation"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.bin", "copy.xml"]
    from clothcli.engines.compare import compare_models

    rows = compare_models(models=[run, onnx, xml], data=data, split="test", use_cache=False).rows
    assert [r.name for r in rows] == [run.name, "tiny.onnx", "tiny.xml"] and len({r.ms_batch1 for r in rows}) == 3


def test_predict_on_an_ir_never_imports_torch(exported, tmp_path):
    _, data, xml, _, _ = exported
    script = (
        "import sys\nfrom clothcli.cli import app\n"
        "try:\n    app(sys.argv[1:], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        "print('LOADED', [m for m in ('torch', 'timm', 'torchvision') if m in sys.modules])\n"
    )
    out = tmp_path / "p.csv"
    done = subprocess.run([sys.executable, "-c", script, "predict", str(xml), str(data / "test"), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "LOADED []" and len(out.read_text().splitlines()) == 10


def test_bad_irs_are_one_line(exported, tmp_path):
    _, data, xml, _, _ = exported
    lonely = tmp_path / "lonely.xml"
    shutil.copy(xml, lonely)  # no .bin beside it
    garbage = tmp_path / "garbage.xml"
    garbage.write_text("<not an IR/>")
    shutil.copy(xml.with_suffix(".bin"), garbage.with_suffix(".bin"))
    for path, expected in ((lonely, "weights file"), (garbage, "not a readable OpenVINO model")):
        result = runner.invoke(app, ["predict", str(path), str(data / "test")])
        assert result.exit_code == 2 and expected in " ".join(result.output.split()), result.output


def test_an_ir_with_unnamed_outputs_still_runs(exported, tmp_path):
    """Converters that trace a bare module (NNCF's fine-tuned models, for one) leave the outputs unnamed."""
    import openvino as ov

    _, data, xml, _, _ = exported
    model = ov.Core().read_model(str(xml))
    for output in model.outputs:
        output.get_tensor().set_names(set())
    unnamed = tmp_path / "unnamed.xml"
    ov.save_model(model, str(unnamed), compress_to_fp16=False)
    result = runner.invoke(app, ["predict", str(unnamed), str(data / "test")])
    assert result.exit_code == 0, result.output
    assert OpenVinoClassifier(unnamed).output_names == ["output0", "output1"]


def test_int8_ir_through_nncf(exported, tmp_path, monkeypatch):
    """`--int8` on a .xml output quantizes the IR with NNCF beside it, with the checkpoint's metadata."""
    pytest.importorskip("nncf", reason="NNCF (the openvino extra) is not installed")
    run, data, _, _, _ = exported
    xml = tmp_path / "ir" / "m.xml"
    xml.parent.mkdir()
    report = export_onnx(checkpoint=run, output=xml, int8=True, int8_data=data)
    int8_xml = xml.parent / "m.int8.xml"
    assert report.int8.path == str(int8_xml)
    assert sorted(p.name for p in xml.parent.iterdir()) == ["m.bin", "m.int8.bin", "m.int8.xml", "m.xml"]
    assert report.int8.bytes == int8_xml.stat().st_size + int8_xml.with_suffix(".bin").stat().st_size
    quantized = load_classifier(int8_xml)
    assert quantized.meta["quantization"] == "int8 NNCF" and quantized.classes == load_classifier(xml).classes
    assert 0.0 <= report.int8.int8_accuracy <= 1.0 and report.int8.images == 9
    ops = {op.get_type_name() for op in quantized.model.get_ops()}
    assert "FakeQuantize" in ops  # quantized, not the fp32 graph again
    monkeypatch.setitem(sys.modules, "nncf", None)
    command = ["export", str(run), "-o", str(tmp_path / "n.xml"), "--int8", "--int8-data", str(data)]
    missing = runner.invoke(app, command)
    assert missing.exit_code == 2 and "clothcli[openvino]" in missing.output
    assert not (tmp_path / "n.xml").exists()  # checked before anything is written


def test_quantization_aware_int8_runs_int8_with_any_batch(exported, tmp_path):
    """`--qat-epochs` fine-tunes NNCF's quantized PyTorch model and writes it as an IR through ONNX: quantized,
    with the checkpoint's metadata and a dynamic batch dimension."""
    pytest.importorskip("nncf", reason="NNCF (the openvino extra) is not installed")
    run, data, _, _, _ = exported
    xml = tmp_path / "m.xml"
    args = ["export", str(run), "-o", str(xml), "--int8", "--calibration", str(data), "--qat-epochs", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "fine-tuned quantization-aware (1 epochs)" in " ".join(result.output.split())
    assert ", int8 in " in result.output  # the fine-tuning's minutes are not hidden behind the fp32 export's seconds
    quantized = load_classifier(tmp_path / "m.int8.xml")
    assert quantized.meta["quantization"] == "int8 NNCF QAT" and quantized.classes == load_classifier(xml).classes
    assert "FakeQuantize" in {op.get_type_name() for op in quantized.model.get_ops()}
    assert quantized.has_features and sorted(p.name for p in tmp_path.iterdir()) == [
        "m.bin", "m.int8.bin", "m.int8.xml", "m.xml",
    ]  # fmt: skip
    batch = np.random.default_rng(0).integers(0, 256, (5, *[quantized.preprocess.input_size] * 2, 3), dtype=np.uint8)
    logits, features = quantized.infer_pixels(batch, features=True)
    assert logits.shape == (5, len(quantized.classes)) and len(features) == 5
    for bad, expected in {
        ("-o", str(tmp_path / "q.xml"), "--qat-epochs", "2"): "give --int8 and an .xml output",
        ("-o", str(tmp_path / "q.onnx"), "--int8", "--calibration", str(data), "--qat-epochs", "2"): "an .xml output",
        ("-o", str(tmp_path / "q.xml"), "--qat-epochs", "-1"): "greater than or equal to 0",
    }.items():
        refused = runner.invoke(app, ["export", str(run), *bad])
        assert refused.exit_code == 2 and expected in " ".join(refused.output.split()), refused.output
    assert not (tmp_path / "q.xml").exists() and not (tmp_path / "q.onnx").exists()


def test_benchmark_puts_every_format_side_by_side(exported, tmp_path):
    """Run as a user runs it, in a process of its own: in this long test process, after the IR rewrite of
    the calibrate test, one more OpenVINO compilation crashed (a segfault inside OpenVINO)."""
    run, data, _, _, _ = exported
    out = tmp_path / "b.json"
    command = [sys.executable, "-m", "clothcli", "benchmark", str(run), "--data", str(data), "--workers", "0",
               "--split", "validation,test"]  # fmt: skip
    wide = {**os.environ, "COLUMNS": "200"}
    result = subprocess.run([*command, "--json", str(out)], capture_output=True, text=True, timeout=300, env=wide)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    names = [row["name"] for row in report["rows"]]
    assert names == ["pytorch", "onnx", "onnx-int8", "openvino", "openvino-bf16", "openvino-int8"]
    assert report["split"] == "validation,test"
    reference = report["rows"][0]
    assert reference["agreement"] == 1.0 and reference["p_value"] == 1.0 and reference["bytes"] is None
    for row in report["rows"]:
        assert row["n"] == 18 and 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["p_value"] <= 1.0
        assert row["ms_batch1"] > 0 and row["images_per_s_batch64"] > 0 and row["predict_images_per_s"] > 0
    assert report["rows"][1]["agreement"] == 1.0 and report["rows"][3]["agreement"] == 1.0  # fp32 formats
    assert report["rows"][2]["bytes"] < report["rows"][1]["bytes"]  # int8 weights are smaller
    assert report["rows"][5]["bytes"] < report["rows"][3]["bytes"]
    assert report["decode_images_per_s"] > 0 and report["preprocess_images_per_s"] > 0
    assert "decode only" in result.stdout and "decode and preprocess" in result.stdout
    bad = runner.invoke(app, ["benchmark", str(run), "--data", str(data), "--formats", "onnx,tflite"])
    assert bad.exit_code == 2 and "unknown format" in bad.output


def test_predict_and_evaluate_in_bf16(exported, tmp_path):
    run, data, xml, _, _ = exported
    rows = {}
    for precision in ("f32", "bf16"):
        out = tmp_path / f"{precision}.csv"
        result = runner.invoke(app, ["predict", str(xml), str(data / "test"), "-o", str(out), "--precision", precision])
        assert result.exit_code == 0, result.output
        rows[precision] = out.read_text().splitlines()
    assert len(rows["bf16"]) == len(rows["f32"]) == 10
    result = runner.invoke(app, ["evaluate", str(xml), str(data), "--precision", "bf16", "--workers", "0"])
    assert result.exit_code == 0, result.output
    cases = {"applies to OpenVINO": (run, "bf16"), "f32 or bf16": (xml, "fp8")}
    for expected, (model, precision) in cases.items():
        bad = runner.invoke(app, ["predict", str(model), str(data / "test"), "--precision", precision])
        assert bad.exit_code == 2 and expected in bad.output


def test_the_graph_normalises_uint8_crops_as_numpy_does(exported):
    _, _, xml, onnx, _ = exported
    model, by_onnx = OpenVinoClassifier(xml), load_classifier(onnx)
    side = model.preprocess.input_size
    crops = np.random.default_rng(0).integers(0, 256, (3, side, side, 3), dtype=np.uint8)
    in_graph, in_numpy = model.infer_pixels(crops, features=True), model.infer(model.preprocess.normalise(crops), True)
    assert model.feeds_pixels and not by_onnx.feeds_pixels

    def close(a: np.ndarray, b: np.ndarray) -> bool:  # as export verifies: relative to the largest value
        return float(np.abs(a - b).max()) <= 1e-4 * max(1.0, float(np.abs(b).max()))

    assert close(in_graph[0], in_numpy[0]) and close(in_graph[1], in_numpy[1])
    assert close(by_onnx.infer_pixels(crops)[0], in_numpy[0])
