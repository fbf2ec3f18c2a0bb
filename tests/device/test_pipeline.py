"""The threaded pipeline with a fake backend and fake sources: order, the buffer ring, drops on
live sources only, draining on stop, errors surfacing, stats and systemd notifications."""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import pytest

from device.backends.base import Backend, TensorSpec
from device.detections import FrameResult
from device.errors import JetyoloError
from device.pipeline import RELEASED, Pipeline
from device.postprocess import PostprocessConfig
from device.sources import Frame, Source

SIZE = 64  # frames and model input are SIZE x SIZE: no letterbox padding, scale 1
ANCHORS = 8


def frame_value(index: int) -> int:
    return 10 + (index * 7) % 40  # distinct for consecutive frames, inside the image


class FakeSource(Source):
    """``count`` frames; frame i is filled with ``frame_value(i)``."""

    def __init__(self, count: int, live: bool = False, interval_s: float = 0.0) -> None:
        super().__init__("fake")
        self.count, self.live, self.interval_s = count, live, interval_s
        self.captured = 0
        self.closed = False

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        for index in range(self.count):
            if stop.is_set():
                return
            if self.interval_s:
                time.sleep(self.interval_s)
            self.captured += 1
            yield Frame(index, time.time(), np.full((SIZE, SIZE, 3), frame_value(index), np.uint8))

    def close(self) -> None:
        self.closed = True


class EchoBackend(Backend):
    """Detects one box whose centre x is the input's pixel value, so each result names the frame
    it was computed from. Reads its input twice, ``delay_s`` apart, and records it when the
    buffer changed in between (a preprocess writing into a buffer under inference)."""

    kind = "echo"

    def __init__(self, delay_s: float = 0.0, fail_at: Optional[int] = None) -> None:
        super().__init__("echo")
        self.delay_s, self.fail_at = delay_s, fail_at
        self.calls = 0
        self.torn_reads = 0
        self.threads: set = set()
        self.deactivated = False
        self.between_reads: Optional[Callable[[], None]] = None  # a test's writer, if any

    def activate_impl(self) -> None:
        self.threads.add(threading.get_ident())

    def input_specs_impl(self) -> Dict[str, TensorSpec]:
        return {"images": TensorSpec("images", (1, 3, SIZE, SIZE), np.dtype(np.float32))}

    def output_specs_impl(self) -> Dict[str, TensorSpec]:
        return {
            "boxes": TensorSpec("boxes", (1, 4, ANCHORS), np.dtype(np.float32)),
            "scores": TensorSpec("scores", (1, 2, ANCHORS), np.dtype(np.float32)),
        }

    def infer_impl(
        self, feed: Mapping[str, np.ndarray], out: Optional[Dict[str, np.ndarray]]
    ) -> Dict[str, np.ndarray]:
        self.threads.add(threading.get_ident())
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("device lost")
        self.calls += 1
        first = float(feed["images"][0, 0, 5, 5])
        time.sleep(self.delay_s)
        if self.between_reads is not None:
            self.between_reads()
        if float(feed["images"][0, 0, 5, 5]) != first:
            self.torn_reads += 1
        if out is None:
            raise AssertionError("the pipeline passes output sets")
        value = round(first * 255)
        out["boxes"][...] = 0
        out["scores"][...] = 0
        out["boxes"][0, :, 0] = (value, 32, 4, 4)
        out["scores"][0, 1, 0] = 0.9
        return out

    def deactivate_impl(self) -> None:
        self.deactivated = True
        self.threads.add(threading.get_ident())


class CollectingSink:
    def __init__(self, delay_s: float = 0.0, on_frame: Any = None) -> None:
        self.results: List[FrameResult] = []
        self.stats: List[Dict[str, Any]] = []
        self.delay_s, self.on_frame = delay_s, on_frame

    def publish_frame(self, result: FrameResult) -> None:
        time.sleep(self.delay_s)
        self.results.append(result)
        if self.on_frame:
            self.on_frame(len(self.results))

    def publish_stats(self, stats: Dict[str, Any]) -> None:
        self.stats.append(stats)


class RecordingNotifier:
    def __init__(self) -> None:
        self.events: List[str] = []

    def ready(self, text: Optional[str] = None) -> bool:
        self.events.append("ready")
        return True

    def status(self, text: str) -> bool:
        self.events.append("status")
        return True

    def frame_done(self, count: int = 1, source: Optional[str] = None) -> bool:
        self.events.append("frame")
        return True

    def stopping(self, text: Optional[str] = None) -> bool:
        self.events.append(f"stopping: {text}")
        return True


