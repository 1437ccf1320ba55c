import re

from typer.testing import CliRunner

from clothcli import __version__
from clothcli.cli import app

runner = CliRunner()
COMMANDS = ["analyze-data", "tune", "train", "evaluate", "flops", "rf", "predict"]


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_help_lists_commands_with_summaries():
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in COMMANDS:
        line = next(line for line in plain(result.output).splitlines() if f" {name} " in line)
        assert len(line.split(name, 1)[1].strip(" │")) > 10


def test_every_option_is_documented_with_default():
    for name in COMMANDS:
        result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "250"})
        assert result.exit_code == 0
        text = plain(result.output)
        options = [line for line in text.splitlines() if line.strip("│ ").startswith("--") and "--help" not in line]
        assert options, name
        for line in options:
            body = line.strip("│ ")
            assert re.search(r"\w{3,} \w{3,}", body) and "[default:" in body, (name, line)


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_python_dash_m(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "clothcli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and __version__ in proc.stdout


def test_out_of_range_option_exit_2(tiny_dataset):
    result = runner.invoke(app, ["analyze-data", str(tiny_dataset), "--workers", "0"])
    assert result.exit_code == 2
