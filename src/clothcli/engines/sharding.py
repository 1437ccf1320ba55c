"""Sharded predict: several processes (torchrun, `accelerate launch`, several machines) split one input list.

No process group is needed, so exported models shard without PyTorch: the launcher's RANK and WORLD_SIZE
are enough. Every process collects the same list in the same order and takes the images whose position
modulo WORLD_SIZE is its RANK. Each writes its rows to its own part, `OUT.parts/part-RANK.jsonl`, whose
first line names the command (a digest of the model file, the options and the list). The process of rank
0 then waits for the parts: it reads them as they grow until every image of the list has a row, and writes
the rows in the list's order to OUT (atomically), exactly the file one process would have written, and
removes the parts. A part that stops growing for `wait_s` seconds (a process that died, or parts written
on another machine into a folder this one cannot see) ends the wait with one line.

Rows are keyed by the image's path, so `--resume` after a kill skips every image that has a row in any
part (or in OUT, continued from a one-process run), whatever number of processes wrote them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clothcli.errors import UserError
from clothcli.io_utils import atomic_path, fault_point
from clothcli.predictions import Prediction

PART_VERSION = 1
POLL_S = 0.2


@dataclass(frozen=True)
class Shard:
    """This process's place among the launcher's processes."""

    rank: int = 0
    world: int = 1
    local_world: int = 1  # processes on this machine

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Shard:
        """From RANK, WORLD_SIZE and LOCAL_WORLD_SIZE (torchrun's and accelerate's), or one process."""
        env = os.environ if env is None else env
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            world, rank = int(env["WORLD_SIZE"]), int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_WORLD_SIZE", str(world)))
        except ValueError:
            raise UserError("RANK, WORLD_SIZE and LOCAL_WORLD_SIZE must be whole numbers") from None
        if world < 1 or not 0 <= rank < world or not 1 <= local <= world:
            raise UserError(f"RANK {rank} of WORLD_SIZE {world} (LOCAL_WORLD_SIZE {local}) is not a valid place")
        return cls(rank, world, local)

    def positions(self, n: int) -> range:
        """This shard's positions in a list of n: every world-th, from its rank."""
        return range(self.rank, n, self.world)

    def threads(self) -> int:
        """The CPU threads each process of this machine gets: the cores shared out."""
        return max(1, (os.cpu_count() or 1) // self.local_world)


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def part_path(output: Path, rank: int) -> Path:
    return parts_dir(output) / f"part-{rank:05d}.jsonl"


def command_key(model: str | Path, files: list[str], options: dict[str, Any]) -> str:
    """What a part's rows depend on: the model's files (path, size, modification time), the options and
    the list. Parts of another command are never mixed into an output."""
    digest = hashlib.sha256()
    model = Path(model)
    for path in sorted(model.rglob("*")) if model.is_dir() else [model]:
        if path.is_file():
            info = path.stat()
            digest.update(f"{path}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    digest.update(json.dumps(options, sort_keys=True, default=str).encode())
    digest.update("\n".join(files).encode())
    return digest.hexdigest()


def prediction_record(p: Prediction) -> str:
    return json.dumps(
        {"path": str(p.path), "labels": p.labels, "probs": p.probs, "error": p.error, "rejected_by": p.rejected_by},
        ensure_ascii=False,
    )


def prediction_from(record: dict[str, Any]) -> Prediction:
    return Prediction(
        Path(record["path"]), list(record["labels"]), [float(v) for v in record["probs"]],
        str(record["error"]), rejected_by=str(record["rejected_by"]),
    )  # fmt: skip


@dataclass
class PartReader:
    """One part file read as it grows: complete lines only, from where the last read stopped."""

    path: Path
    key: str
    offset: int = 0
    matches: bool | None = None  # None until the header line has been read
    inode: int = -1
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)

    def read(self) -> list[str]:
        """Read the lines added since the last call; the paths of the rows that were new. A part its owner
        started again (a new file in its place) is read again from its start."""
        try:
            fh = open(self.path, "rb")  # noqa: SIM115
        except FileNotFoundError:
            return []
        with fh:
            info = os.fstat(fh.fileno())  # of the file opened: one replaced after this is read next time
            if info.st_ino != self.inode or info.st_size < self.offset:
                self.offset, self.matches, self.rows, self.inode = 0, None, {}, info.st_ino
            if info.st_size == self.offset:
                return []
            fh.seek(self.offset)
            data = fh.read(info.st_size - self.offset)
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        new = []
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                raise UserError(f"{self.path}: not a clothcli part file (a line is not JSON)") from None
            if self.matches is None:
                self.matches = isinstance(record, dict) and record.get("key") == self.key
                continue
            if self.matches and isinstance(record, dict) and "path" in record:
                if record["path"] not in self.rows:
                    new.append(record["path"])
                self.rows[record["path"]] = record
        return new


def part_readers(output: Path, key: str) -> dict[Path, PartReader]:
    folder = parts_dir(output)
    return {p: PartReader(p, key) for p in sorted(folder.glob("part-*.jsonl"))} if folder.is_dir() else {}


def rows_in_parts(output: Path, key: str, resume: bool) -> dict[str, dict[str, Any]]:
    """Every row in the parts of this command; with `resume`, a part of another command is an error
    (without it, such parts are being replaced by their owners and are not read)."""
    rows: dict[str, dict[str, Any]] = {}
    for reader in part_readers(output, key).values():
        reader.read()
        if reader.matches is False and resume:
            raise UserError(
                f"{reader.path} was written by another command (model, options or inputs differ): cannot --resume "
                f"from it; delete {reader.path.parent} to start again"
            )
        rows.update(reader.rows)
    return rows


class PartWriter:
    """This process's part: a header naming the command, then one JSON row per image, flushed."""

    def __init__(self, output: Path, shard: Shard, key: str, resume: bool):
        self.path = part_path(output, shard.rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep = resume and self.path.is_file() and _has_key(self.path, key)
        if keep:
            data = self.path.read_bytes()
            with open(self.path, "r+b") as fh:  # a row a kill cut short is removed
                fh.truncate(data.rfind(b"\n") + 1)
        if not keep:  # a new file in the part's place, never the old one rewritten under a reader
            header = {"clothcli_part": PART_VERSION, "key": key, "rank": shard.rank, "world": shard.world}
            with atomic_path(self.path) as staged:
                staged.write_text(json.dumps(header) + "\n", encoding="utf-8")
        self.fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, p: Prediction) -> None:
        self.fh.write(prediction_record(p) + "\n")
        self.fh.flush()
        fault_point()

    def close(self) -> None:
        self.fh.close()


def _has_key(path: Path, key: str) -> bool:
    with open(path, "rb") as fh:
        first = fh.readline()
    try:
        return json.loads(first).get("key") == key
    except (ValueError, AttributeError):
        return False


def wait_for_parts(
    *, output: Path, key: str, files: list[str], already: set[str], wait_s: float, world: int
) -> dict[str, dict[str, Any]]:
    """The parts' rows once every file not in `already` has one; a UserError after `wait_s` seconds in
    which no part grew."""
    readers = part_readers(output, key)
    needed = set(files) - already
    last_growth = time.monotonic()
    while True:
        for path in sorted(parts_dir(output).glob("part-*.jsonl")):
            readers.setdefault(path, PartReader(path, key))
        for reader in readers.values():
            new = reader.read()
            if new:
                last_growth = time.monotonic()
                needed.difference_update(new)
        if not needed:
            # a part its owner started again may have dropped rows counted before: check the union
            found: dict[str, dict[str, Any]] = {}
            for reader in readers.values():
                found.update(reader.rows)
            needed = set(files) - already - found.keys()
            if not needed:
                return found
        if time.monotonic() - last_growth > wait_s:
            present = {r.path.name for r in readers.values() if r.matches}
            absent = [rank for rank in range(world) if part_path(output, rank).name not in present]
            where = (
                f"no part from rank(s) {', '.join(map(str, absent))} in {parts_dir(output)}: on several machines -o "
                "must be in a folder every machine shares"
                if absent
                else "a process stopped before its shard was done"
            )
            raise UserError(
                f"{len(needed)} images still have no row after {wait_s:.0f} s without progress ({where}); "
                "run the same command with --resume to continue"
            )
        time.sleep(POLL_S)


def merge_output(
    *,
    writer: Callable[[Path], Any],
    output: Path,
    files: list[str],
    earlier: dict[str, str],
    parts: dict[str, dict[str, Any]],
) -> int:
    """Write `output` (atomically, through `writer(path)`, a `ResultWriter`) with one row per file in the
    list's order: the text of `earlier` rows (continued from an output file) or the parts' row rendered as
    one process renders it; then remove the parts. The number of rows written."""
    count = 0
    with atomic_path(output) as staged:
        out = writer(staged)
        try:
            for key in files:
                if key in earlier:
                    out.emit(earlier[key])
                elif key in parts:
                    out.emit(out.render(prediction_from(parts[key])))
                else:
                    continue
                count += 1
        finally:
            out.close()
    shutil.rmtree(parts_dir(output), ignore_errors=True)
    return count