def make_pipeline(
    source: Source, backend: Backend, sink: CollectingSink, **kwargs: Any
) -> Pipeline:
    return Pipeline(
        backend, source, (SIZE, SIZE), PostprocessConfig(0.25, 0.45, 10), sink, **kwargs
    )


def decoded_value(result: FrameResult) -> int:
    x1 = float(result.detections.xyxy[0, 0])
    return round(x1 + 2)  # box centre x minus half its width 4


def test_file_source_every_frame_in_order_from_its_own_buffer() -> None:
    source, backend, sink = FakeSource(40), EchoBackend(delay_s=0.003), CollectingSink()
    summary = make_pipeline(source, backend, sink).run()
    assert [r.frame_index for r in sink.results] == list(range(40))
    assert [decoded_value(r) for r in sink.results] == [frame_value(i) for i in range(40)]
    assert backend.torn_reads == 0 and summary.dropped == 0
    assert summary.frames == 40 and summary.fps > 0 and summary.stopped_by == "end of source"
    assert set(summary.latency_ms) == {"capture", "preprocess", "infer", "postprocess", "total"}
    assert all(set(v) == {"p50", "p90", "p99"} for v in summary.latency_ms.values())
    assert all(set(r.latency_ms) >= {"preprocess", "infer", "total"} for r in sink.results)
    assert all(r.frame_size == (SIZE, SIZE) for r in sink.results)
    assert not source.closed and backend.deactivated  # the source's owner closes it
    assert len(backend.threads) == 1  # activate, infer and deactivate on one thread (CUDA)


def test_the_buffer_check_would_catch_a_shared_buffer() -> None:
    # a pipeline whose preprocess wrote into the buffer under inference would tear reads:
    # simulate that by writing into the fed buffer from another thread during infer
    backend = EchoBackend()
    first_read, written = threading.Event(), threading.Event()

    def write_when_read() -> None:
        if first_read.wait(30):
            buffer.fill(0.5)
        written.set()

    def hold_second_read() -> None:
        first_read.set()
        assert written.wait(30), "the writer thread did not run"

    with backend:
        buffer = backend.input_buffer
        buffer.fill(0.0)
        backend.between_reads = hold_second_read
        writer = threading.Thread(target=write_when_read)
        writer.start()
        backend.infer({"images": buffer}, out=backend.allocate_outputs())
        writer.join(30)
        backend.between_reads = None
        backend.infer({"images": buffer}, out=backend.allocate_outputs())  # nothing writes
    assert backend.torn_reads == 1


def test_live_source_drops_oldest_when_behind_and_files_never_drop() -> None:
    source, backend, sink = FakeSource(60, live=True), EchoBackend(delay_s=0.01), CollectingSink()
    summary = make_pipeline(source, backend, sink).run()
    assert summary.dropped > 0
    assert summary.frames + summary.dropped == source.captured == 60
    indices = [r.frame_index for r in sink.results]
    assert indices == sorted(indices) and indices[-1] == 59  # the newest frame is never dropped
    assert [decoded_value(r) for r in sink.results] == [frame_value(i) for i in indices]


def test_max_frames() -> None:
    sink = CollectingSink()
    summary = make_pipeline(FakeSource(40), EchoBackend(), sink, max_frames=5).run()
    assert summary.frames == 5 and summary.stopped_by == "max frames"
    assert [r.frame_index for r in sink.results] == [0, 1, 2, 3, 4]


def test_request_stop_drains_frames_in_flight() -> None:
    source = FakeSource(10_000)
    holder: Dict[str, Pipeline] = {}

    def stop_after_five(published: int) -> None:
        if published == 5:
            holder["p"].request_stop("signal SIGTERM")

    sink = CollectingSink(on_frame=stop_after_five)
    pipeline = make_pipeline(source, EchoBackend(delay_s=0.002), sink)
    holder["p"] = pipeline
    summary = pipeline.run()
    assert summary.stopped_by == "signal SIGTERM"
    assert 5 <= summary.frames < 10_000
    # drained: every frame that was captured was published, none lost in the queues
    assert summary.frames == source.captured
    assert [r.frame_index for r in sink.results] == list(range(summary.frames))


