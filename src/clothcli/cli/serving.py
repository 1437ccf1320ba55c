"""`clothcli serve`: parse the options, start the server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from clothcli import render
from clothcli.cli.options import ModelArgument


def serve(
    model: ModelArgument,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    max_batch: Annotated[int, typer.Option(min=1, max=1024, help="Most images per model call.")] = 32,
    batch_wait_ms: Annotated[
        float, typer.Option(min=0.0, max=1000.0, help="How long the first image of a batch waits for others.")
    ] = 5.0,
    max_queue: Annotated[
        int, typer.Option(min=1, help="Images that may wait for the model; beyond, 503 with Retry-After.")
    ] = 256,
    max_files: Annotated[int, typer.Option(min=1, max=1000, help="Most images in one request.")] = 16,
    max_body_mb: Annotated[float, typer.Option(min=0.01, help="Largest request body, in MiB (413 beyond).")] = 20.0,
    timeout_s: Annotated[float, typer.Option(min=0.1, help="Longest a request may take (504 beyond).")] = 30.0,
    top_k: Annotated[int, typer.Option(min=1, max=100, help="Classes returned per image.")] = 3,
    min_confidence: Annotated[
        str, typer.Option(help="As predict's: a top-1 probability, or 'auto' for the rule calibrate --ood stored.")
    ] = "0",
    decode_threads: Annotated[int, typer.Option(min=1, max=64, help="Threads decoding uploads.")] = 2,
) -> None:
    """An HTTP API (POST /predict, GET /health, /model, /stats, /docs) and a web page (/) for a model."""
    from clothcli.engines.server import ServeOptions
    from clothcli.engines.server import serve as run_server
    from clothcli.predictions import parse_min_confidence

    options = ServeOptions(
        max_batch=max_batch, batch_wait_ms=batch_wait_ms, max_queue=max_queue, max_files=max_files,
        max_body_bytes=int(max_body_mb * 2**20), timeout_s=timeout_s, top_k=top_k,
        min_confidence=parse_min_confidence(min_confidence), decode_threads=decode_threads,
    )  # fmt: skip

    def announce() -> None:
        render.note(f"serving {Path(model)} at http://{host}:{port}/ (API docs at /docs); Ctrl-C or SIGTERM stops")

    run_server(model=model, host=host, port=port, options=options, on_start=announce)
