"""Inputs by list and sharded predict: every process a share, one merged file identical to one process's."""

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clothcli.cli import app
from clothcli.data.inputs import read_input_list
from clothcli.engines.export import export_onnx
from clothcli.engines.predict import run_predict
from clothcli.engines.sharding import Shard, part_path, parts_dir
from clothcli.errors import UserError
from conftest import make_dataset, train_tiny

runner = CliRunner()


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    """A tiny run exported to ONNX (processes start in a fraction of a second), and its dataset."""
    root = tmp_path_factory.mktemp("shard")
    data = make_dataset(root / "data", {"train": 6, "validation": 2, "test": 5})
    path = root / "tiny.onnx"
    export_onnx(checkpoint=train_tiny(root, data, epochs=2), output=path)
    return path, data


def one_process(model: Path, data: Path, out: Path, **options) -> bytes:
    run_predict(model=model, inputs=[str(data)], output=out, shard=Shard(), **options)
    return out.read_bytes()


def test_shard_from_the_launchers_environment():
    assert Shard.from_env({}) == Shard(0, 1, 1)
    assert Shard.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}) == Shard(3, 4, 2)
    assert list(Shard(1, 3).positions(8)) == [1, 4, 7]
    for env in ({"WORLD_SIZE": "two"}, {"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "0", "WORLD_SIZE": "0"}):
        with pytest.raises(UserError):
            Shard.from_env(env)


def test_input_list_keeps_its_order_and_its_folder(tmp_path):
    (tmp_path / "lists").mkdir()
    listing = tmp_path / "lists" / "todo.txt"
    listing.write_text("# catalogue\nb.jpg\n\na.jpg\nsub/../b.jpg\n../outside.jpg\n/etc/passwd\n")
    found = read_input_list(listing)
    assert [Path(p).name for p in found.files] == ["b.jpg", "a.jpg"]  # list order, the duplicate once
    assert found.files[0] == str(tmp_path / "lists" / "b.jpg")
    assert [line.split(":")[0] for line in found.refused] == ["line 6", "line 7"]  # '..' and absolute outside
    # a wider root lets the absolute path in
    assert "/etc/passwd" in read_input_list(listing, root="/").files
    table = tmp_path / "lists" / "todo.csv"
    table.write_text("path,sku\nx.jpg,1\n,2\n")
    found = read_input_list(table)
    assert [Path(p).name for p in found.files] == ["x.jpg"] and found.refused == ["row 3: no path"]
    table.write_text("file,sku\nx.jpg,1\n")
    with pytest.raises(UserError, match="no 'path' column"):
        read_input_list(table)


def test_predict_from_a_list_in_its_order_with_missing_files_as_rows(onnx_model, tmp_path):
    model, data = onnx_model
    images = sorted((data / "test").rglob("*.jpg"))
    listing = data / "list.txt"
    entries = [str(p.relative_to(data)) for p in reversed(images)] + ["test/gone.jpg"]
    listing.write_text("\n".join(entries) + "\n")
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", str(model), "--from-list", str(listing), "-o", str(out), "--show", "0"])
    assert result.exit_code == 0, result.output
    rows = out.read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == [str(data / e) for e in entries]
    assert "file not found" in rows[-1]
    result = runner.invoke(app, ["predict", str(model), "--list-root", str(data), "-o", str(out)])
    assert result.exit_code == 2 and "--list-root applies to --from-list" in result.output
    result = runner.invoke(app, ["predict", str(model), "-o", str(out)])
    assert result.exit_code == 2 and "give images, folders or --from-list" in result.output


def test_shards_merge_into_the_one_process_file(onnx_model, tmp_path):
    model, data = onnx_model
    single = one_process(model, data, tmp_path / "one.csv", top_k=2)
    out = tmp_path / "two.csv"
    rank1 = run_predict(model=model, inputs=[str(data)], output=out, top_k=2, shard=Shard(1, 2))
    assert not out.exists() and rank1.part == part_path(out, 1)
    rank0 = run_predict(model=model, inputs=[str(data)], output=out, top_k=2, shard=Shard(0, 2))
    assert out.read_bytes() == single and not parts_dir(out).exists()
    assert rank0.merged_rows == rank0.total == rank0.classified == 39 and rank1.total == 19


@pytest.mark.parametrize("kind", ["jsonl", "json"])
def test_merge_renders_every_output_kind_as_one_process(onnx_model, tmp_path, kind):
    model, data = onnx_model
    single = one_process(model, data, tmp_path / f"one.{kind}")
    out = tmp_path / f"three.{kind}"
    for rank in (2, 1, 0):
        run_predict(model=model, inputs=[str(data)], output=out, shard=Shard(rank, 3))
    assert out.read_bytes() == single


def test_resume_after_a_kill_with_another_number_of_processes(onnx_model, tmp_path):
    model, data = onnx_model
    single = one_process(model, data, tmp_path / "one.csv")
    out = tmp_path / "out.csv"
    # three processes ran; rank 0 was killed before it merged, rank 1 in the middle of a row
    run_predict(model=model, inputs=[str(data)], output=out, shard=Shard(1, 3))
    run_predict(model=model, inputs=[str(data)], output=out, shard=Shard(2, 3))
    part = part_path(out, 1)
    lines = part.read_bytes().splitlines(keepends=True)
    part.write_bytes(b"".join(lines[:5]) + lines[5][:20])
    # continued by two processes: rank 1 first, then rank 0, which merges
    resumed = run_predict(model=model, inputs=[str(data)], output=out, resume=True, shard=Shard(1, 2))
    assert resumed.already_done > 0
    run_predict(model=model, inputs=[str(data)], output=out, resume=True, shard=Shard(0, 2))
    assert out.read_bytes() == single


def test_one_process_continues_parts_and_a_one_process_file(onnx_model, tmp_path):
    model, data = onnx_model
    single = one_process(model, data, tmp_path / "one.csv")
    out = tmp_path / "out.csv"
    run_predict(model=model, inputs=[str(data)], output=out, shard=Shard(1, 2))
    summary = run_predict(model=model, inputs=[str(data)], output=out, resume=True, shard=Shard())
    assert out.read_bytes() == single and summary.already_done == 19
    # and a one-process file cut short, continued by two processes
    out.write_bytes(single[: len(single) // 2])
    run_predict(model=model, inputs=[str(data)], output=out, resume=True, shard=Shard(1, 2))
    run_predict(model=model, inputs=[str(data)], output=out, resume=True, shard=Shard(0, 2))
    assert out.read_bytes() == single


def test_parts_of_another_command_are_never_merged(onnx_model, tmp_path):
    model, data = onnx_model
    out = tmp_path / "out.csv"
    run_predict(model=model, inputs=[str(data)], output=out, top_k=2, shard=Shard(1, 2))
    with pytest.raises(UserError, match="written by another command"):
        run_predict(model=model, inputs=[str(data)], output=out, top_k=1, resume=True, shard=Shard(0, 2))
    # without --resume the stale part is waited on, not read: its owner rewrites it
    with pytest.raises(UserError, match="no part from rank"):
        run_predict(model=model, inputs=[str(data)], output=out, top_k=1, shard=Shard(0, 2), wait_s=0.5)


def test_rank_zero_alone_says_the_parts_are_not_visible(onnx_model, tmp_path):
    model, data = onnx_model
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2"}
    cmd = [sys.executable, "-m", "clothcli", "predict", str(model), str(data), "-o", str(tmp_path / "o.csv")]
    done = subprocess.run([*cmd, "--merge-wait", "1"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no part from rank(s) 1" in lines[0] and "every machine shares" in lines[0]


def test_copy_to_from_two_shards_places_every_file_once(onnx_model, tmp_path):
    model, data = onnx_model
    target = tmp_path / "sorted"
    for rank in (1, 0):
        run_predict(model=model, inputs=[str(data / "test")], output=tmp_path / "o.csv", copy_to=target,
                    shard=Shard(rank, 2))  # fmt: skip
    digest = lambda path: hashlib.sha256(path.read_bytes()).hexdigest()  # noqa: E731
    placed = sorted(digest(p) for p in target.rglob("*.jpg"))
    assert placed == sorted(digest(p) for p in (data / "test").rglob("*.jpg"))  # each file once, none lost


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_on_one_give_the_one_process_file(onnx_model, tmp_path):
    model, data = onnx_model
    single = one_process(model, data, tmp_path / "one.csv")
    out = tmp_path / "nodes.csv"
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "clothcli", "predict", str(model), str(data),
               "-o", str(out), "--show", "0"]  # fmt: skip
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    launchers = [subprocess.Popen([*command[:3], "--node-rank", str(rank), *command[3:]], **pipes) for rank in (0, 1)]
    logs = [launcher.communicate(timeout=240)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], logs
    assert out.read_bytes() == single
    assert "rank 1 of 2" in logs[1] and "merged" in logs[0]
    assert not parts_dir(out).exists()  # removed once merged


def test_sharded_benchmark_runs_small(onnx_model, tmp_path):
    model, data = onnx_model
    out = tmp_path / "b.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "sharded_predict.py"
    command = [sys.executable, str(script), str(model), str(data), "--rounds", "1", "--list-rows", "3000",
               "--todo", "5", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["sharded"]["identical_output"] and result["resume"]["rows_after"] == 3000


def test_a_json_array_is_never_resumed(onnx_model, tmp_path):
    model, data = onnx_model
    out = tmp_path / "o.json"
    one_process(model, data, out)
    for shard in (Shard(), Shard(0, 2)):
        with pytest.raises(UserError, match="needs a .csv or .jsonl output"):
            run_predict(model=model, inputs=[str(data)], output=out, resume=True, shard=shard)