def test_an_inference_error_stops_everything_and_is_raised() -> None:
    source, backend = FakeSource(100), EchoBackend(fail_at=3)
    with pytest.raises(RuntimeError, match="device lost"):
        make_pipeline(source, backend, CollectingSink()).run()
    assert not source.closed and backend.deactivated  # the source's owner closes it


def test_a_model_that_does_not_fit_the_bundle_size_is_refused() -> None:
    source, backend = FakeSource(3), EchoBackend()
    pipeline = Pipeline(backend, source, (320, 320), PostprocessConfig(), CollectingSink())
    with pytest.raises(JetyoloError, match="does not fit the bundle's preprocess size"):
        pipeline.run()
    assert not source.closed and backend.deactivated and source.captured == 0  # owner closes


def test_stats_and_notifications() -> None:
    sink, notifier = CollectingSink(), RecordingNotifier()
    pipeline = make_pipeline(
        FakeSource(30), EchoBackend(delay_s=0.005), sink, stats_interval_s=0.05, notifier=notifier
    )
    pipeline.run()
    assert notifier.events[0] == "ready"  # after the first frame, not before
    assert notifier.events.count("ready") == 1 and notifier.events.count("frame") == 30
    assert notifier.events[-1] == "stopping: stopped: end of source"
    assert sink.stats, "a stats message every stats_interval_s"
    stats = sink.stats[-1]
    assert stats["backend"] == "echo" and stats["fps"] > 0 and "infer" in stats["latency_ms"]
    assert stats["dropped_frames"] == 0 and stats["decode_errors"] == 0


def test_stats_and_status_name_the_source_by_its_short_name() -> None:
    # a stream URL with a password must not reach the MQTT stats message or systemd's STATUS=
    source = FakeSource(10)
    source.name = "rtsp://user:s3cret@cam3/live"
    sink, notifier = CollectingSink(), RecordingNotifier()
    texts: List[str] = []
    notifier.ready = lambda text=None: texts.append(str(text)) or True  # type: ignore[method-assign]
    make_pipeline(source, EchoBackend(delay_s=0.005), sink, stats_interval_s=0.01,
                  notifier=notifier, source_name="cam3").run()
    assert sink.stats and {s["source"] for s in sink.stats} == {"cam3"}
    assert texts == ["running: echo on cam3"]
    assert {r.source for r in sink.results} == {"cam3"}


def test_stage_stats_percentiles_window_and_summary_line() -> None:
    from device.stats import RunSummary, StageStats

    stats = StageStats(stages=("infer", "total"), window=100)
    for value in range(1, 251):  # 250 frames into a window of 100: frames 151..250 are kept
        stats.record({"infer": float(value)})  # "total" never measured: left out
    percentiles = stats.percentiles()
    assert set(percentiles) == {"infer"}
    kept = np.arange(151, 251, dtype=float)
    assert percentiles["infer"] == {
        f"p{p}": round(float(np.percentile(kept, p)), 3) for p in (50, 90, 99)
    }
    assert stats.percentiles(last=10)["infer"]["p50"] == 245.5  # frames 241..250
    assert stats.count == 250
    summary = RunSummary(frames=300, seconds=3.871, fps=77.5, latency_ms=percentiles)
    lines = summary.format_lines()
    assert lines[0] == "frames 300, seconds 3.87, FPS 77.5"
    assert lines[1].split()[:4] == ["infer", "ms", "p50", "200.50"]


class StuckSource(FakeSource):
    """A live camera that delivers ``count`` frames, then hangs in a read that ignores stops."""

    def __init__(self, count: int) -> None:
        super().__init__(count, live=True)
        self.unstick = threading.Event()

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        yield from super().frames(stop)
        self.unstick.wait()  # a read that never returns


def test_a_stop_does_not_hang_on_a_stuck_camera(monkeypatch: pytest.MonkeyPatch) -> None:
    import device.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "DRAIN_TIMEOUT_S", 0.3)
    monkeypatch.setattr(pipeline_module, "JOIN_TIMEOUT_S", 0.2)
    source = StuckSource(3)
    holder: Dict[str, Pipeline] = {}

    def stop_after_the_last_frame(published: int) -> None:
        if published + holder["p"].summary().dropped == 3:  # a live source may drop some
            holder["p"].request_stop("signal SIGTERM")

    sink = CollectingSink(on_frame=stop_after_the_last_frame)
    pipeline = make_pipeline(source, EchoBackend(), sink)
    holder["p"] = pipeline
    outcome: Dict[str, Any] = {}
    runner = threading.Thread(target=lambda: outcome.update(summary=pipeline.run()), daemon=True)
    runner.start()
    runner.join(5)  # without a drain deadline run() would wait for the stuck read forever
    returned = not runner.is_alive()
    source.unstick.set()
    assert returned, "run() hung on a stop with a stuck capture thread"
    summary = outcome["summary"]
    assert summary.frames + summary.dropped == 3 and summary.stopped_by == "signal SIGTERM"
    assert sink.results[-1].frame_index == 2
    assert pipeline.still_reading()  # so the owner does not release the device under it


