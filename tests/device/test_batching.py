"""Batched inference across sources: batches of up to ``batch_size`` frames gathered
round-robin, ``batch_timeout_ms`` bounding the wait for stragglers, partial batches on a
``dynamic_batch`` backend (k rows) and on a static one (all N rows, extra ignored), each
source's frames in order, and a batch-N graph giving the batch-1 detections (ONNX Runtime on a
dynamic-batch copy of the tiny detector)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import pytest
from test_multisource import fast_and_slow
from test_pipeline import CollectingSink, EchoBackend, FakeSource, decoded_value, frame_value

from device.backends.base import TensorSpec
from device.backends.onnxruntime import OnnxRuntimeBackend
from device.detections import FrameResult
from device.errors import JetyoloError
from device.multisource import MultiSource
from device.pipeline import Pipeline, SourceFilter
from device.postprocess import PostprocessConfig
from device.sources import Frame, Source

SIZE = 64
ANCHORS = 8
TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_detector.onnx"


class BatchEchoBackend(EchoBackend):
    """EchoBackend with a batch dimension N: output row i echoes input row i. Records the
    rows of every call; ``dynamic`` makes it take 1..N rows (else always N)."""

    kind = "echo-batch"

    def __init__(self, batch: int, dynamic: bool = True, delay_s: float = 0.0) -> None:
        super().__init__(delay_s)
        self.batch = batch
        self.dynamic_batch = dynamic
        self.rows: List[int] = []

    def input_specs_impl(self) -> Dict[str, TensorSpec]:
        return {"images": TensorSpec("images", (self.batch, 3, SIZE, SIZE), np.dtype(np.float32))}

    def output_specs_impl(self) -> Dict[str, TensorSpec]:
        return {
            "boxes": TensorSpec("boxes", (self.batch, 4, ANCHORS), np.dtype(np.float32)),
            "scores": TensorSpec("scores", (self.batch, 2, ANCHORS), np.dtype(np.float32)),
        }

    def infer_impl(
        self, feed: Mapping[str, np.ndarray], out: Optional[Dict[str, np.ndarray]]
    ) -> Dict[str, np.ndarray]:
        if out is None:
            raise AssertionError("the pipeline passes output sets")
        images = feed["images"]
        self.rows.append(len(images))
        time.sleep(self.delay_s)
        out["boxes"][: len(images)] = 0
        out["scores"][: len(images)] = 0
        for row in range(len(images)):
            out["boxes"][row, :, 0] = (round(float(images[row, 0, 5, 5]) * 255), 32, 4, 4)
            out["scores"][row, 1, 0] = 0.9
        return out


class TaggedSource(FakeSource):
    """FakeSource whose frame i of source s has the value ``frame_value(i) + s`` so a row mixed
    up between sources shows in the result."""

    def __init__(self, count: int, tag: int, **kwargs: object) -> None:
        super().__init__(count, **kwargs)  # type: ignore[arg-type]
        self.tag = tag

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        for frame in super().frames(stop):
            frame.image[...] = frame_value(frame.index) + self.tag
            yield frame


def batched(backend: object, source: Source, sink: CollectingSink, **kwargs: object) -> Pipeline:
    pipeline = Pipeline(backend, source, (SIZE, SIZE),  # type: ignore[arg-type]
                        PostprocessConfig(0.25, 0.45, 10), sink, **kwargs)  # type: ignore[arg-type]
    pipeline.run()
    return pipeline


def per_source(sink: CollectingSink, name: str) -> List[FrameResult]:
    return [result for result in sink.results if result.source == name]


@pytest.mark.parametrize("dynamic", [True, False])
def test_four_sources_share_batches_and_each_keeps_its_frames_in_order(dynamic: bool) -> None:
    backend = BatchEchoBackend(4, dynamic=dynamic, delay_s=0.01)
    sink = CollectingSink()
    multi = MultiSource([(f"cam{s}", TaggedSource(10, tag=s)) for s in range(4)])
    calls: List[int] = []
    pipeline = Pipeline(backend, multi, (SIZE, SIZE), PostprocessConfig(0.25, 0.45, 10), sink,
                        batch_timeout_ms=50)
    pipeline.add_batch_observer(calls.append)
    pipeline.run()
    assert sum(calls) == 40 and (calls == backend.rows or not dynamic)  # frames per call
    for tag in range(4):
        mine = per_source(sink, f"cam{tag}")
        assert [r.frame_index for r in mine] == list(range(10))
        assert [decoded_value(r) for r in mine] == [frame_value(i) + tag for i in range(10)]
    assert len(backend.rows) <= 15 and pipeline.counters()["batches"] == len(backend.rows)
    assert pipeline.batch_size == 4
    if not dynamic:  # a static graph always gets its N rows (the unused ones are ignored)
        assert set(backend.rows) == {4}


def test_partial_batches_run_as_k_rows_on_a_dynamic_backend() -> None:
    backend = BatchEchoBackend(4)
    sink = CollectingSink()
    multi = MultiSource([("a", FakeSource(9, interval_s=0.01)), ("b", FakeSource(3))])
    batched(backend, multi, sink, batch_timeout_ms=0)  # 0: only frames already waiting
    assert sum(backend.rows) == 12 and min(backend.rows) < 4
    assert [decoded_value(r) for r in per_source(sink, "a")] == [frame_value(i) for i in range(9)]


def test_batch_size_below_the_engines_caps_each_call() -> None:
    backend = BatchEchoBackend(4)
    sink = CollectingSink()
    multi = MultiSource([("a", FakeSource(8)), ("b", FakeSource(8))])
    batched(backend, multi, sink, batch_size=2, batch_timeout_ms=50)
    assert max(backend.rows) == 2 and sum(backend.rows) == 16


def test_a_batch_size_above_the_engines_is_refused() -> None:
    with pytest.raises(JetyoloError, match="batch_size 4 is above the engine's batch 2; lower"):
        batched(BatchEchoBackend(2), FakeSource(3), CollectingSink(), batch_size=4)


def test_a_fast_camera_does_not_starve_a_slow_one_in_batches() -> None:
    multi, pipeline, sink = fast_and_slow(BatchEchoBackend(2, delay_s=0.03), batch_timeout_ms=5)
    counts = multi.per_source()
    # each batch takes the slow camera's frame when it has one: it loses few, the fast one many
    assert len(per_source(sink, "slow")) >= 9 and counts["slow"]["dropped_frames"] <= 6
    assert counts["fast"]["dropped_frames"] > 0
    summary = pipeline.summary()  # the totals count each source's own drops
    assert summary.dropped == sum(section["dropped_frames"] for section in counts.values())


def frame_waits_ms(timeout_ms: float) -> List[float]:
    """Capture -> publish of a slow live camera (a frame every 0.3 s) on a batch-2 engine
    next to a source that has ended: what the batch timeout costs a frame."""
    sink = CollectingSink()
    multi = MultiSource([("slow", FakeSource(4, live=True, interval_s=0.3)),
                         ("gone", FakeSource(0, live=True))])
    batched(BatchEchoBackend(2), multi, sink, batch_timeout_ms=timeout_ms)
    return [r.latency_ms["total"] for r in per_source(sink, "slow")]


def test_the_batch_timeout_bounds_how_long_a_live_frame_waits_for_stragglers() -> None:
    bounded = frame_waits_ms(20)
    assert len(bounded) == 4 and max(bounded) < 250  # 20 ms + scheduling on a loaded machine
    waiting = frame_waits_ms(2000)  # longer than the camera's frame gap: a frame waits for the next
    assert max(waiting) >= 280


def live_ages_ms(seats: bool) -> List[float]:
    """Capture -> publish of two fast live cameras on a slow batch-2 engine (0.1 s a call, one
    call at a time, 3 input buffers): with the seat wait a batch is formed when a call can start;
    without it, filled buffers queue behind the call in flight while newer frames arrive."""
    sink = CollectingSink()
    multi = MultiSource([(name, FakeSource(400, live=True, interval_s=0.005)) for name in "ab"])
    pipeline = Pipeline(BatchEchoBackend(2, delay_s=0.1), multi, (SIZE, SIZE),
                        PostprocessConfig(0.25, 0.45, 10), sink, batch_timeout_ms=5)
    pipeline._live_pulled = seats
    pipeline.run()
    return [r.latency_ms["total"] for r in sink.results][4:]  # past the start-up


def test_several_live_cameras_wait_for_an_inference_seat_not_in_a_queue() -> None:
    with_seats, without = live_ages_ms(True), live_ages_ms(False)
    assert len(with_seats) >= 10 and len(without) >= 10
    assert float(np.median(with_seats)) < 200 <= float(np.median(without))


def test_per_source_threshold_and_class_filter() -> None:
    sink = CollectingSink()
    multi = MultiSource([(name, FakeSource(5)) for name in ("none", "high", "all")])
    filters = {"none": SourceFilter(class_ids=frozenset({0})),  # EchoBackend detects class 1
               "high": SourceFilter(conf=0.95)}  # above its 0.9 score
    batched(BatchEchoBackend(2), multi, sink, source_filters=filters, batch_timeout_ms=20)
    counts = {name: sum(len(r.detections) for r in per_source(sink, name))
              for name in ("none", "high", "all")}
    assert counts == {"none": 0, "high": 0, "all": 5}


def test_stats_have_per_source_fps_and_latency_percentiles() -> None:
    sink = CollectingSink()
    multi = MultiSource([("a", FakeSource(20, interval_s=0.005)), ("b", FakeSource(20))])
    pipeline = batched(BatchEchoBackend(2), multi, sink, batch_timeout_ms=5)
    sources = pipeline.stats_message(0.0)["sources"]
    for name in ("a", "b"):
        assert sources[name]["fps"] > 0
        latency = sources[name]["latency_ms"]
        assert set(latency) == {"p50", "p99"} and 0 < latency["p50"] <= latency["p99"]
    assert pipeline.stats_message(0.0)["sources"]["a"]["fps"] == 0.0  # nothing new since
    summary = pipeline.summary()
    assert summary.batch_size == 2 and summary.sources["b"]["frames"] == 20
    assert any(line.startswith("  source a: 20 frames, total ms p50 ") for line in
               summary.format_lines())


# ---- ONNX Runtime: a dynamic-batch graph ------------------------------------------------------


def dynamic_tiny(path: Path) -> Path:
    """tests/fixtures/tiny_detector.onnx with dim 0 symbolic ("batch"), as `jetyolo export
    --batch N` writes it: the head's Reshape copies dim 0 instead of a fixed 1."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(TINY))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    for index, init in enumerate(model.graph.initializer):
        if init.name == "/head/shape":
            shape = numpy_helper.to_array(init).copy()
            shape[0] = 0  # Reshape: 0 copies the input's dim
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(shape, init.name))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def static_tiny(path: Path, batch: int) -> Path:
    """The tiny detector with a static batch of ``batch`` (an older `--batch N` export)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(TINY))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = batch
    for index, init in enumerate(model.graph.initializer):
        if init.name == "/head/shape":
            shape = numpy_helper.to_array(init).copy()
            shape[0] = batch
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(shape, init.name))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def dynamic_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dynamic_tiny(tmp_path_factory.mktemp("dyn") / "tiny_dynamic.onnx")


@pytest.fixture(scope="module")
def static2_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return static_tiny(tmp_path_factory.mktemp("static") / "tiny_b2.onnx", 2)


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 3, SIZE, SIZE), dtype=np.float32)


@pytest.mark.parametrize("io_binding", [True, False])
def test_onnxruntime_pins_a_symbolic_batch_and_runs_k_rows(
    dynamic_model: Path, io_binding: bool
) -> None:
    with OnnxRuntimeBackend(TINY, threads=1) as single, \
            OnnxRuntimeBackend(dynamic_model, threads=1, max_batch=4,
                               io_binding=io_binding) as batch:
        assert batch.dynamic_batch and not single.dynamic_batch
        assert batch.input_spec.shape == (4, 3, SIZE, SIZE)
        assert {spec.shape[0] for spec in batch.output_specs.values()} == {4}
        buffer = batch.allocate_inputs(1)[0]
        buffer[:] = images(4)
        out = batch.allocate_outputs()
        for array in out.values():
            array[...] = -1.0  # rows past k stay as they were
        batch.infer({"images": buffer[:3]}, out=out)
        for row in range(3):
            alone = single.infer({"images": np.ascontiguousarray(buffer[row:row + 1])})
            for name in ("boxes", "scores"):
                np.testing.assert_allclose(out[name][row:row + 1], alone[name], atol=1e-5)
        assert (out["scores"][3] == -1.0).all()
        with pytest.raises(JetyoloError, match=r"model wants \['1..4', 3, 64, 64\]"):
            batch.infer({"images": np.zeros((5, 3, SIZE, SIZE), np.float32)}, out=out)
        with pytest.raises(JetyoloError, match=r"model wants \[1, 3, 64, 64\]"):
            single.infer({"images": np.zeros((2, 3, SIZE, SIZE), np.float32)})


def test_a_symbolic_batch_without_the_manifests_batch_is_refused(dynamic_model: Path) -> None:
    with pytest.raises(JetyoloError, match="has dynamic shape"):
        OnnxRuntimeBackend(dynamic_model, threads=1).activate()


class RowSwapping(OnnxRuntimeBackend):
    """A broken batch: output rows 0 and 1 swapped (what a mixed-up gather would publish)."""

    def infer_impl(
        self, feed: Mapping[str, np.ndarray], out: Optional[Dict[str, np.ndarray]]
    ) -> Dict[str, np.ndarray]:
        result = super().infer_impl(feed, out)
        if len(feed["images"]) > 1:
            for array in result.values():
                array[[0, 1]] = array[[1, 0]]
        return result


class Noise(FakeSource):
    """Random frames (seeded by source and index), so each frame has its own detections."""

    def __init__(self, count: int, seed: int) -> None:
        super().__init__(count)
        self.seed = seed

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        for index in range(self.count):
            rng = np.random.default_rng((self.seed, index))
            yield Frame(index, time.time(), rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8))


def detections_by_frame(backend: OnnxRuntimeBackend, **kwargs: object) -> Dict[Tuple[str, int],
                                                                               np.ndarray]:
    sink = CollectingSink()
    multi = MultiSource([("left", Noise(12, seed=1)), ("right", Noise(12, seed=2))])
    batched(backend, multi, sink, **kwargs)
    return {(r.source, r.frame_index): np.concatenate(
        [r.detections.xyxy, r.detections.confidence[:, None], r.detections.class_id[:, None]],
        axis=1) for r in sink.results}


def same_detections(one: Mapping[Tuple[str, int], np.ndarray],
                    other: Mapping[Tuple[str, int], np.ndarray]) -> bool:
    return one.keys() == other.keys() and all(
        one[key].shape == other[key].shape and np.allclose(one[key], other[key], atol=1e-3)
        for key in one)


def test_batched_onnxruntime_gives_the_batch_1_detections(dynamic_model: Path) -> None:
    reference = detections_by_frame(OnnxRuntimeBackend(TINY, threads=1))
    assert len(reference) == 24 and sum(len(d) for d in reference.values()) > 24
    batched_run = detections_by_frame(
        OnnxRuntimeBackend(dynamic_model, threads=2, workers=2, max_batch=4), batch_timeout_ms=50)
    assert same_detections(reference, batched_run)
    swapped = detections_by_frame(RowSwapping(dynamic_model, threads=1, max_batch=4),
                                  batch_timeout_ms=50)
    assert not same_detections(reference, swapped)  # the comparison sees mixed-up rows


def test_a_static_batch_2_graph_gets_both_rows_and_gives_the_batch_1_detections(
    static2_model: Path,
) -> None:
    reference = detections_by_frame(OnnxRuntimeBackend(TINY, threads=1))
    static = OnnxRuntimeBackend(static2_model, threads=1, max_batch=2)
    assert same_detections(reference, detections_by_frame(static, batch_timeout_ms=0))
    assert not static.dynamic_batch  # every call had both rows (check_feed refuses fewer)


def test_a_source_reports_in_its_own_mode() -> None:
    from device.detections import Detections
    from device.sinks.sinkset import ReportPolicy

    policy = ReportPolicy("every", per_source={"door": "non-empty", "yard": "events"})
    empty = Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                       np.zeros(0, np.int32))

    def result(source: str) -> FrameResult:
        return FrameResult(source=source, frame_index=0, timestamp=0.0, frame_size=(8, 8),
                           detections=empty, latency_ms={})

    assert [policy.should_report(result(name)) for name in ("door", "yard", "gate")] == [
        False, False, True]
