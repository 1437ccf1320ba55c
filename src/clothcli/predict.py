"""`predict`: classify the images of files, folders and glob patterns, streaming the results.

This module collects the inputs, writes the results and sorts the files; the model runs in
`predict_torch` (a clothcli checkpoint) or `onnx_inference` (an exported .onnx file, without
importing PyTorch). A file that cannot be read is a result with an error, never an abort.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from clothcli.data.layout import is_hidden, is_image_name
from clothcli.errors import UserError
from clothcli.io_utils import fault_point

UNKNOWN = "unknown"


@dataclass
class Inputs:
    files: list[Path]
    missing: list[str] = field(default_factory=list)
    skipped: int = 0


def collect_inputs(items: list[str], recursive: bool = True) -> Inputs:
    """Files, folders and glob patterns -> sorted unique files (symlink loops followed once)."""
    found: dict[str, Path] = {}
    out = Inputs(files=[])

    def add(path: Path) -> None:
        found.setdefault(os.path.realpath(path), path)

    def walk(folder: Path) -> None:
        seen_dirs: set[str] = set()
        for current, dirs, files in os.walk(folder, followlinks=True):
            real = os.path.realpath(current)
            if real in seen_dirs:
                dirs[:] = []
                continue
            seen_dirs.add(real)
            dirs[:] = sorted(d for d in dirs if not is_hidden(d)) if recursive else []
            for name in files:
                if is_hidden(name) or not is_image_name(name):
                    out.skipped += 1
                    continue
                path = Path(current) / name
                if path.exists():
                    add(path)

    for item in items:
        path = Path(item)
        if path.is_dir():
            walk(path)
        elif path.is_file():
            add(path)
        elif any(ch in item for ch in "*?["):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                out.missing.append(item)
            for match in matches:
                m = Path(match)
                if m.is_dir():
                    walk(m)
                elif m.is_file() and is_image_name(m.name) and not is_hidden(m.name):
                    add(m)
        else:
            out.missing.append(item)
    out.files = sorted(found.values(), key=lambda p: str(p))
    return out


@dataclass
class Prediction:
    path: Path
    labels: list[str]
    probs: list[float]
    error: str = ""

    @property
    def label(self) -> str:
        return self.labels[0] if self.labels else ""

    @property
    def confidence(self) -> float:
        return self.probs[0] if self.probs else 0.0


def is_onnx(model: str | Path) -> bool:
    """An exported .onnx file (run on ONNX Runtime, without PyTorch) rather than a clothcli checkpoint."""
    return Path(model).suffix.lower() == ".onnx"


def predict_files(
    checkpoint: str | Path,
    files: list[Path],
    batch_size: int = 64,
    workers: int = 2,
    top_k: int = 1,
    min_confidence: float | str = 0.0,
    device: str | None = None,
    calibrated: bool = True,
    **engine_options: Any,
) -> Iterator[Prediction]:
    """One Prediction per file, in the order of `files`: a .onnx file runs on ONNX Runtime (PyTorch is
    not imported), anything else on PyTorch (`predict_torch`, whose `engine_options` tune it)."""
    if is_onnx(checkpoint):
        from clothcli.onnx_inference import predict_files_onnx

        if device not in (None, "cpu") or engine_options:
            raise UserError("an .onnx model runs on the CPU with ONNX Runtime: drop --device")
        return predict_files_onnx(checkpoint, files, batch_size, workers, top_k, min_confidence, calibrated)
    from clothcli.predict_torch import predict_files_torch

    return predict_files_torch(
        checkpoint, files, batch_size, workers, top_k, min_confidence, device, calibrated=calibrated, **engine_options
    )


def parse_min_confidence(value: float | str) -> float | str:
    """A probability in [0, 1], or "auto"; anything else is a UserError (checked before any work)."""
    if value == "auto":
        return value
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"--min-confidence must be a probability between 0 and 1 or 'auto', got '{value}'") from None
    if not 0.0 <= number <= 1.0:
        raise UserError(f"--min-confidence must be between 0 and 1, got {value}")
    return number


def resolve_min_confidence(value: float | str, meta: dict[str, Any], temperature: float, source: Path) -> float:
    """The probability below which a label is 'unknown': `value`, or for "auto" the rejection threshold
    that `clothcli calibrate --ood` stored in the checkpoint's `meta` (chosen on calibrated probabilities)."""
    value = parse_min_confidence(value)
    if value != "auto":
        return float(value)
    threshold = meta.get("ood_threshold")
    if threshold is None:
        raise UserError(
            f"{source}: no stored rejection threshold for --min-confidence auto; "
            "run clothcli calibrate RUN --ood FOLDER first"
        )
    if temperature != meta.get("temperature", 1.0):
        raise UserError("--min-confidence auto was chosen on calibrated probabilities: drop --no-calibration")
    return float(threshold)