def test_stats_carry_uptime_precision_queues_and_device_readings() -> None:
    readings = {"temperatures_c": {"GPU-therm": 41.5}, "gpu_load_pct": 37.2}
    sink = CollectingSink()
    pipeline = make_pipeline(FakeSource(30), EchoBackend(delay_s=0.005), sink,
                             stats_interval_s=0.05, precision="fp16", readings=lambda: readings)
    started = time.monotonic()
    pipeline.run()
    stats = sink.stats[-1]
    assert 0 < stats["uptime_s"] <= time.monotonic() - started + 0.1
    assert stats["precision"] == "fp16" and stats["jetson"] == readings
    assert set(stats["queues"]) == {"captured", "preprocessed", "inferred"}
    assert all(0 <= depth <= 3 for depth in stats["queues"].values())
    # off a Jetson (no readings) there is no block at all, and no precision when none is known
    sink = CollectingSink()
    make_pipeline(FakeSource(10), EchoBackend(delay_s=0.005), sink, stats_interval_s=0.02,
                  readings=dict).run()
    assert sink.stats and all("jetson" not in s and "precision" not in s for s in sink.stats)


# ---- extension points ------------------------------------------------------------------------


class WideEchoBackend(EchoBackend):
    """An EchoBackend whose model takes another input size: a swap to it must be refused."""

    def input_specs_impl(self) -> Dict[str, TensorSpec]:
        return {"images": TensorSpec("images", (1, 3, SIZE * 2, SIZE * 2), np.dtype(np.float32))}


def test_frame_hooks_run_in_order_and_may_replace_the_result() -> None:
    seen: List[str] = []

    def first(result: FrameResult) -> FrameResult:
        seen.append("first")
        return result

    def rename(result: FrameResult) -> FrameResult:
        seen.append("rename")
        return FrameResult("renamed", result.frame_index, result.timestamp, result.frame_size,
                           result.detections, result.latency_ms)

    sink = CollectingSink()
    pipeline = make_pipeline(FakeSource(5), EchoBackend(), sink)
    pipeline.add_frame_hook(first)
    pipeline.add_frame_hook(rename)
    pipeline.run()
    assert seen == ["first", "rename"] * 5
    assert [r.source for r in sink.results] == ["renamed"] * 5


def test_a_failing_hook_stops_the_run_with_its_error() -> None:
    def broken(result: FrameResult) -> FrameResult:
        raise JetyoloError("tracker state lost")

    pipeline = make_pipeline(FakeSource(20), EchoBackend(), CollectingSink())
    pipeline.add_frame_hook(broken)
    with pytest.raises(JetyoloError, match="tracker state lost"):
        pipeline.run()


def test_stage_times_and_counters_are_recorded_by_the_stages() -> None:
    sink = CollectingSink()
    pipeline = make_pipeline(FakeSource(12), EchoBackend(delay_s=0.01), sink)
    live: List[Dict[str, Any]] = []
    sink.on_frame = lambda count: live.append(pipeline.counters()) if count == 6 else None
    pipeline.run()
    times = pipeline.stage_times()
    assert [times[s].calls for s in ("preprocess", "infer", "postprocess")] == [12, 12, 12]
    assert times["infer"].wall_s >= 12 * 0.01  # the backend sleeps 10 ms a call
    assert times["infer"].cpu_s < times["infer"].wall_s  # sleeping costs no CPU
    assert times["preprocess"].cpu_s > 0
    assert live[0]["frames"] == 5  # read while frame 6 was being published
    after = pipeline.counters()
    assert after["frames"] == 12 and after["backend_swaps"] == 0
    assert after["stages"]["infer"]["calls"] == 12 and after["fps_since_start"] > 0


