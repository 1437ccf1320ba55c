"""`clothcli serve`: the API answers as `predict` does, refuses bad input and overload with JSON errors
and keeps serving, batches concurrent requests, and stops cleanly on SIGTERM."""

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from PIL import Image
from typer.testing import CliRunner

from clothcli.cli import app
from clothcli.engines.predict import run_predict
from conftest import make_dataset, train_tiny

pytest.importorskip("fastapi", reason="the serve extra is not installed")
from fastapi.testclient import TestClient

from clothcli.engines.server import ServeOptions, create_app

runner = CliRunner()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    data = make_dataset(root / "data", {"train": 8, "validation": 3, "test": 3})
    return train_tiny(root, data, epochs=3), data


def _predicted(model, files, tmp_path):
    out = tmp_path / "predict.csv"
    run_predict(model=model, inputs=[str(f) for f in files], workers=0, top_k=3, output=out)
    with open(out, newline="") as handle:
        return {os.path.basename(row["path"]): row for row in csv.DictReader(handle)}


def _check_same(answers, expected):
    for found in answers:
        row = expected[found["file"]]
        assert found["label"] == row["label"]
        for k, entry in enumerate(found["top_k"], start=1):
            suffix = "" if k == 1 else f"_{k}"
            assert entry["label"] == row[f"label{suffix}"]
            assert abs(entry["probability"] - float(row[f"confidence{suffix}"])) <= 1e-4


@pytest.mark.parametrize("kind", ["checkpoint", "onnx"])
def test_answers_equal_predict_on_the_same_files(served, tmp_path, kind):
    run, data = served
    model = run
    if kind == "onnx":
        pytest.importorskip("onnxruntime", reason="the export extra is not installed")
        model = tmp_path / "model.onnx"
        assert runner.invoke(app, ["export", str(run), "-o", str(model)]).exit_code == 0
    files = sorted((data / "test").rglob("*.jpg"))
    expected = _predicted(model, files, tmp_path)
    with TestClient(create_app(model, ServeOptions(top_k=3))) as client:
        assert client.get("/health").json()["status"] == "ready"
        described = client.get("/model").json()
        assert described["classes"] == ["blue", "green", "red"] and described["format"] in ("pytorch", "onnx")
        assert "/predict" in client.get("/openapi.json").json()["paths"]
        response = client.post("/predict", files=[("file", (f.name, f.read_bytes(), "image/jpeg")) for f in files])
        assert response.status_code == 200, response.text
        answers = response.json()["results"]
        assert [a["file"] for a in answers] == [f.name for f in files]
        _check_same(answers, expected)
        raw = client.post("/predict", content=files[0].read_bytes(), headers={"content-type": "image/jpeg"})
        assert raw.json()["results"][0]["top_k"] == answers[0]["top_k"]
        assert "clothcli" in client.get("/").text


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (20000, 10000)).save(buffer, "PNG")  # 200 million pixels, a few kilobytes
    return buffer.getvalue()