def label_row(probs: list[float], indices: list[int], classes: list[str], min_confidence: float) -> list[str]:
    """The top-k labels of one image, the first one 'unknown' when its probability is below `min_confidence`."""
    labels = [classes[i] for i in indices]
    if probs[0] < min_confidence:
        labels[0] = UNKNOWN
    return labels


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
        self.header.append("error")
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
            self.csv.writerow([*row, p.error])
        else:
            record = {
                "path": str(p.path),
                "label": p.label or None,
                "top_k": [{"label": lab, "probability": round(pr, 6)} for lab, pr in zip(p.labels, p.probs)],
                "error": p.error or None,
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


def unique_destination(folder: Path, name: str) -> Path:
    """folder/name, or folder/stem-1.ext, -2 ... : never an existing file."""
    target = folder / name
    stem, suffix = os.path.splitext(name)
    n = 1
    while target.exists() or target.is_symlink():
        target = folder / f"{stem}-{n}{suffix}"
        n += 1
    return target


def sort_file(p: Prediction, root: Path, move: bool) -> Path | None:
    """Copy or move a classified file into root/<label>/; unreadable files stay where they are."""
    if p.error or not p.label:
        return None
    folder = root / p.label
    folder.mkdir(parents=True, exist_ok=True)
    target = unique_destination(folder, p.path.name)
    if move:
        shutil.move(str(p.path), str(target))
    else:
        shutil.copy2(p.path, target)
    return target


@dataclass
class PredictSummary:
    total: int = 0
    classified: int = 0
    per_class: Counter = field(default_factory=Counter)
    errors: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    model_seconds_start: float = 0.0
    # with --resume: images already in the output file, not classified again
    already_done: int = 0

    @property
    def images_per_s(self) -> float:
        return self.total / self.seconds if self.seconds else 0.0


def run_predict(
    checkpoint: str | Path,
    inputs: list[str],
    recursive: bool = True,
    batch_size: int = 64,
    workers: int = 2,
    top_k: int = 1,
    min_confidence: float | str = 0.0,
    output: Path | None = None,
    copy_to: Path | None = None,
    move_to: Path | None = None,
    device: str | None = None,
    on_result: Callable[[Prediction], None] | None = None,
    resume: bool = False,
    calibrated: bool = True,
) -> PredictSummary:
    """Classify everything `inputs` names; stream to `output`; sort into folders if asked.

    With `resume`, the images already in `output` (from a run that was interrupted) are skipped and the
    rest appended, so the file ends as an uninterrupted run writes it."""
    if resume and output is None:
        raise UserError("--resume continues an output file: give it with -o")
    min_confidence = parse_min_confidence(min_confidence)
    if copy_to and move_to:
        raise UserError("use either --copy-to or --move-to, not both")
    found = collect_inputs(inputs, recursive)
    if found.missing:
        raise UserError(f"not found: {', '.join(found.missing)}")
    if not found.files:
        raise UserError("no image files found in: " + ", ".join(inputs))
    summary = PredictSummary()
    start = time.perf_counter()
    writer = ResultWriter(output, top_k, resume) if output else None
    files = found.files
    if writer is not None and writer.done:
        files = [f for f in files if str(f) not in writer.done]
        summary.already_done = len(found.files) - len(files)
    try:
        for p in (
            predict_files(checkpoint, files, batch_size, workers, top_k, min_confidence, device, calibrated=calibrated)
            if files
            else ()
        ):
            summary.total += 1
            if p.error:
                summary.errors.append((str(p.path), p.error))
            else:
                summary.classified += 1
                summary.per_class[p.label] += 1
            if writer:
                writer.write(p)
            if copy_to or move_to:
                sort_file(p, Path(copy_to or move_to), move=bool(move_to))
            if on_result:
                on_result(p)
    finally:
        if writer:
            writer.close()
        summary.seconds = time.perf_counter() - start
    return summary
