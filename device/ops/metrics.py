"""Prometheus metrics of a run, through prometheus-client (its own registry, ``generate_latest``).

Two kinds of numbers, so that nothing is counted twice and the frame loop pays almost nothing:

- **Read at scrape time** (``RunCollector``): frames, drops, decode errors, reconnects and FPS
  per source, the sinks' queue and spool depths, the spool's oldest message age, MQTT
  connection state, the model/engine identity (an info metric) and the Jetson's sysfs readings.
  They come from a ``snapshot()`` callable over the run's own live counters; a scrape costs the
  frame loop nothing.
- **Observed per frame** (``FrameMetrics.observe``): stage latency histograms and inference
  batch sizes, which have no running total elsewhere. Children are cached per label set, so an
  observation is a few ``Histogram.observe`` calls (about a microsecond each).

Names follow Prometheus' conventions: ``_total`` counters, base units (seconds, watts,
ratios), ``jetyolo_`` prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from device.detections import FrameResult

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)


@dataclass
class SourceCounters:
    """One source's live counters, as the run reads them at scrape time."""

    name: str
    frames: int = 0
    dropped: int = 0
    decode_errors: int = 0
    reconnects: int = 0
    fps: float = 0.0
    seconds_since_progress: Optional[float] = None  # None: no frame published yet


@dataclass
class RunSnapshot:
    """What a scrape reads. ``sinks`` is ``SinkSet.depths()``; ``jetson`` is
    ``jetson_readings()``; ``info`` is the model and engine identity (label -> value)."""

    sources: List[SourceCounters] = field(default_factory=list)
    sinks: Mapping[str, Any] = field(default_factory=dict)
    jetson: Mapping[str, Any] = field(default_factory=dict)
    info: Mapping[str, str] = field(default_factory=dict)


SnapshotFn = Callable[[], RunSnapshot]


def _counter(name: str, doc: str, labels: Sequence[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def source_metrics(sources: Sequence[SourceCounters]) -> List[Metric]:
    frames = _counter("jetyolo_frames", "Frames processed and published", ["source"])
    dropped = _counter("jetyolo_dropped_frames", "Live frames dropped because the pipeline "
                       "was behind", ["source"])
    decode = _counter("jetyolo_decode_errors", "Frames that failed to decode", ["source"])
    reconnects = _counter("jetyolo_reconnects", "Reconnects of a live source", ["source"])
    fps = _gauge("jetyolo_fps", "Frames per second over the last stats interval", ["source"])
    age = _gauge("jetyolo_seconds_since_last_frame", "Seconds since the source's last "
                 "published frame", ["source"])
    for source in sources:
        labels = [source.name]
        frames.add_metric(labels, source.frames)
        dropped.add_metric(labels, source.dropped)
        decode.add_metric(labels, source.decode_errors)
        reconnects.add_metric(labels, source.reconnects)
        fps.add_metric(labels, source.fps)
        if source.seconds_since_progress is not None:
            age.add_metric(labels, source.seconds_since_progress)
    return [frames, dropped, decode, reconnects, fps, age]


def sink_metrics(depths: Mapping[str, Any]) -> List[Metric]:
    """From ``SinkSet.depths()``; the MQTT fields only for MQTT sinks."""
    queue = _gauge("jetyolo_sink_queue_depth", "Messages waiting in a sink's memory queue",
                   ["sink"])
    dropped = _counter("jetyolo_sink_dropped_messages", "Messages a sink dropped or failed "
                       "to send", ["sink"])
    spool = _gauge("jetyolo_spool_depth", "MQTT messages in the on-disk spool, not yet "
                   "acknowledged", ["sink"])
    oldest = _gauge("jetyolo_spool_oldest_age_seconds", "Age of the oldest spooled MQTT "
                    "message (0 when the spool is empty)", ["sink"])
    connected = _gauge("jetyolo_mqtt_connected", "1 while the MQTT sink is connected",
                       ["sink"])
    reported = _counter("jetyolo_frames_reported", "Frame messages handed to the sinks", [])
    reported.add_metric([], float(depths.get("frames_reported", 0)))
    for name, sink in dict(depths.get("per_sink", {})).items():
        queue.add_metric([name], float(sink.get("queue", 0)))
        dropped.add_metric([name], float(sink.get("dropped", 0)))
        if "spool" in sink:
            spool.add_metric([name], float(sink["spool"]))
            oldest.add_metric([name], float(sink.get("spool_oldest_age_s") or 0.0))
        if "connected" in sink:
            connected.add_metric([name], 1.0 if sink["connected"] else 0.0)
    return [queue, dropped, spool, oldest, connected, reported]


def jetson_metrics(readings: Mapping[str, Any]) -> List[Metric]:
    """From ``jetson_readings()``: only the families whose sensors were readable."""
    metrics: List[Metric] = []
    temperatures = dict(readings.get("temperatures_c", {}))
    if temperatures:
        family = _gauge("jetyolo_jetson_temperature_celsius", "Thermal zone temperature",
                        ["zone"])
        for zone, celsius in temperatures.items():
            family.add_metric([zone], float(celsius))
        metrics.append(family)
    if "gpu_load_pct" in readings:
        load = _gauge("jetyolo_jetson_gpu_load_ratio", "GPU load (0-1)")
        load.add_metric([], float(readings["gpu_load_pct"]) / 100.0)
        metrics.append(load)
    rails = dict(readings.get("power_mw", {}))
    if rails:
        family = _gauge("jetyolo_jetson_power_watts", "Power of an INA3221 rail", ["rail"])
        for rail, milliwatts in rails.items():
            family.add_metric([rail], float(milliwatts) / 1000.0)
        metrics.append(family)
    return metrics


class RunCollector(Collector):
    """Everything that is read, not observed: one ``snapshot()`` per scrape."""

    def __init__(self, snapshot: SnapshotFn) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        info = InfoMetricFamily("jetyolo_model", "Bundle, model and engine of this run")
        info.add_metric([], {key: str(value) for key, value in snap.info.items()})
        yield info
        yield from source_metrics(snap.sources)
        yield from sink_metrics(snap.sinks)
        yield from jetson_metrics(snap.jetson)


class FrameMetrics:
    """The per-frame observations (histograms), registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._latency = Histogram(
            "jetyolo_stage_latency_seconds", "Per-frame latency of each pipeline stage",
            ["source", "stage"], buckets=LATENCY_BUCKETS_S, registry=registry,
        )
        self._batch = Histogram(
            "jetyolo_inference_batch_size", "Images per inference call",
            buckets=BATCH_BUCKETS, registry=registry,
        )
        self._children: Dict[Tuple[str, str], Any] = {}

    def observe(self, result: FrameResult) -> None:
        for stage, milliseconds in result.latency_ms.items():
            if not math.isfinite(milliseconds):
                continue  # a stage that did not run for this frame
            key = (result.source, stage)
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._latency.labels(*key)
            child.observe(milliseconds / 1000.0)

    def observe_batch(self, images: int) -> None:
        """One inference call over ``images`` frames."""
        self._batch.observe(images)


class RunMetrics:
    """The registry of one run: ``observe(result)`` per frame, ``observe_batch(n)`` per inference
    call, ``exposition()`` per scrape."""

    def __init__(self, snapshot: SnapshotFn, process: bool = True) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(RunCollector(snapshot))
        if process:  # CPU seconds, resident memory, open fds of this process (from /proc)
            ProcessCollector(registry=self.registry)
        self.frames = FrameMetrics(self.registry)

    def observe(self, result: FrameResult) -> None:
        self.frames.observe(result)

    def observe_batch(self, images: int) -> None:
        self.frames.observe_batch(images)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
