"""Why a model decides: class-activation maps and their randomisation check, most-confused pairs, and
image-quality issues in analyze-data."""

import csv
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageFilter
from typer.testing import CliRunner

from clothcli.analysis.cam import CLASS_AGNOSTIC, METHODS, CamMaker, find_layer
from clothcli.analysis.cam_check import randomisation_check
from clothcli.cli import app
from clothcli.config import load_config
from clothcli.errors import UserError
from clothcli.metrics import confused_pairs
from clothcli.render.overlays import PANEL_MIN
from clothcli.training import train
from conftest import TINY_OVERRIDES, make_dataset, train_tiny

pytest.importorskip("pytorch_grad_cam", reason="the explain extra (pip install 'clothcli[explain]') is not installed")
runner = CliRunner()

SIZE, PATCH = 128, 32  # the last stage of test_efficientnet is 4 x 4 here: the patch covers a cell or more


def _patch_batch(rng: np.random.Generator, n: int, all_patched: bool = False):
    """Noise images; class 1 has a flat grey square at a random place (flat: a random network does not
    single it out the way it would a bright one), class 0 has none. Returns images, classes, corners."""
    images = rng.uniform(0, 1, (n, 3, SIZE, SIZE)).astype(np.float32)
    classes = np.ones(n, dtype=np.int64) if all_patched else rng.integers(0, 2, n)
    corners = []
    for i in range(n):
        top, left = rng.integers(0, SIZE - PATCH + 1, 2)
        if classes[i]:
            images[i, :, top : top + PATCH, left : left + PATCH] = 0.5
        corners.append((int(top), int(left)))
    return torch.from_numpy((images - 0.5) / 0.25), torch.from_numpy(classes), corners


