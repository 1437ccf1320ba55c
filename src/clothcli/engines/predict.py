"""`predict`: classify the images of files, folders and glob patterns on any backend, streaming the results.

The backend (`backends.load_classifier`) turns files into logits; here they become calibrated
probabilities, top-k labels and "unknown" where the rejection rule says so, the same way for every format.
A file that cannot be read is a result with an error, never an abort.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from clothcli.backends import Classifier, load_classifier
from clothcli.data.embedded import is_embedded
from clothcli.data.inputs import collect_inputs, read_input_list
from clothcli.engines.prediction_writer import ResultWriter, completed_rows, output_kind, result_header, sort_file
from clothcli.engines.rejection import Rejector, rejector_for
from clothcli.engines.sharding import (
    PartWriter,
    Shard,
    command_key,
    merge_output,
    parts_dir,
    prediction_from,
    rows_in_parts,
    wait_for_parts,
)
from clothcli.errors import UserError
from clothcli.metrics import probabilities
from clothcli.names import UNKNOWN, class_folders
from clothcli.predictions import Prediction, parse_min_confidence


def predict_files(
    classifier: Classifier,
    files: list[Path],
    *,
    batch_size: int = 64,
    workers: int = 2,
    top_k: int = 1,
    min_confidence: float | str | Rejector = 0.0,
) -> Iterator[Prediction]:
    """One Prediction per file, in the order of `files`; "unknown" (and which score said so) where the
    rejection rule of `min_confidence` (`rejection.rejector_for`, or a Rejector already made) rejects it."""
    rejector = min_confidence if isinstance(min_confidence, Rejector) else rejector_for(classifier, min_confidence)
    top_k = min(top_k, len(classifier.classes))
    # NumPy's BLAS on one thread: its spinning threads took the cores the decoders and the model run on
    with threadpool_limits(limits=1, user_api="blas"):
        for batch in classifier.run(files, batch_size, workers, features=rejector.needs_features):
            probs = probabilities(batch.logits, classifier.temperature)
            order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
            rejected = rejector.rejected(batch.logits, batch.features) if len(batch.rows) else []
            row_of = {index: row for row, index in enumerate(batch.rows)}
            for index in batch.indices:
                if index in batch.errors:
                    yield Prediction(files[index], [], [], batch.errors[index])
                    continue
                row = row_of[index]
                top = order[row].tolist()
                values = [float(probs[row, i]) for i in top]
                labels = [classifier.classes[i] for i in top]
                if rejected[row]:
                    yield Prediction(files[index], [UNKNOWN, *labels[1:]], values, rejected_by=rejector.method)
                else:
                    yield Prediction(files[index], labels, values)


@dataclass
class PredictSummary:
    total: int = 0
    classified: int = 0
    per_class: Counter = field(default_factory=Counter)
    errors: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    # with --resume: images already in the output file, not classified again
    already_done: int = 0
    refused: list[str] = field(default_factory=list)  # input-list entries refused ("line N: why")
    shard: Shard = field(default_factory=Shard)
    merged_rows: int | None = None  # rank 0 of a sharded run: the rows of the merged output
    part: Path | None = None  # a sharded run: where this process wrote its rows

    @property
    def images_per_s(self) -> float:
        return self.total / self.seconds if self.seconds else 0.0

    def count(self, p: Prediction) -> None:
        self.total += 1
        if p.error:
            self.errors.append((str(p.path), p.error))
        else:
            self.classified += 1
            self.per_class[p.label] += 1


def gather_inputs(
    inputs: list[str], recursive: bool, from_list: Path | None, list_root: Path | None
) -> tuple[list[str], list[str]]:
    """The files to classify as path strings, in a fixed order (folders and patterns sorted, then the
    list's own order), and the list entries refused. Strings until the images already done are left out:
    a million Path objects take seconds to make."""
    if list_root is not None and from_list is None:
        raise UserError("--list-root applies to --from-list")
    files: list[str] = []
    if inputs:
        found = collect_inputs(inputs, recursive)
        if found.missing:
            raise UserError(f"not found: {', '.join(found.missing)}")
        files = [str(f) for f in found.files]
    refused: list[str] = []
    if from_list is not None:
        listed = read_input_list(from_list, list_root)
        known = set(files)
        files = files + [f for f in listed.files if f not in known]
        refused = [f"{from_list}: {line}" for line in listed.refused]
    if not files:
        named = ", ".join([*inputs, *([str(from_list)] if from_list else [])])
        raise UserError(f"no image files found in: {named}" if named else "give images, folders or --from-list")
    return files, refused


def run_predict(
    *,
    model: str | Path,
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
    precision: str | None = None,
    from_list: Path | None = None,
    list_root: Path | None = None,
    shard: Shard | None = None,
    wait_s: float = 600.0,
) -> PredictSummary:
    """Classify everything `inputs` (and the input list `from_list`) name with the model at `model`; stream
    to `output`; sort into folders.

    With `resume`, the images already in `output` (from a run that was interrupted) are skipped and the
    rest appended, so the file ends as an uninterrupted run writes it. Under a launcher (`shard`, by default
    from RANK and WORLD_SIZE) each process classifies its shard and rank 0 merges the parts into `output`
    (`engines.sharding`)."""
    if resume and output is None:
        raise UserError("--resume continues an output file: give it with -o")
    min_confidence = parse_min_confidence(min_confidence)
    if copy_to and move_to:
        raise UserError("use either --copy-to or --move-to, not both")
    shard = shard or Shard.from_env()
    if shard.world > 1 and output is None:
        raise UserError(f"a sharded predict ({shard.world} processes) needs -o: rank 0 merges the processes' rows")
    if output is not None:
        output_kind(output)
    files, refused = gather_inputs(inputs, recursive, from_list, list_root)
    if (copy_to or move_to) and any(map(is_embedded, files)):
        raise UserError("--copy-to and --move-to sort image files; images stored inside a Parquet file are not copied")
    threads = shard.threads() if shard.world > 1 else None
    classifier = load_classifier(model, device=device, calibrated=calibrated, precision=precision, threads=threads)
    rejector = rejector_for(classifier, min_confidence)  # an impossible "auto" fails before any file is written
    # one safe, distinct folder per label (a label may hold a slash), "unknown" among them
    folders = class_folders([*classifier.classes, UNKNOWN]) if copy_to or move_to else {}
    summary = PredictSummary(refused=refused, shard=shard)
    start = time.perf_counter()

    def classify(todo: list[str], write: Callable[[Prediction], None]) -> None:
        options = {"batch_size": batch_size, "workers": workers, "top_k": top_k, "min_confidence": rejector}
        predictions = predict_files(classifier, [Path(f) for f in todo], **options) if todo else ()
        for p in predictions:
            summary.count(p)
            write(p)
            if copy_to or move_to:
                sort_file(p, Path(copy_to or move_to), folders, move=bool(move_to))
            if on_result:
                on_result(p)

    try:
        if output is not None and (shard.world > 1 or (resume and parts_dir(output).is_dir())):
            options = {"top_k": top_k, "min_confidence": str(min_confidence), "calibrated": calibrated,
                       "precision": precision, "kind": output_kind(output)}  # fmt: skip
            _sharded(summary, classify, output=output, files=files, key=command_key(model, files, options),
                     resume=resume, top_k=top_k, wait_s=wait_s)  # fmt: skip
            return summary
        writer = ResultWriter(output, top_k, resume) if output else None
        try:
            if writer is not None and writer.done:
                summary.already_done = sum(f in writer.done for f in files)
                files = [f for f in files if f not in writer.done]
            classify(files, writer.write if writer else lambda p: None)
        finally:
            if writer:
                writer.close()
    finally:
        summary.seconds = time.perf_counter() - start
    return summary


def _sharded(
    summary: PredictSummary,
    classify: Callable[[list[str], Callable[[Prediction], None]], None],
    *,
    output: Path,
    files: list[str],
    key: str,
    resume: bool,
    top_k: int,
    wait_s: float,
) -> None:
    """This process's shard into its part; on rank 0, the wait for every part and the merge into `output`."""
    shard, kind = summary.shard, output_kind(output)
    earlier: dict[str, str] = {}
    if resume and output.is_file() and output.stat().st_size:
        header, earlier = completed_rows(output, kind, result_header(top_k))
        if header != result_header(top_k):
            raise UserError(f"{output}: written by an older clothcli; continue it with one process")
    done = set(earlier) | set(rows_in_parts(output, key, resume)) if resume else set()
    summary.already_done = sum(files[i] in done for i in shard.positions(len(files)))
    mine = [files[i] for i in shard.positions(len(files)) if files[i] not in done]
    part = PartWriter(output, shard, key, resume)
    summary.part = part.path
    try:
        classify(mine, part.write)
    finally:
        part.close()
    if shard.rank != 0:
        return
    rows = wait_for_parts(output=output, key=key, files=files, already=set(earlier), wait_s=wait_s, world=shard.world)
    summary.merged_rows = merge_output(
        writer=lambda staged: ResultWriter(staged, top_k, kind=kind), output=output, files=files, earlier=earlier,
        parts=rows,
    )  # fmt: skip
    # the whole run's figures, every process's rows of this launch, not only rank 0's
    counted = PredictSummary()
    for path, record in rows.items():
        if path not in done:
            counted.count(prediction_from(record))
    summary.total, summary.classified = counted.total, counted.classified
    summary.per_class, summary.errors = counted.per_class, counted.errors
    summary.already_done = len(done)
