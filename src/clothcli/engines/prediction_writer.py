"""Where predictions go: streamed to CSV, JSON or JSONL, and files sorted into class folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, TextIO

from clothcli.errors import UserError
from clothcli.io_utils import fault_point
from clothcli.predictions import Prediction
from clothcli.safe_files import place_file

# columns added after the first release of the format: a file without them is still resumed
LATER_COLUMNS = ("rejected_by",)


class ResultWriter:
    """Streams predictions to CSV, JSON or JSONL (by extension) as they arrive."""

    def __init__(self, path: Path, top_k: int, resume: bool = False):
        self.path = path
        self.kind = path.suffix.lower().lstrip(".")
        if self.kind not in ("csv", "json", "jsonl"):
            raise UserError(f"--output must end in .csv, .json or .jsonl, got '{path.name}'")
        self.top_k = top_k
        self.header = ["path", "label", "confidence"]
        for k in range(2, top_k + 1):
            self.header += [f"label_{k}", f"confidence_{k}"]
        self.header += ["error", "rejected_by"]
        # paths already written by an interrupted run of the same command
        self.done: set[str] = set()
        appending = resume and path.is_file() and path.stat().st_size > 0
        if appending:
            if self.kind == "json":
                raise UserError("--resume needs a .csv or .jsonl output (a JSON array cut short cannot be continued)")
            self.done = self._complete_rows()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh: TextIO = open(path, "a" if appending else "w", encoding="utf-8", newline="")  # noqa: SIM115
        self.count = 0
        self.csv = csv.writer(self.fh)
        if self.kind == "csv" and not appending:
            self.csv.writerow(self.header)
        elif self.kind == "json":
            self.fh.write("[\n")

    def _complete_rows(self) -> set[str]:
        """The paths in the existing file's complete rows. A last row that a kill cut short is removed,
        so the file holds exactly the rows an uninterrupted run wrote first."""
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            with open(self.path, "r+b") as fh:
                fh.truncate(len(complete))
        lines = complete.decode("utf-8").splitlines()
        if self.kind == "jsonl":
            try:
                return {json.loads(line)["path"] for line in lines}
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{self.path}: not a clothcli JSONL file, cannot --resume into it") from None
        rows = list(csv.reader(lines))
        if rows and rows[0] == self.header[: -len(LATER_COLUMNS)]:
            self.header = rows[0]  # written before those columns existed: continued with the columns it has
        if not rows or rows[0] != self.header:
            raise UserError(
                f"{self.path}: its columns differ from this command's (another --top-k?); cannot --resume into it"
            )
        return {row[0] for row in rows[1:] if row}

    def write(self, p: Prediction) -> None:
        if self.kind == "csv":
            row: list[Any] = [str(p.path)]
            for k in range(self.top_k):
                row += [p.labels[k], f"{p.probs[k]:.6f}"] if k < len(p.labels) else ["", ""]
            self.csv.writerow([*row, p.error, p.rejected_by][: len(self.header)])
        else:
            record = {
                "path": str(p.path),
                "label": p.label or None,
                "top_k": [{"label": lab, "probability": round(pr, 6)} for lab, pr in zip(p.labels, p.probs)],
                "error": p.error or None,
                "rejected_by": p.rejected_by or None,
            }
            text = json.dumps(record, ensure_ascii=False)
            if self.kind == "json":
                text = ("  " if self.count == 0 else ",\n  ") + text
            else:
                text += "\n"
            self.fh.write(text)
        self.fh.flush()
        self.count += 1
        fault_point()

    def close(self) -> None:
        if self.kind == "json":
            self.fh.write("\n]\n")
        self.fh.close()


def sort_file(p: Prediction, root: Path, folders: dict[str, str], move: bool) -> Path | None:
    """Copy or move a classified file into root/<its label's folder>/ (`data.names.class_folders`);
    unreadable files stay where they are."""
    if p.error or not p.label:
        return None
    return place_file(p.path, root, folders[p.label], move=move)
