"""Several sources in one pipeline (MultiSource): each on its own thread, handed out
round-robin (a fast camera cannot starve a slow one), per-source drops and counters, the run
ends when every source has ended, frames carry their source's name."""

from __future__ import annotations

import threading
from typing import Dict, List, Tuple

from test_pipeline import CollectingSink, EchoBackend, FakeSource, decoded_value, frame_value

from device.multisource import MultiSource
from device.pipeline import Pipeline
from device.postprocess import PostprocessConfig

SIZE = 64


def run(sources: MultiSource, sink: CollectingSink, **kwargs: object) -> Pipeline:
    pipeline = Pipeline(EchoBackend(**kwargs), sources, (SIZE, SIZE),  # type: ignore[arg-type]
                        PostprocessConfig(0.25, 0.45, 10), sink, stats_interval_s=0.05)
    pipeline.run()
    return pipeline


def test_every_frame_of_every_file_source_keeps_its_name_and_order() -> None:
    sink = CollectingSink()
    multi = MultiSource([("left", FakeSource(12)), ("right", FakeSource(7))])
    pipeline = run(multi, sink)
    for name, count in (("left", 12), ("right", 7)):
        mine = [r for r in sink.results if r.source == name]
        assert [r.frame_index for r in mine] == list(range(count))
        assert [decoded_value(r) for r in mine] == [frame_value(i) for i in range(count)]
    stats = pipeline.stats_message(0.0)["sources"]  # what every stats message carries
    assert stats["left"]["frames"] == 12 and stats["right"]["ended"]
    assert {"dropped_frames", "reconnects", "last_frame_age_s", "up"} <= set(stats["left"])


def fast_and_slow(
    backend: object, **kwargs: object
) -> Tuple[MultiSource, Pipeline, CollectingSink]:
    """A camera that always has a frame waiting next to one with 15 frames 30 ms apart, run
    until the slow one has delivered them all; kwargs go to the Pipeline."""
    fast = FakeSource(5000, live=True, interval_s=0.002)  # always has a frame waiting
    slow = FakeSource(15, live=True, interval_s=0.03)
    multi = MultiSource([("fast", fast), ("slow", slow)])
    holder: Dict[str, Pipeline] = {}

    def stop_when_slow_is_done(_count: int) -> None:
        if slow.captured == 15 and not holder["p"]._stop.is_set():
            holder["p"].request_stop("test")

    sink = CollectingSink(on_frame=stop_when_slow_is_done)
    holder["p"] = Pipeline(backend, multi, (SIZE, SIZE),  # type: ignore[arg-type]
                           PostprocessConfig(0.25, 0.45, 10), sink, **kwargs)  # type: ignore[arg-type]
    holder["p"].run()
    return multi, holder["p"], sink


def test_a_fast_camera_does_not_starve_a_slow_one() -> None:
    multi, _, sink = fast_and_slow(EchoBackend(delay_s=0.02))
    slow_results = [r for r in sink.results if r.source == "slow"]
    per_source = multi.per_source()
    # without round-robin the slow camera got 3 of 15 here; the fast one must be the one dropping
    assert len(slow_results) >= 9 and per_source["slow"]["dropped_frames"] <= 6
    assert per_source["fast"]["dropped_frames"] > 0


def test_counters_are_summed_and_a_source_in_a_read_is_not_closed() -> None:
    class Stuck(FakeSource):
        def __init__(self) -> None:
            super().__init__(1, live=True)
            self.release = threading.Event()

        def frames(self, stop: threading.Event):  # type: ignore[no-untyped-def]
            yield from super().frames(stop)
            self.release.wait(5)

    first, stuck = FakeSource(2), Stuck()
    first.decode_errors, stuck.reconnects = 2, 3
    multi = MultiSource([("a", first), ("b", stuck)])
    assert (multi.decode_errors, multi.reconnects, multi.live) == (2, 3, False)
    stop = threading.Event()
    frames: List[object] = []
    for frame in multi.frames(stop):
        frames.append(frame)
        if len(frames) == 3:
            stop.set()
            break
    multi.close()
    assert first.closed and not stuck.closed  # never released under a blocked read
    stuck.release.set()


def test_the_stats_message_with_sources_matches_the_schema() -> None:
    import json
    from pathlib import Path

    import jsonschema

    from device.message import build_stats_message
    from device.sinks import SinkOptions

    pipeline = run(MultiSource([("a", FakeSource(3)), ("b", FakeSource(2))]), CollectingSink())
    schema = json.loads((Path(__file__).resolve().parents[2] / "docs" /
                         "message.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    sinks = {"intake": 0, "intake_dropped": 0, "frames_reported": 0, "frames_skipped": 0,
             "per_sink": {}}
    options = SinkOptions(device_id="dev", model_id="m", spool_dir=Path("/nonexistent"))
    stats = {**pipeline.stats_message(1.0), "sinks": sinks}
    message = json.loads(json.dumps(build_stats_message(stats, 1, options, 0.0)))
    assert set(message["sources"]) == {"a", "b"} and list(validator.iter_errors(message)) == []
    assert set(message["sources"]["a"]["latency_ms"]) == {"p50", "p99"}
    for broken in ({"up": "yes"}, {"fps": -1}, {"latency_ms": {"p50": 1.0, "p95": 2.0}}):
        copy = json.loads(json.dumps(message))
        copy["sources"]["a"].update(broken)
        assert list(validator.iter_errors(copy))  # the check can fail
