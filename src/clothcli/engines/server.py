"""`clothcli serve`: a model behind an HTTP API and a web page, on FastAPI and uvicorn.

FastAPI (on Starlette) gives the routing, multipart parsing, OpenAPI docs and the test client;
uvicorn the HTTP server, with its graceful shutdown on SIGTERM (stop accepting, finish what is in
flight, exit 0). Neither batches, so `engines.batching` does: requests that arrive together go
through the model as one batch. Each upload is decoded with the loader `predict` uses
(`data.images.load_rgb`: EXIF orientation, modes, decompression bombs refused from the header) and
prepared as the backend's own `run` prepares it, in a thread pool, so a served answer equals
`clothcli predict`'s on the same file.

Limits, each a JSON error with its status, after which the server goes on serving: a body over
`max_body_bytes` (413, counted as it arrives), more files than `max_files` or a file that is not a
usable image (400), more images waiting than `max_queue` (503 with Retry-After), a request slower
than `timeout_s` (504).
"""

import asyncio
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from clothcli.backends import Classifier, load_classifier
from clothcli.data.images import ImageReadError, load_rgb
from clothcli.engines.batching import Batcher, Overloaded, Scored
from clothcli.engines.rejection import rejector_for
from clothcli.errors import require_packages
from clothcli.names import UNKNOWN

SERVE_EXTRA = "pip install 'clothcli[serve]'"


@dataclass
class ServeOptions:
    """How the server batches, what it admits, and what it answers."""

    max_batch: int = 32
    batch_wait_ms: float = 5.0
    max_queue: int = 256  # images waiting for the model
    max_files: int = 16  # per request
    max_body_bytes: int = 20 * 2**20
    timeout_s: float = 30.0
    top_k: int = 3
    min_confidence: float | str = 0.0
    decode_threads: int = 2


def require_serving() -> None:
    require_packages(("fastapi", "uvicorn", "multipart"), "serving", SERVE_EXTRA)


