"""The ExecuTorch backend: a .pte program lowered to XNNPACK, the CPU delegate ExecuTorch runs on
Android and iOS phones and on Linux, here through ExecuTorch's Python runtime.

A .pte program holds no free-form metadata that can be rewritten in place, so the classes, the
preprocessing and the calibration travel in one JSON file beside it, NAME.pte.json, which names the
program it belongs to by its SHA-256: a sidecar copied beside another program is refused. The Python
runtime takes and returns torch tensors, so this backend imports torch (the phone runtimes do not).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clothcli.backends.arrays import FEATURES_OUTPUT, ExportedClassifier, validate_metadata
from clothcli.errors import UserError
from clothcli.formats import EXECUTORCH
from clothcli.io_utils import atomic_write_text, file_sha256
from clothcli.untrusted import read_json

EXECUTORCH_EXTRA = "pip install executorch (a release built for the installed torch; `nox -s executorch`)"
MAX_BATCH = 64  # the program's upper bound on the batch dimension; larger batches run in slices
OUTPUTS = ["logits", FEATURES_OUTPUT]


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Descriptor 2 pointed at /dev/null: ExecuTorch's C++ runtime logs its CPU probing there, and torch
    a deprecation warning when ExecuTorch registers its types; the command reports failures itself."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def import_runtime() -> Any:
    """ExecuTorch's Python runtime, or one line naming what installs it."""
    try:
        with _native_stderr_silenced():
            from executorch.runtime import Runtime
    except ImportError:
        raise UserError(f"running a .pte model needs ExecuTorch: {EXECUTORCH_EXTRA}") from None
    return Runtime


def sidecar_path(path: Path) -> Path:
    """The metadata file beside a .pte program: NAME.pte.json."""
    return path.with_name(path.name + ".json")


def write_sidecar(path: Path, meta: dict[str, Any], digest: str | None = None) -> None:
    """The metadata beside the program at `path`, bound to it by its digest, written atomically."""
    record = {"program_sha256": digest or file_sha256(path), "clothcli": meta}
    atomic_write_text(sidecar_path(path), json.dumps(record, indent=1))


def read_sidecar(path: Path) -> dict[str, Any]:
    """The clothcli metadata of the program at `path`; one line when its sidecar is missing, unreadable or
    another program's."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        raise UserError(f"{path}: its metadata file {sidecar.name} is missing beside it; export it with clothcli")
    record = read_json(sidecar)
    if not isinstance(record, dict) or not isinstance(record.get("clothcli"), dict):
        raise UserError(f"{sidecar}: not a clothcli metadata file")
    if record.get("program_sha256") != file_sha256(path):
        raise UserError(f"{sidecar}: it describes another program than {path.name} (the SHA-256 differs)")
    return validate_metadata(record["clothcli"], path)


class ExecuTorchClassifier(ExportedClassifier):
    """A .pte program loaded by ExecuTorch's runtime, its XNNPACK delegate on the CPU."""

    format = EXECUTORCH

    def __init__(self, path: str | Path, calibrated: bool = True, threads: int | None = None):
        self.source = Path(path)
        if not self.source.is_file():
            raise UserError(f"model not found: {self.source}")
        self.meta = read_sidecar(self.source)
        self._adopt(calibrated)
        runtime = import_runtime()
        if threads:
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

            _unsafe_reset_threadpool(threads)
        try:
            with _native_stderr_silenced():
                self.method = runtime.get().load_program(self.source).load_method("forward")
        except Exception as exc:  # the runtime raises RuntimeError or ValueError with its own text
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise UserError(f"{self.source}: not a loadable ExecuTorch program ({reason})") from None
        self.output_names = list(OUTPUTS)
        self._threads = threads

    @property
    def threads(self) -> int:
        from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count

        return self._threads or int(_threadpool_get_thread_count())

    def infer(self, images: np.ndarray, features: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        logits, found = [], []
        for start in range(0, len(images), MAX_BATCH):
            outputs = self.method.execute([torch.from_numpy(np.ascontiguousarray(images[start : start + MAX_BATCH]))])
            logits.append(outputs[0].numpy())
            found.append(outputs[1].numpy())
        return np.concatenate(logits), np.concatenate(found) if features else None

    def store(self, **values: Any) -> None:
        meta = {**self.meta, **json.loads(json.dumps(values))}
        write_sidecar(self.source, meta)
        self.meta = meta
