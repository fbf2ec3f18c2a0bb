"""The bench ceiling keeps as many calls in flight as the pipeline does (its own session
settings), never more, and never hands one seat's buffers to two calls at once; the pipeline's
inference CPU is reported only where it can be measured."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, Mapping, Optional

import numpy as np
import pytest

from device.backends.base import InferTiming
from device.backends.onnxruntime import OnnxRuntimeBackend
from device.bench.worker import calls_in_flight, infer_cpu_ms_per_frame
from device.pipeline import StageTime


class CountingBackend:
    """Runs each call on a pool of ``concurrency`` threads and records the overlaps."""

    def __init__(self, concurrency: int, pool_size: int) -> None:
        self.concurrency = concurrency
        self._pool = ThreadPoolExecutor(pool_size)
        self._lock = threading.Lock()
        self.running = 0
        self.most_running = 0
        self.seats_busy: set = set()
        self.seat_clashes = 0
        self.calls = 0

    def _call(self, out: Dict[str, np.ndarray]) -> InferTiming:
        seat = id(out)
        with self._lock:
            self.seat_clashes += seat in self.seats_busy
            self.seats_busy.add(seat)
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        time.sleep(0.002)
        with self._lock:
            self.running -= 1
            self.seats_busy.discard(seat)
            self.calls += 1
        return InferTiming(0.002, 0.0)

    def submit(self, feed: Mapping[str, np.ndarray],
               out: Dict[str, np.ndarray]) -> Future[InferTiming]:
        return self._pool.submit(self._call, out)


def seats(count: int) -> List[Dict[str, np.ndarray]]:
    return [{"x": np.zeros(1)} for _ in range(count)]


@pytest.mark.parametrize("concurrency", [1, 2, 3])
def test_the_ceiling_keeps_the_pipelines_calls_in_flight(concurrency: int) -> None:
    backend = CountingBackend(concurrency, pool_size=8)  # the pool would take more at once
    samples = calls_in_flight(backend, seats(concurrency), seats(concurrency), 40)
    assert backend.calls == 40 and len(samples) == 40
    assert backend.most_running == concurrency
    assert backend.seat_clashes == 0


def test_a_shared_seat_would_be_seen() -> None:
    """The clash counter works: two calls on one seat's buffers at once are counted."""
    backend = CountingBackend(2, pool_size=2)
    shared = seats(1) * 2  # the same output dict for both seats
    calls_in_flight(backend, seats(2), shared, 20)
    assert backend.seat_clashes > 0


@pytest.mark.parametrize(("threads", "workers", "measured"), [
    (2, 2, True),  # two 1-thread calls: each runs on its calling thread, whose CPU time is read
    (1, 1, True),
    (2, 1, False),  # one 2-thread call: ORT's own pool thread would be missed
    (None, 1, False),  # ORT's default threads, the same
])
def test_inference_cpu_is_reported_only_where_the_calling_thread_does_all_of_it(
    threads: Optional[int], workers: int, measured: bool
) -> None:
    backend = OnnxRuntimeBackend("model.onnx", threads=threads, workers=workers)
    stage = StageTime(calls=10, wall_s=0.4, cpu_s=0.3)
    value = infer_cpu_ms_per_frame(backend, stage, 10)
    assert value == (pytest.approx(30.0) if measured else None)


def test_steady_cpu_per_frame_leaves_start_up_out() -> None:
    from device.bench.common import steady_cpu_ms_per_frame

    # 2.0 s of start-up before the first result, then 0.5 s per result
    assert steady_cpu_ms_per_frame([2.0, 2.5, 3.0, 3.5]) == pytest.approx(500.0)
    assert steady_cpu_ms_per_frame([2.0]) is None  # one result: no interval to divide
