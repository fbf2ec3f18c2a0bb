"""The Prometheus registry: what a scrape reads from the live counters and what the frame loop
observes, parsed back with prometheus_client's own parser."""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from device.detections import Detections, FrameResult
from device.ops.metrics import RunMetrics, RunSnapshot, SourceCounters

Samples = Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]


def parse(text: bytes) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def result(source: str, infer_ms: float) -> FrameResult:
    return FrameResult(source, 0, 0.0, (64, 48), Detections.empty(),
                       {"capture": 1.0, "infer": infer_ms, "postprocess": float("nan")})


SINKS = {
    "frames_reported": 40,
    "per_sink": {
        "mqtt://user@broker:1883": {"queue": 3, "dropped": 1, "spool": 17,
                                    "spool_oldest_age_s": 12.5, "connected": False},
        "jsonl:/tmp/x": {"queue": 0, "dropped": 0},
    },
}
JETSON = {"temperatures_c": {"cpu-thermal": 47.5}, "gpu_load_pct": 61.0,
          "power_mw": {"VDD_IN": 6930.0}}


def snapshot() -> RunSnapshot:
    return RunSnapshot(
        sources=[SourceCounters("gate", frames=42, dropped=2, decode_errors=1, reconnects=3,
                                fps=29.5, seconds_since_progress=0.25),
                 SourceCounters("yard")],  # no frame yet: no age sample
        sinks=SINKS, jetson=JETSON,
        info={"model_id": "synth-1234", "backend": "tensorrt", "precision": "fp16"},
    )


def test_scrape_reads_the_live_counters() -> None:
    metrics = RunMetrics(snapshot)
    samples = parse(metrics.exposition())
    gate = (("source", "gate"),)
    assert samples[("jetyolo_frames_total", gate)] == 42
    assert samples[("jetyolo_dropped_frames_total", gate)] == 2
    assert samples[("jetyolo_decode_errors_total", gate)] == 1
    assert samples[("jetyolo_reconnects_total", gate)] == 3
    assert samples[("jetyolo_fps", gate)] == 29.5
    assert samples[("jetyolo_seconds_since_last_frame", gate)] == 0.25
    assert ("jetyolo_seconds_since_last_frame", (("source", "yard"),)) not in samples
    assert samples[("jetyolo_frames_total", (("source", "yard"),))] == 0
    mqtt = (("sink", "mqtt://user@broker:1883"),)
    assert samples[("jetyolo_spool_depth", mqtt)] == 17
    assert samples[("jetyolo_spool_oldest_age_seconds", mqtt)] == 12.5
    assert samples[("jetyolo_mqtt_connected", mqtt)] == 0
    assert samples[("jetyolo_sink_queue_depth", mqtt)] == 3
    assert ("jetyolo_spool_depth", (("sink", "jsonl:/tmp/x"),)) not in samples
    assert samples[("jetyolo_model_info", (("backend", "tensorrt"), ("model_id", "synth-1234"),
                                           ("precision", "fp16")))] == 1
    assert samples[("jetyolo_jetson_temperature_celsius", (("zone", "cpu-thermal"),))] == 47.5
    assert samples[("jetyolo_jetson_gpu_load_ratio", ())] == 0.61
    assert samples[("jetyolo_jetson_power_watts", (("rail", "VDD_IN"),))] == 6.93
    assert any(name == "process_resident_memory_bytes" for name, _ in samples)


def test_each_scrape_reads_again() -> None:
    counters = SourceCounters("gate", frames=1)
    metrics = RunMetrics(lambda: RunSnapshot(sources=[counters]), process=False)
    assert parse(metrics.exposition())[("jetyolo_frames_total", (("source", "gate"),))] == 1
    counters.frames = 7
    assert parse(metrics.exposition())[("jetyolo_frames_total", (("source", "gate"),))] == 7


def test_no_jetson_no_jetson_families() -> None:
    text = RunMetrics(lambda: RunSnapshot(), process=False).exposition().decode()
    assert "jetyolo_jetson" not in text
    assert "process_" not in text


def test_latency_histograms_and_batch_sizes() -> None:
    metrics = RunMetrics(lambda: RunSnapshot(), process=False)
    for infer_ms in (2.0, 8.0, 30.0):
        metrics.observe(result("gate", infer_ms))
    metrics.observe_batch(1)
    metrics.observe_batch(4)
    samples = parse(metrics.exposition())
    infer = (("source", "gate"), ("stage", "infer"))
    assert samples[("jetyolo_stage_latency_seconds_count", infer)] == 3
    assert abs(samples[("jetyolo_stage_latency_seconds_sum", infer)] - 0.040) < 1e-9
    bucket = tuple(sorted((*infer, ("le", "0.01"))))
    assert samples[("jetyolo_stage_latency_seconds_bucket", bucket)] == 2
    # NaN (a stage that did not run) is not observed
    post = (("source", "gate"), ("stage", "postprocess"))
    assert ("jetyolo_stage_latency_seconds_count", post) not in samples
    assert samples[("jetyolo_inference_batch_size_count", ())] == 2
    assert samples[("jetyolo_inference_batch_size_bucket", (("le", "2.0"),))] == 1


def test_observing_is_cheap_enough_to_run_per_frame() -> None:
    """Not a timing target: the observation reuses its label children (no growth per frame)."""
    metrics = RunMetrics(lambda: RunSnapshot(), process=False)
    frame = result("gate", 5.0)
    for _ in range(100):
        metrics.observe(frame)
    assert len(metrics.frames._children) == 2  # capture, infer (postprocess was NaN)
    assert np.isclose(parse(metrics.exposition())[
        ("jetyolo_stage_latency_seconds_count", (("source", "gate"), ("stage", "capture")))], 100)
