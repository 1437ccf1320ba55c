"""Dynamic batching for the server: images that arrive together go through the model as one batch.

FastAPI has no batching of its own, so this is the one piece the server adds: an asyncio queue that
one task drains, taking up to `max_batch` images or what arrived within `wait_s` of the first, and
running them through the backend (`Classifier.infer`) in a thread so the event loop keeps accepting.
The queue is bounded: past `max_queue` images waiting, `submit` refuses (the server answers 503)
instead of letting memory and latency grow without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from clothcli.backends import Classifier
from clothcli.engines.rejection import Rejector
from clothcli.metrics import probabilities


class Overloaded(Exception):
    """More images are waiting than the queue admits."""


@dataclass
class Scored:
    """One image's calibrated probabilities and whether the rejection rule rejected it."""

    probs: np.ndarray
    rejected: bool


@dataclass
class BatchStats:
    images: int = 0
    batches: int = 0
    sizes: Counter = field(default_factory=Counter)
    model_seconds: float = 0.0  # inside the backend's infer and the scoring, summed over batches


class Batcher:
    """Collects preprocessed images and scores them in batches (start it with `start`, drain with `stop`)."""

    def __init__(self, classifier: Classifier, rejector: Rejector, max_batch: int, wait_s: float, max_queue: int):
        self.classifier, self.rejector = classifier, rejector
        self.max_batch, self.wait_s, self.max_queue = max_batch, wait_s, max_queue
        self.queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future]] = asyncio.Queue()
        self.stats = BatchStats()
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="clothcli-model")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def stop(self) -> None:
        """Score what is queued, then end the task."""
        while not self.queue.empty():
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._model_thread.shutdown(wait=True)

    @property
    def waiting(self) -> int:
        return self.queue.qsize()

    def submit(self, images: list[np.ndarray]) -> list[asyncio.Future]:
        """Queue the images; their futures resolve to `Scored`. Overloaded when the queue is full."""
        if self.queue.qsize() + len(images) > self.max_queue:
            raise Overloaded
        loop = asyncio.get_running_loop()
        futures = []
        for image in images:
            future = loop.create_future()
            self.queue.put_nowait((image, future))
            futures.append(future)
        return futures

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0 and self.queue.empty():
                    break
                try:
                    batch.append(self.queue.get_nowait() if not self.queue.empty() else
                                 await asyncio.wait_for(self.queue.get(), max(remaining, 0)))  # fmt: skip
                except TimeoutError:
                    break
            live = [(image, future) for image, future in batch if not future.done()]
            if not live:
                continue
            images = np.stack([image for image, _ in live])
            try:
                scored = await loop.run_in_executor(self._model_thread, self._score, images)
            except Exception as exc:  # a failing batch fails its requests, never the server
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.stats.images += len(live)
            self.stats.batches += 1
            self.stats.sizes[len(live)] += 1
            for (_, future), result in zip(live, scored):
                if not future.done():
                    future.set_result(result)

    def _score(self, images: np.ndarray) -> list[Scored]:
        start = time.perf_counter()
        logits, features = self.classifier.infer(images, features=self.rejector.needs_features)
        probs = probabilities(logits, self.classifier.temperature)
        rejected = self.rejector.rejected(logits, features)
        self.stats.model_seconds += time.perf_counter() - start
        return [Scored(row, bool(flag)) for row, flag in zip(probs, rejected)]