def test_swap_backend_between_frames_keeps_every_frame_and_retires_the_old_one() -> None:
    old, new = EchoBackend(delay_s=0.002), EchoBackend(delay_s=0.002)
    sink = CollectingSink()
    pipeline = make_pipeline(FakeSource(40), old, sink)
    calls_when_old_retired: List[int] = []
    old.deactivate_impl = lambda: calls_when_old_retired.append(new.calls)  # type: ignore
    sink.on_frame = lambda count: pipeline.swap_backend(new) if count == 10 else None
    summary = pipeline.run()
    assert summary.frames == 40
    assert [decoded_value(r) for r in sink.results] == [frame_value(i) for i in range(40)]
    assert pipeline.swap_result() == "swapped to echo" and pipeline.counters()["backend_swaps"] == 1
    assert old.calls + new.calls == 40 and old.calls >= 10 and new.calls >= 20
    assert calls_when_old_retired and calls_when_old_retired[0] < new.calls  # before the end
    assert new.deactivated and old.torn_reads == new.torn_reads == 0
    assert old.threads | new.threads == {next(iter(old.threads))}  # all on the inference thread


def test_a_swap_to_a_model_with_another_input_is_refused_and_the_old_one_runs_on() -> None:
    old, wide = EchoBackend(), WideEchoBackend()
    sink = CollectingSink()
    pipeline = make_pipeline(FakeSource(20), old, sink)
    sink.on_frame = lambda count: pipeline.swap_backend(wide) if count == 5 else None
    summary = pipeline.run()
    assert summary.frames == 20 and old.calls == 20 and wide.calls == 0
    assert pipeline.swap_result().startswith("refused: its input images [1, 3, 128, 128]")
    assert wide.deactivated and pipeline.counters()["backend_swaps"] == 0


class ConcurrentEchoBackend(EchoBackend):
    """EchoBackend whose ``submit`` runs calls on a pool of ``workers`` threads, the earlier call
    of each pair finishing later (frame order must be restored by the pipeline)."""

    def __init__(self, workers: int = 2, delay_s: float = 0.01) -> None:
        super().__init__(delay_s=delay_s)
        from concurrent.futures import ThreadPoolExecutor

        self.concurrency = workers
        self._pool = ThreadPoolExecutor(workers)
        self.submitted = 0
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()

    def submit(self, feed: Mapping[str, np.ndarray], out: Dict[str, np.ndarray]) -> Any:
        self.submitted += 1
        slow = self.submitted % 2 == 1  # odd calls take three times longer

        def call() -> Any:
            with self._lock:
                self._in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self._in_flight)
            time.sleep(self.delay_s * (3 if slow else 1))
            try:
                return self.timed_infer(feed, out)
            finally:
                with self._lock:
                    self._in_flight -= 1

        return self._pool.submit(call)


def test_concurrent_inference_keeps_frame_order_and_every_frame() -> None:
    source, backend, sink = FakeSource(30), ConcurrentEchoBackend(workers=2), CollectingSink()
    summary = make_pipeline(source, backend, sink, buffers=4).run()
    assert [r.frame_index for r in sink.results] == list(range(30))
    assert [decoded_value(r) for r in sink.results] == [frame_value(i) for i in range(30)]
    assert backend.max_in_flight == 2  # two calls really ran at once
    assert summary.dropped == 0 and backend.torn_reads == 0
    assert make_pipeline(FakeSource(1), EchoBackend(), CollectingSink()).backend.concurrency == 1


class AgeRecordingBackend(EchoBackend):
    """Records, at each inference, how many frames the source had captured after this one."""

    def __init__(self, source: FakeSource, delay_s: float) -> None:
        super().__init__(delay_s=delay_s)
        self.source = source
        self.behind: List[int] = []

    def infer_impl(self, feed: Mapping[str, np.ndarray], out: Any) -> Dict[str, np.ndarray]:
        value = round(float(feed["images"][0, 0, 5, 5]) * 255)
        index = next(i for i in range(self.source.captured - 1, -1, -1) if frame_value(i) == value)
        self.behind.append(self.source.captured - 1 - index)
        return super().infer_impl(feed, out)


