"""Where predictions go: streamed to CSV, JSON or JSONL, and files sorted into class folders."""

from __future__ import annotations

import csv
import io
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

    def __init__(self, path: Path, top_k: int, resume: bool = False, kind: str | None = None):
        """`kind` (csv, json or jsonl) when `path` is not named by it (a temporary file)."""
        self.path = path
        self.kind = kind or output_kind(path)
        self.top_k = top_k
        self.header = result_header(top_k)
        # rows already written by an interrupted run of the same command: path -> the row's text
        self.done: dict[str, str] = {}
        appending = resume and path.is_file() and path.stat().st_size > 0
        if appending:
            self.header, self.done = completed_rows(path, self.kind, self.header, truncate=True, texts=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh: TextIO = open(path, "a" if appending else "w", encoding="utf-8", newline="")  # noqa: SIM115
        self.count = 0
        if self.kind == "csv" and not appending:
            self.fh.write(csv_line(self.header))
        elif self.kind == "json":
            self.fh.write("[\n")

    def render(self, p: Prediction) -> str:
        """The text of `p`'s row (a CSV line, or the JSON record without the array's punctuation)."""
        if self.kind == "csv":
            row: list[Any] = [str(p.path)]
            for k in range(self.top_k):
                row += [p.labels[k], f"{p.probs[k]:.6f}"] if k < len(p.labels) else ["", ""]
            return csv_line([*row, p.error, p.rejected_by][: len(self.header)])
        record = {
            "path": str(p.path),
            "label": p.label or None,
            "top_k": [{"label": lab, "probability": round(pr, 6)} for lab, pr in zip(p.labels, p.probs)],
            "error": p.error or None,
            "rejected_by": p.rejected_by or None,
        }
        return json.dumps(record, ensure_ascii=False)

    def write(self, p: Prediction) -> None:
        self.emit(self.render(p))

    def emit(self, text: str) -> None:
        """Append one row rendered by `render` (here or by another process of a sharded run)."""
        if self.kind == "json":
            text = ("  " if self.count == 0 else ",\n  ") + text
        elif self.kind == "jsonl":
            text += "\n"
        self.fh.write(text)
        self.fh.flush()
        self.count += 1
        fault_point()

    def close(self) -> None:
        if self.kind == "json":
            self.fh.write("\n]\n")
        self.fh.close()


def output_kind(path: Path) -> str:
    kind = path.suffix.lower().lstrip(".")
    if kind not in ("csv", "json", "jsonl"):
        raise UserError(f"--output must end in .csv, .json or .jsonl, got '{path.name}'")
    return kind


def result_header(top_k: int) -> list[str]:
    header = ["path", "label", "confidence"]
    for k in range(2, top_k + 1):
        header += [f"label_{k}", f"confidence_{k}"]
    return [*header, "error", "rejected_by"]


def csv_line(row: list[Any]) -> str:
    """One row as `csv.writer` writes it (the same quoting and line end wherever it is rendered)."""
    buffer = io.StringIO()
    csv.writer(buffer).writerow(row)
    return buffer.getvalue()


def completed_rows(
    path: Path, kind: str, header: list[str], truncate: bool = False, texts: bool = True
) -> tuple[list[str], dict[str, str]]:
    """The header and complete rows (path -> text, or "" without `texts`: rendering a million rows again
    takes seconds) of an output file written by clothcli. A last row that a kill cut short is not read,
    and with `truncate` (the writer that continues the file) removed, so the file holds exactly the rows
    an uninterrupted run wrote first."""
    if kind == "json":
        raise UserError("--resume needs a .csv or .jsonl output (a JSON array cut short cannot be continued)")
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if truncate and len(complete) != len(data):
        with open(path, "r+b") as fh:
            fh.truncate(len(complete))
    text = complete.decode("utf-8")
    lines = text.splitlines()
    if kind == "jsonl":
        try:
            return header, {json.loads(line)["path"]: line if texts else "" for line in lines}
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}: not a clothcli JSONL file, cannot --resume into it") from None
    if not texts and lines and '"' not in text:
        # nothing quoted, so no field holds a comma or a line break: the path is what precedes the first comma
        first = next(csv.reader(lines[:1]))
        rows = [first] + [[line.partition(",")[0]] for line in lines[1:]]
    else:
        rows = list(csv.reader(lines))
    if rows and rows[0] == header[: -len(LATER_COLUMNS)]:
        header = rows[0]  # written before those columns existed: continued with the columns it has
    if not rows or rows[0] != header:
        raise UserError(f"{path}: its columns differ from this command's (another --top-k?); cannot --resume into it")
    return header, {row[0]: csv_line(row) if texts else "" for row in rows[1:] if row}


def sort_file(p: Prediction, root: Path, folders: dict[str, str], move: bool) -> Path | None:
    """Copy or move a classified file into root/<its label's folder>/ (`data.names.class_folders`);
    unreadable files stay where they are."""
    if p.error or not p.label:
        return None
    return place_file(p.path, root, folders[p.label], move=move)
