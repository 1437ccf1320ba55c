"""The benchmarks run in a tiny mode in CI: they must produce their table, not a speed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_throughput.py", "predict_throughput.py"])
def test_benchmark_tiny_mode(script, tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "images/s" in proc.stdout and out.is_file()
    if script == "train_throughput.py":
        splits = [r["time_split_seconds"] for r in json.loads(out.read_text())["results"] if "time_split_seconds" in r]
        assert splits and all(s["train"] > 0 and s["validation"] > 0 for s in splits)