class BodyLimit:
    """ASGI middleware: a request whose body passes `limit` bytes gets 413, whether it says its length
    in Content-Length or sends it in chunks."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_json(send, 413, {"error": f"request body over {self.limit:,} bytes"})
        seen = 0
        started = False

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked_send)
        except _TooLarge:
            if not started:
                await _send_json(send, 413, {"error": f"request body over {self.limit:,} bytes"})


class _TooLarge(Exception):
    pass


async def _send_json(send: Any, status: int, body: dict) -> None:
    import json

    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


@dataclass
class Counters:
    requests: Counter
    errors: Counter
    latency_ms: list[float]
    seconds: Counter  # wall time summed per stage: reading the request, decoding and preparing, the whole answer


def answer(classifier: Classifier, name: str, scored: Scored, top_k: int, method: str) -> dict[str, Any]:
    """One image's answer, as `clothcli predict` labels it: the top-k with calibrated probabilities, the
    first label `unknown` when the rejection rule rejected it (and which score did)."""
    order = np.argsort(-scored.probs, kind="stable")[:top_k]
    top = [{"label": classifier.classes[i], "probability": round(float(scored.probs[i]), 6)} for i in order]
    label = UNKNOWN if scored.rejected else top[0]["label"]
    return {"file": name, "label": label, "top_k": top, "rejected_by": method if scored.rejected else None}


def create_app(model: str | Path, options: ServeOptions | None = None, classifier: Classifier | None = None) -> Any:
    """The FastAPI application serving `model` (loaded at start-up unless `classifier` is given)."""
    require_serving()
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.datastructures import UploadFile
    from starlette.requests import ClientDisconnect

    options = options or ServeOptions()
    state: dict[str, Any] = {"ready": False}
    counters = Counters(Counter(), Counter(), [], Counter())
    decode_pool = ThreadPoolExecutor(options.decode_threads, thread_name_prefix="clothcli-decode")

    @asynccontextmanager
    async def lifespan(_: Any):
        loaded = classifier or load_classifier(model, in_workers=False)
        rejector = rejector_for(loaded, options.min_confidence)
        side = loaded.preprocess.input_size
        loaded.infer(np.zeros((1, 3, side, side), dtype=np.float32), rejector.needs_features)  # warm up
        batcher = Batcher(loaded, rejector, options.max_batch, options.batch_wait_ms / 1000.0, options.max_queue)
        batcher.start()
        state.update(classifier=loaded, rejector=rejector, batcher=batcher, ready=True)
        yield
        state["ready"] = False
        await batcher.stop()
        decode_pool.shutdown(wait=True)

    app = FastAPI(title="clothcli", lifespan=lifespan)

    def error(status: int, message: str, kind: str, headers: dict | None = None, **extra: Any) -> JSONResponse:
        counters.errors[kind] += 1
        return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)

    def prepare(data: bytes) -> np.ndarray:
        loaded: Classifier = state["classifier"]
        return loaded.prepare(load_rgb(data, min_size=loaded.preprocess.decode_size))

    async def uploads(request: Request) -> list[tuple[str, bytes]]:
        """The request's images: the repeated multipart field `file`, or the whole body as one image."""
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            form = await request.form(max_files=options.max_files + 1, max_fields=options.max_files + 8)
            files = [item for key, item in form.multi_items() if key == "file" and isinstance(item, UploadFile)]
            return [(item.filename or f"file{i}", await item.read()) for i, item in enumerate(files)]
        return [("body", await request.body())]

    async def predict_images(request: Request) -> JSONResponse:
        loaded: Classifier = state["classifier"]
        started = time.perf_counter()
        try:
            files = await uploads(request)
        except ClientDisconnect:
            counters.errors["disconnected"] += 1
            return JSONResponse({"error": "client disconnected"}, status_code=400)
        except _TooLarge:
            counters.errors["too_large"] += 1
            raise  # answered 413 by BodyLimit
        except Exception as exc:  # a multipart body that does not parse, or with too many parts
            return error(400, f"unreadable request: {str(exc)[:200]}", "bad_request")
        if not files or (len(files) == 1 and not files[0][1] and files[0][0] == "body"):
            return error(400, "no image: send multipart field 'file' (repeatable) or the image as the body", "no_image")
        if len(files) > options.max_files:
            return error(400, f"too many files: at most {options.max_files} per request", "too_many_files")
        loop = asyncio.get_running_loop()
        arrays = []
        read = time.perf_counter()
        counters.seconds["request"] += read - started
        for name, data in files:
            try:
                arrays.append(await loop.run_in_executor(decode_pool, prepare, data))
            except ImageReadError as exc:
                return error(400, f"{name}: {exc}", "bad_image", file=name)
        counters.seconds["decode"] += time.perf_counter() - read
        try:
            futures = state["batcher"].submit(arrays)
        except Overloaded:
            return error(503, "server busy: too many images waiting", "overloaded", headers={"Retry-After": "1"})
        method = state["rejector"].method
        scored = await asyncio.gather(*futures)
        results = [answer(loaded, name, s, options.top_k, method) for (name, _), s in zip(files, scored)]
        return JSONResponse({"model": str(loaded.source.name), "results": results})

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        """Classify one or several images: multipart field `file` (repeatable), or a raw image body."""
        if not state["ready"]:
            return error(503, "the model is not loaded yet", "not_ready", headers={"Retry-After": "1"})
        counters.requests["predict"] += 1
        start = time.perf_counter()
        try:
            response = await asyncio.wait_for(predict_images(request), options.timeout_s)
        except TimeoutError:
            return error(504, f"no answer within {options.timeout_s:g} s", "timeout")
        counters.latency_ms.append((time.perf_counter() - start) * 1000.0)
        counters.seconds["answer"] += time.perf_counter() - start
        del counters.latency_ms[:-10000]
        return response

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 once the model is loaded and warmed up."""
        if not state["ready"]:
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ready", "waiting": state["batcher"].waiting})

    @app.get("/model")
    async def model_info() -> JSONResponse:
        """The model's classes, preprocessing, calibration, rejection rule, metrics and format."""
        loaded: Classifier = state["classifier"]
        rejector = state["rejector"]
        described = loaded.describe()
        described["source"] = loaded.source.name
        described["rejection"] = {"method": rejector.method, "threshold": rejector.threshold}
        return JSONResponse(described)

    @app.get("/stats")
    async def stats() -> JSONResponse:
        """Requests, errors by kind, batch sizes and latency percentiles since start."""
        batcher = state["batcher"]
        latency = np.asarray(counters.latency_ms) if counters.latency_ms else np.zeros(1)
        sizes = {str(k): v for k, v in sorted(batcher.stats.sizes.items())}
        seconds = {**counters.seconds, "model": batcher.stats.model_seconds}
        return JSONResponse({
            "requests": dict(counters.requests), "errors": dict(counters.errors), "images": batcher.stats.images,
            "batches": batcher.stats.batches, "batch_sizes": sizes, "seconds": seconds,
            "latency_ms": {"p50": float(np.percentile(latency, 50)), "p99": float(np.percentile(latency, 99))},
        })  # fmt: skip

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        """The web page: pick or drop photos, see their classes."""
        return HTMLResponse(resources.files("clothcli").joinpath("templates/serve.html").read_text("utf-8"))

    app.add_middleware(BodyLimit, limit=options.max_body_bytes)
    return app


def serve(
    *,
    model: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    options: ServeOptions | None = None,
    on_start: Any = None,
) -> None:
    """Serve `model` until SIGTERM or Ctrl-C: one uvicorn process, one event loop; the model runs in one
    thread (its runtime's own threads use the cores) and uploads decode in `decode_threads` threads.
    `on_start` is called once the model has loaded, before the server listens."""
    require_serving()
    import uvicorn

    options = options or ServeOptions()
    classifier = load_classifier(model, in_workers=False)  # a bad model or option fails here, in one line
    rejector_for(classifier, options.min_confidence)
    app = create_app(model, options, classifier=classifier)
    if on_start is not None:  # the model loaded: the caller says where it is served
        on_start()
    # uvicorn finishes what is in flight, then raises the signal again: a stop asked for is a clean exit
    previous = {sig: signal.signal(sig, _exit_with(code)) for sig, code in ((signal.SIGTERM, 0), (signal.SIGINT, 130))}
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _exit_with(code: int) -> Any:
    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(code)

    return handler