def test_live_inference_takes_the_newest_frame_not_a_standing_queue() -> None:
    """A live camera faster than inference: each inference starts on a frame captured a few
    frames ago at most. Before latest-frame-wins, preprocess took a frame and then waited for a
    free buffer, and frames queued in front of inference: 2-3 inference times stale."""
    source = FakeSource(120, live=True, interval_s=0.004)
    backend = AgeRecordingBackend(source, delay_s=0.04)  # ten frames arrive per inference
    sink = CollectingSink()
    summary = make_pipeline(source, backend, sink, buffers=3).run()
    behind = sorted(backend.behind)
    assert summary.dropped > 0 and len(behind) > 5
    # A frame waits for the inference under way (10 frames long): half of it on average.
    # Measured: median 6 (before the fix: 21, two inference times).
    assert behind[len(behind) // 2] < 10, behind


def test_frames_carry_the_model_whose_backend_inferred_them() -> None:
    from device.pipeline import ModelInfo

    old, new = EchoBackend(delay_s=0.002), EchoBackend(delay_s=0.002)
    first, second = ModelInfo("a@1", ("car", "bus")), ModelInfo("b@2", ("truck", "van"))
    sink = CollectingSink()
    pipeline = make_pipeline(FakeSource(30), old, sink, model=first)
    sink.on_frame = lambda count: pipeline.swap_backend(new, second) if count == 10 else None
    pipeline.run()
    models = [r.model_id for r in sink.results]
    switch = models.index("b@2")
    # One switch, at the first frame the new backend inferred; nothing after it is "a@1".
    assert models == ["a@1"] * switch + ["b@2"] * (30 - switch)
    assert switch >= 10 and new.calls == 30 - switch
    assert sink.results[-1].class_names == ("truck", "van")


def test_a_model_scoring_other_classes_than_its_names_is_refused_at_start_and_at_a_swap() -> None:
    from device.pipeline import ModelInfo

    two, three = ModelInfo("a@1", ("car", "bus")), ModelInfo("b@2", ("car", "bus", "van"))
    source = FakeSource(3)
    with pytest.raises(JetyoloError, match="model b@2: the model scores 2 classes, "
                                           "class_names has 3"):
        make_pipeline(source, EchoBackend(), CollectingSink(), model=three).run()
    assert source.captured == 0
    old, new, sink = EchoBackend(), EchoBackend(), CollectingSink()
    pipeline = make_pipeline(FakeSource(20), old, sink, model=two)
    sink.on_frame = lambda count: pipeline.swap_backend(new, three) if count == 5 else None
    assert pipeline.run().frames == 20 and old.calls == 20 and new.calls == 0
    assert pipeline.swap_result().startswith("refused: model b@2: the model scores 2 classes")
    assert {result.model_id for result in sink.results} == {"a@1"}


def test_max_frames_counts_published_frames_on_a_live_source_too() -> None:
    """A live source drops frames when behind: it reads on until max_frames were published,
    and frames still in flight past that are not published."""
    source = FakeSource(500, live=True, interval_s=0.002)
    sink = CollectingSink()
    summary = make_pipeline(source, EchoBackend(delay_s=0.02), sink, max_frames=6).run()
    assert len(sink.results) == summary.frames == 6 and summary.stopped_by == "max frames"
    assert summary.dropped > 0 and source.captured > 6


class WeakSource(FakeSource):
    """FakeSource keeping a weak reference to each frame's image (to see when it is freed)."""

    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.images: Dict[int, weakref.ref] = {}

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        for frame in super().frames(stop):
            self.images[frame.index] = weakref.ref(frame.image)
            yield frame


def alive_at_publish(wants_image: bool) -> Tuple[List[bool], List[Tuple[int, ...]]]:
    """Per frame: was its full image still alive when its result was published, and the image
    shapes an observer got (wanting the images or not)."""
    source, sink = WeakSource(6), CollectingSink()
    pipeline = make_pipeline(source, EchoBackend(delay_s=0.01), sink)
    alive: List[bool] = []
    shapes: List[Tuple[int, ...]] = []

    def at_publish(result: FrameResult) -> FrameResult:
        alive.append(source.images[result.frame_index]() is not None)
        return result

    pipeline.add_frame_hook(at_publish)
    pipeline.add_frame_observer(lambda image, _result: shapes.append(image.shape),
                                lambda _source: wants_image)
    pipeline.run()
    return alive, shapes


def test_a_frame_nobody_wants_to_see_is_let_go_once_letterboxed() -> None:
    alive, shapes = alive_at_publish(wants_image=False)
    assert alive == [False] * 6 and shapes == [RELEASED.shape] * 6
    alive, shapes = alive_at_publish(wants_image=True)  # a preview viewer: kept for it
    assert alive == [True] * 6 and shapes == [(SIZE, SIZE, 3)] * 6
