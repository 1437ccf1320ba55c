"""The fork server that training's DataLoader workers start from, reachable without importing torch.

The server is a fresh interpreter that imports torch and `clothcli.data.loading` (about 3.5 s on a 2-core
CPU) before it can fork the first worker. This module imports neither, so `clothcli train` can start the
server before its own process imports torch: the two imports then run side by side instead of the first
batch waiting for the server's (measured: 3.3 s of waiting for EfficientNet-Lite0's first batch when the
server started while the model was being built).
"""

from __future__ import annotations

import multiprocessing
from typing import Any

PRELOAD = ["torch", "clothcli.data.loading"]  # what every worker needs, imported once in the server


def worker_context() -> Any:
    """Where training's DataLoader workers start from: a small fork server, not the training process itself.

    A worker forked from the trainer shares its whole heap copy-on-write, so every page the trainer writes
    afterwards is first copied; once the heap holds a step's activations (gigabytes, kept by
    `keep_freed_memory`) that is over a million page copies. Forking the validation workers after the first
    epoch made EfficientNet-Lite0's first validation 10.4 s instead of 3.6 and its epochs 115 s instead of
    107 on a 2-core CPU, with the same results. Workers from a server that imported only torch and the
    loading module share nothing the trainer writes. None (the platform's default) where there is no fork
    server.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def start_worker_server(workers: int) -> None:
    """Start the fork server now when loaders will have `workers` > 0 (a no-op when it runs already), so that
    its imports overlap this process's own work instead of delaying the first batch."""
    if workers > 0 and worker_context() is not None:
        from multiprocessing import forkserver

        forkserver.ensure_running()