def test_bad_input_and_overload_are_json_errors_and_the_server_keeps_serving(served):
    run, data = served
    good = sorted((data / "test").rglob("*.jpg"))[0].read_bytes()
    options = ServeOptions(max_body_bytes=200_000, max_files=3, max_queue=4)
    with TestClient(create_app(run, options)) as client:

        def post(*files, **kwargs):
            parts = [("file", (f"f{i}.jpg", b, "image/jpeg")) for i, b in enumerate(files)]
            return client.post("/predict", files=parts, **kwargs)

        cases = {
            413: post(b"\xff" * 300_000),
            400: post(b"not an image at all"),
        }
        for status, response in cases.items():
            assert response.status_code == status and "error" in response.json(), response.text
        assert "truncated" in post(good[: len(good) // 2]).json()["error"]
        assert "decompression bomb" in post(_bomb()).json()["error"]
        assert "too many files" in post(good, good, good, good).json()["error"]
        assert "no image" in client.post("/predict", content=b"").json()["error"]
        chunked = client.post("/predict", content=iter([b"\xff" * 150_000, b"\xff" * 150_000]))
        assert chunked.status_code == 413
        assert post(good).status_code == 200  # still serving
        stats = client.get("/stats").json()
        assert stats["errors"]["bad_image"] == 3 and stats["errors"]["too_many_files"] == 1
    with TestClient(create_app(run, ServeOptions(max_queue=2, max_files=5))) as client:
        busy = client.post("/predict", files=[("file", (f"f{i}.jpg", good, "image/jpeg")) for i in range(3)])
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert client.post("/predict", files=[("file", ("a.jpg", good, "image/jpeg"))]).status_code == 200
    with TestClient(create_app(run, ServeOptions(timeout_s=1e-6))) as client:
        late = client.post("/predict", files=[("file", ("a.jpg", good, "image/jpeg"))])
        assert late.status_code == 504 and "no answer within" in late.json()["error"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(model, *options):
    """`clothcli serve` in a process of its own on a free port, ready; its base URL. SIGTERM at the end,
    which must end it with exit code 0."""
    port = _free_port()
    command = [sys.executable, "-m", "clothcli", "serve", str(model), "--port", str(port), *options]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if json.loads(urllib.request.urlopen(base + "/health", timeout=1).read())["status"] == "ready":
                    break
            except OSError:
                time.sleep(0.1)
        yield base
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    assert code == 0, server.stderr.read()[-2000:]


def test_a_real_server_batches_concurrent_requests_and_stops_on_sigterm(served):
    run, data = served
    with running_server(run, "--batch-wait-ms", "100") as base:
        body = sorted((data / "test").rglob("*.jpg"))[0].read_bytes()
        statuses = []

        def post() -> None:
            request = urllib.request.Request(base + "/predict", data=body, headers={"Content-Type": "image/jpeg"})
            statuses.append(urllib.request.urlopen(request, timeout=30).status)

        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as dropped:  # a client gone mid-upload
            dropped.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                            b"Content-Length: 100000\r\n\r\n" + body[:100])  # fmt: skip
        threads = [threading.Thread(target=post) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses == [200] * 8
        sizes = json.loads(urllib.request.urlopen(base + "/stats", timeout=5).read())["batch_sizes"]
        assert max(int(size) for size in sizes) > 1  # requests that arrived together shared a model call


class DevTools:
    """Headless Chromium driven over its DevTools protocol (one page, one websocket)."""

    def __init__(self, profile):
        from websockets.sync.client import connect

        port = _free_port()
        self.browser = subprocess.Popen(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={port}",
             f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        pages = []
        for _ in range(300):
            try:
                listed = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=1).read())
                pages = [t for t in listed if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        self.socket = connect(pages[0]["webSocketDebuggerUrl"], max_size=None)
        self.next_id = 0

    def call(self, method, **params):
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message.get("result", {})

    def evaluate(self, expression):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression, seconds=60):
        deadline = time.time() + seconds
        while time.time() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")

    def close(self):
        self.socket.close()
        self.browser.terminate()
        self.browser.wait(timeout=30)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed (apt-get install chromium)")
def test_the_page_classifies_a_picked_photo_in_chromium(served, tmp_path):
    """A real headless Chromium opens the page, a photo is picked in its file input, and the answer the
    page shows is the API's."""
    pytest.importorskip("websockets", reason="websockets (the test extra) drives Chromium")
    run, data = served
    photo = sorted((data / "test").rglob("*.jpg"))[0]
    with running_server(run, "--top-k", "3") as base:
        expected = json.loads(
            urllib.request.urlopen(
                urllib.request.Request(
                    base + "/predict", data=photo.read_bytes(), headers={"Content-Type": "image/jpeg"}
                ),
                timeout=30,
            ).read()
        )
        browser = DevTools(tmp_path / "profile")
        try:
            browser.call("Page.enable")
            browser.call("Page.navigate", url=base + "/")
            browser.wait_for("document.readyState === 'complete' && document.getElementById('files') !== null")
            browser.wait_for("document.getElementById('model').textContent.includes('classes')")
            document = browser.call("DOM.getDocument")
            node = browser.call("DOM.querySelector", nodeId=document["root"]["nodeId"], selector="#files")
            browser.call("DOM.setFileInputFiles", nodeId=node["nodeId"], files=[str(photo)])
            status = browser.wait_for(
                "document.querySelector('.card') && document.querySelector('.card').dataset.status"
            )
            assert status == "done"
            label = browser.evaluate("document.querySelector('.card').dataset.label")
            bars = browser.evaluate("[...document.querySelectorAll('.card .bar .name')].map(e => e.textContent)")
        finally:
            browser.close()
    found = expected["results"][0]
    assert label == found["label"] and bars == [entry["label"] for entry in found["top_k"]]


def test_serve_bad_options_are_one_line(served, tmp_path):
    run, _ = served
    cases = {
        "no stored rejection threshold": ["serve", str(run), "--min-confidence", "auto"],
        "model not found": ["serve", str(tmp_path / "missing.onnx")],
        "between 0 and 1": ["serve", str(run), "--min-confidence", "2"],
    }
    for expected, args in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and expected in " ".join(result.output.split()), result.output


def test_the_load_benchmark_runs_and_every_answer_is_checked(served, tmp_path):
    """benchmarks/serve_load.py in a few seconds: its table, no 5xx, no wrong answers, bad files all 4xx."""
    run, data = served
    out = tmp_path / "load.json"
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "serve_load.py")
    command = [sys.executable, script, str(run), "--data", str(data / "test"), "--clients", "4", "--seconds", "2",
               "--bad-share", "0.2", "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "images/s" in done.stdout and "predict command" in done.stdout
    for row in json.loads(out.read_text())["rows"].values():
        assert row["mismatches"] == 0 and row["images_per_s"] > 0 and row["exit_code"] == 0
        assert not any(status.startswith("5") for status in row["statuses"]) and row["bad"]["other"] == 0
