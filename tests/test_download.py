import shutil
import zipfile

import pytest
from typer.testing import CliRunner

from clothcli.cli import app
from clothcli.data.download import content_digest, download_dataset
from clothcli.errors import UserError
from conftest import make_dataset


def make_archive(tmp_path):
    src = make_dataset(tmp_path / "src" / "clothing-dataset-small-abc", {"train": 2, "test": 1})
    archive = tmp_path / "ds.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(src.parent.rglob("*")):
            zf.write(path, path.relative_to(src.parent))
    return src, archive


def test_download_from_file_url_with_checksum(tmp_path):
    src, archive = make_archive(tmp_path)
    dest = tmp_path / "out" / "ds"
    seen = []
    download_dataset(
        dest, url=archive.as_uri(), expected_digest=content_digest(src), progress=lambda done, total: seen.append(done)
    )
    assert sorted(p.name for p in dest.iterdir()) == ["test", "train"]
    assert seen and seen[-1] == archive.stat().st_size
    assert content_digest(dest) == content_digest(src)


def test_checksum_mismatch_leaves_nothing(tmp_path):
    _, archive = make_archive(tmp_path)
    dest = tmp_path / "out" / "ds"
    with pytest.raises(UserError, match="checksum mismatch"):
        download_dataset(dest, url=archive.as_uri(), expected_digest="0" * 64)
    assert not dest.exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == []


def test_unreachable_url_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="--data PATH"):
        download_dataset(tmp_path / "ds", url=(tmp_path / "missing.zip").as_uri())


def test_not_a_zip(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_text("hello")
    with pytest.raises(UserError, match="not a zip"):
        download_dataset(tmp_path / "ds", url=bad.as_uri(), expected_digest=None)


def test_cli_download_offline_is_one_line_exit_2(tmp_path, monkeypatch):
    import urllib.request

    def refuse(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    result = CliRunner().invoke(app, ["analyze-data", str(tmp_path / "ds"), "--download"])
    assert result.exit_code == 2
    assert "--data PATH" in result.output and "Traceback" not in result.output
    shutil.rmtree(tmp_path / "ds", ignore_errors=True)
