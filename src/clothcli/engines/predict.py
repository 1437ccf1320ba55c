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
from clothcli.data.inputs import collect_inputs
from clothcli.engines.prediction_writer import ResultWriter, sort_file
from clothcli.engines.rejection import Rejector, rejector_for
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

    @property
    def images_per_s(self) -> float:
        return self.total / self.seconds if self.seconds else 0.0


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
) -> PredictSummary:
    """Classify everything `inputs` names with the model at `model`; stream to `output`; sort into folders.

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
    classifier = load_classifier(model, device=device, calibrated=calibrated, precision=precision)
    rejector = rejector_for(classifier, min_confidence)  # an impossible "auto" fails before any file is written
    # one safe, distinct folder per label (a label may hold a slash), "unknown" among them
    folders = class_folders([*classifier.classes, UNKNOWN]) if copy_to or move_to else {}
    summary = PredictSummary()
    start = time.perf_counter()
    writer = ResultWriter(output, top_k, resume) if output else None
    files = found.files
    if writer is not None and writer.done:
        files = [f for f in files if str(f) not in writer.done]
        summary.already_done = len(found.files) - len(files)
    predictions = (
        predict_files(classifier, files, batch_size=batch_size, workers=workers, top_k=top_k, min_confidence=rejector)
        if files
        else ()
    )
    try:
        for p in predictions:
            summary.total += 1
            if p.error:
                summary.errors.append((str(p.path), p.error))
            else:
                summary.classified += 1
                summary.per_class[p.label] += 1
            if writer:
                writer.write(p)
            if copy_to or move_to:
                sort_file(p, Path(copy_to or move_to), folders, move=bool(move_to))
            if on_result:
                on_result(p)
    finally:
        if writer:
            writer.close()
        summary.seconds = time.perf_counter() - start
    return summary
