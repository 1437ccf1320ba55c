"""How long a call takes in steady state: the one timing loop that flops, compare and benchmarks share."""

from __future__ import annotations

import time
from collections.abc import Callable


def steady_seconds(call: Callable[[], object], warmup_s: float = 0.3, measure_s: float = 1.0) -> float:
    """Seconds per call: the median of repeated timed calls, after warm-up calls that fill at least
    `warmup_s` (thread pools, allocator, kernel choice), repeated for at least `measure_s` and 5 times.
    Five fixed runs left two copies of one architecture 40% apart at batch 1."""

    def once() -> float:
        start = time.perf_counter()
        call()
        return time.perf_counter() - start

    began = time.perf_counter()
    while time.perf_counter() - began < warmup_s:
        once()
    timings: list[float] = []
    began = time.perf_counter()
    while len(timings) < 5 or time.perf_counter() - began < measure_s:
        timings.append(once())
    return sorted(timings)[len(timings) // 2]
