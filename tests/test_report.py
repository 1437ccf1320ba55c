"""`clothcli report`: one self-contained HTML page, checked as data and in a real browser."""

import base64
import io
import json
import re
import shutil
import subprocess

import pytest
from PIL import Image
from typer.testing import CliRunner

from clothcli.cli import app
from clothcli.config import load_config
from clothcli.engines.html_report import build_report
from clothcli.training import train
from conftest import TINY_OVERRIDES, make_dataset

pytest.importorskip("jinja2", reason="the report extra (pip install 'clothcli[report]') is not installed")
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data = make_dataset(root / "data", {"train": 8, "validation": 3, "test": 4})
    cfg = load_config(
        None, [*TINY_OVERRIDES, "train.epochs=3", "optim.lr=0.05", f"data.root={data}", f"output_dir={root / 'runs'}"]
    )
    return train(cfg).run_dir, data


@pytest.fixture(scope="module")
def page(trained, tmp_path_factory):
    run, data = trained
    out = tmp_path_factory.mktemp("page") / "report.html"
    result = build_report(model=run, data=data, output=out, per_class=3, mistakes=5)
    return out, result


def test_report_is_self_contained_with_every_section(page):
    out, result = page
    html = out.read_text(encoding="utf-8")
    assert result.bytes == out.stat().st_size < 10_000_000
    for anchor in ('id="run"', 'id="curves"', 'id="results"', 'id="pairs"', 'id="samples"', 'id="mistakes"',
                   'id="maps"', 'id="embedding"', 'id="audit"'):  # fmt: skip
        assert anchor in html
    sources = re.findall(r'<img[^>]* src="([^"]+)"', html)
    assert len(sources) == result.figures + result.images
    assert result.figures == 3  # curves, confusion matrix, embedding map
    wrong = 12 - round(result.accuracy * 12)
    pairs = len(re.findall(r'<img class="thumb"', html))
    correct_maps = html.count('with its class-activation map"')
    assert result.images == 3 * 3 + min(5, wrong) + pairs + correct_maps
    assert html.count("with its class-activation maps") == min(5, wrong)  # an overlay beside each mistake
    for src in sources:
        kind, payload = src.split(",", 1)
        assert kind in ("data:image/png;base64", "data:image/jpeg;base64")
        Image.open(io.BytesIO(base64.b64decode(payload))).verify()
    assert not re.search(r'(src|href)="(http|//|file:)', html)  # nothing fetched: opens offline from disk
    assert "test_efficientnet" in html


def test_report_without_data_uses_the_runs_dataset_and_skips_the_audit(trained, tmp_path):
    run, _ = trained
    result = build_report(model=run, data=None, output=tmp_path / "r.html", per_class=1, mistakes=0)
    assert not result.audited and 'id="audit"' not in (tmp_path / "r.html").read_text()


def test_report_bad_inputs_are_one_line(trained, tmp_path):
    run, data = trained
    no_best = tmp_path / "no-best"
    no_best.mkdir()
    (no_best / "metrics.csv").write_text("epoch\n")
    other = make_dataset(tmp_path / "other", {"train": 1, "test": 1}, classes=("red", "green", "cyan"))
    cases = {
        "no best/ checkpoint": ["report", str(no_best), str(data), "-o", str(tmp_path / "a.html")],
        "lacks blue; adds cyan": ["report", str(run), str(other), "-o", str(tmp_path / "b.html")],
        "output folder not found": ["report", str(run), str(data), "-o", str(tmp_path / "missing" / "c.html")],
        "must end in .html": ["report", str(run), str(data), "-o", str(tmp_path / "c.pdf")],
        "run folder not found": ["report", str(tmp_path / "nope"), "-o", str(tmp_path / "d.html")],
    }
    for expected, args in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and expected in result.output, (args, result.output)
        assert "Traceback" not in result.output


CHECKER = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || (e.target && e.target.src) || e)), true);
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt);
  document.body.setAttribute("data-check", JSON.stringify({images: images.length, broken, errors: window.__errors}));
});
</script>"""


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_chromium(page, tmp_path):
    """Headless Chromium loads the page from disk: no errors, and every image decodes (naturalWidth > 0)."""
    out, result = page
    probe = tmp_path / "probe.html"
    probe.write_text(out.read_text(encoding="utf-8").replace("<head>", "<head>" + CHECKER, 1), encoding="utf-8")
    proc = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r'data-check="([^"]*)"', proc.stdout)
    assert found, proc.stdout[-2000:]
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert check == {"images": result.figures + result.images, "broken": [], "errors": []}
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert console == [], console
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,2000",
         f"--screenshot={shot}", out.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    assert Image.open(shot).size == (1280, 2000)


def test_report_of_an_exported_model(trained, tmp_path):
    """An .onnx file has no run folder: the page has its results and samples, no training curves."""
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    from clothcli.engines.export import export_onnx

    run, data = trained
    model = tmp_path / "tiny.onnx"
    export_onnx(checkpoint=run, output=model)
    result = runner.invoke(app, ["report", str(model), str(data), "-o", str(tmp_path / "r.html"), "--workers", "0"])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert 'id="results"' in html and 'id="samples"' in html and 'id="curves"' not in html
    assert "tiny.onnx" in html and "training curves" not in result.output
    by_run = build_report(model=run, data=data, output=tmp_path / "run.html", per_class=1, mistakes=0)
    assert f"{by_run.accuracy:.2%}" in " ".join(result.output.split())  # the export scores what its run does