@pytest.fixture(scope="module")
def patch_model():
    """A tiny timm CNN trained until it finds the patch (a few seconds on 2 cores)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = timm.create_model("test_efficientnet", num_classes=2)
    optimiser = torch.optim.AdamW(model.parameters(), 3e-3)
    model.train()
    for _ in range(40):
        images, classes, _ = _patch_batch(rng, 32)
        loss = torch.nn.functional.cross_entropy(model(images), classes)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    images, classes, corners = _patch_batch(rng, 24, all_patched=True)
    with torch.no_grad():
        assert (model(images).argmax(1) == classes).all()
    return model, images, classes, corners


def test_maps_peak_on_the_planted_patch_and_differ_from_a_random_model(patch_model):
    model, images, classes, corners = patch_model
    layer = find_layer(model, SIZE)
    assert (layer.name, layer.grid) == ("blocks.4", (4, 4))
    half_cell = SIZE // layer.grid[0] // 2  # an upsampled map peaks at a cell's centre
    for method in METHODS:
        with CamMaker(model, layer.name, method) as maker:
            maps = maker.maps(images, classes.tolist())
        assert maps.shape == (len(images), SIZE, SIZE) and maps.min() >= 0 and maps.max() <= 1
        on_patch = 0
        for cam, (top, left) in zip(maps, corners):
            row, col = np.unravel_index(cam.argmax(), cam.shape)
            low, high = -half_cell, PATCH + half_cell
            on_patch += top + low <= row < top + high and left + low <= col < left + high
        assert on_patch >= 0.8 * len(images), (method, on_patch)
        whole = method == "gradcam"  # the whole cascade once; the others as far as the verdict and one more
        check = randomisation_check(model, layer.name, method, images, classes.tolist(), depth=None if whole else 5)
        groups = [step.group for step in check.steps]
        assert groups[:5] == ["classifier", "bn2", "conv_head", "blocks.4", "blocks.3"]
        assert len(groups) == 5 or groups[-1] == "conv_stem"
        assert groups[check.verdict_step] == "blocks.4"
        if method in CLASS_AGNOSTIC:  # EigenCAM reads the layer's activations only: the head cannot change it
            assert all(step.spearman == pytest.approx(1.0) for step in check.steps[: check.verdict_step])
            assert check.spearman < 0.9
        else:
            assert check.passed and check.spearman < 0.5, (method, check.spearman)


def test_the_map_layer_is_the_last_feature_stage_and_token_layers_are_refused():
    model = timm.create_model("test_efficientnet", num_classes=3)
    assert find_layer(model, 64).name == "blocks.4"
    assert find_layer(model, 64, "blocks.3").grid == (4, 4)
    with pytest.raises(UserError, match="--cam-layer: .* has no module 'blocks.9'"):
        find_layer(model, 64, "blocks.9")
    vit = timm.create_model("test_vit", num_classes=3)
    with pytest.raises(UserError, match="not a map of .* name a convolutional layer with --cam-layer"):
        find_layer(vit, vit.default_cfg["input_size"][-1], arch="test_vit")


def test_confused_pairs_count_both_directions_most_confused_first():
    matrix = [
        [9, 3, 0, 1],
        [4, 7, 0, 0],
        [0, 0, 5, 2],
        [0, 0, 2, 6],
    ]
    pairs = confused_pairs(matrix, ["a", "b", "c", "d"])
    assert [(p["a"], p["b"], p["a_as_b"], p["b_as_a"], p["total"]) for p in pairs] == [
        ("a", "b", 3, 4, 7),
        ("c", "d", 2, 2, 4),
        ("a", "d", 1, 0, 1),
    ]
    assert confused_pairs(matrix, ["a", "b", "c", "d"], top=1) == pairs[:1]
    assert confused_pairs([[3, 0], [0, 2]], ["x", "y"]) == []


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    data = make_dataset(root / "data", {"train": 6, "validation": 3, "test": 3})
    return train_tiny(root, data, epochs=1), data


def test_evaluate_draws_a_map_per_mistake_and_reports_pairs(tiny_run, tmp_path):
    run, data = tiny_run
    out = tmp_path / "cams"
    args = ["evaluate", str(run), str(data), "--workers", "0", "--json", str(tmp_path / "e.json")]
    result = runner.invoke(app, [*args, "--cam", str(out), "--cam-method", "gradcam++"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e.json").read_text())
    wrong = [f for f in report["files"] if f["true"] != f["predicted"]]
    cams = report["cams"]
    assert cams["written"] == cams["mistakes"] == len(wrong) and cams["method"] == "gradcam++"
    with open(out / "cams.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["path"] for r in rows) == sorted(f["path"] for f in wrong)
    for row in rows:
        picture = Image.open(out / row["overlay"])
        assert picture.width > 2 * PANEL_MIN + 8  # photo, predicted class's map, true class's map
    assert sum(p["total"] for p in report["confused_pairs"]) == len(wrong)
    assert "Most-confused pairs" in result.output or not wrong
    every = runner.invoke(app, [*args, "--cam", str(tmp_path / "all"), "--cam-all", "--cam-method", "eigencam"])
    assert every.exit_code == 0, every.output
    assert len(list((tmp_path / "all").glob("*.jpg"))) == len(report["files"])


def test_bad_map_requests_are_one_line(tiny_run, tmp_path, monkeypatch):
    run, data = tiny_run
    base = ["evaluate", str(run), str(data), "--workers", "0", "--cam", str(tmp_path / "c")]
    vit_overrides = [o for o in TINY_OVERRIDES if not o.startswith("model.name")]
    vit_settings = [*vit_overrides, "model.name=test_vit", "train.epochs=1", f"data.root={data}"]
    vit = train(load_config(None, [*vit_settings, f"output_dir={tmp_path / 'vit'}"])).run_dir
    cases = {
        "unknown --cam-method 'smoothgrad'": [*base, "--cam-method", "smoothgrad"],
        "has no module 'head.fc'": [*base, "--cam-layer", "head.fc"],
        "not a map of (channels, height, width): name a convolutional layer with --cam-layer": [
            "evaluate", str(vit), str(data), "--workers", "0", "--cam", str(tmp_path / "c"),
        ],
    }  # fmt: skip
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    from clothcli.engines.export import export_onnx

    exported = tmp_path / "tiny.onnx"
    export_onnx(checkpoint=run, output=exported)
    cases["class-activation maps need gradients"] = ["evaluate", str(exported), str(data), "--cam", str(tmp_path / "d")]
    for expected, args in cases.items():
        result = runner.invoke(app, args)
        output = " ".join(result.output.split())
        assert result.exit_code == 2 and expected in output, (args, result.output)
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 3
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
    import clothcli.analysis.cam as cam

    monkeypatch.setattr(cam, "require_grad_cam", lambda: cam.require_packages(("no_such_grad_cam",), "maps", "x"))
    monkeypatch.setattr("clothcli.engines.explain.require_grad_cam", cam.require_grad_cam)
    missing = runner.invoke(app, base)
    assert missing.exit_code == 2 and "needs no_such_grad_cam" in missing.output


def _textured(path, seed, size=(96, 80), brightness=1.0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3)).astype(np.float64) * brightness
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)


def test_analyze_data_lists_dark_and_blurred_images(tmp_path):
    pytest.importorskip("cleanvision", reason="the data extra is not installed")
    data = tmp_path / "data"
    seed = 0
    for split, n in (("train", 10), ("validation", 3), ("test", 3)):
        for label in ("a", "b"):
            for i in range(n):
                seed += 1
                _textured(data / split / label / f"{i}.png", seed)
    _textured(data / "train" / "a" / "dark.png", 100, brightness=0.08)
    # a soft radial glow, blurred: no edge anywhere, yet grey levels spread wide (cleanvision does not call a
    # narrow histogram blurry: that is a plain image)
    y, x = np.mgrid[0:80, 0:96]
    glow = np.clip(255 * (1 - np.hypot((x - 47.5) / 48, (y - 39.5) / 40) / 1.2), 0, 255)
    blurred = Image.fromarray(np.stack([glow] * 3, -1).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2))
    blurred.save(data / "train" / "b" / "blurred.png")
    _textured(data / "test" / "a" / "wide.png", 102, size=(400, 40))
    out = tmp_path / "audit.json"
    result = runner.invoke(app, ["analyze-data", str(data), "--image-issues", "--json", str(out)])
    assert result.exit_code == 0, result.output
    found = json.loads(out.read_text())["image_issues"]["found"]
    names = {issue: {item["path"].rsplit("/", 1)[-1] for item in items} for issue, items in found.items()}
    assert names["dark"] == {"dark.png"}
    assert "blurred.png" in names["blurry"]
    assert names["odd_aspect_ratio"] == {"wide.png"}
    assert "Image-quality issues" in result.output
