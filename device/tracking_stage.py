"""The per-frame tracking step of one source: tracker, then its zones and lines.

``SourceTracking.process`` runs after postprocessing, on the thread that publishes, once per
frame in capture order. It returns the frame with ``track_id`` on each detection, the events of
that frame, and the zones whose occupancy changed (their retained count is re-sent). Zones and
lines are bound to the frame size at the first frame (normalised points need it; pixel points are
checked against it) and again if a live source comes back at another size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

from device.detections import FrameResult
from device.tracking import Tracker, make_tracker
from device.tracking_config import SourceTrackingConfig, parse_tracking
from device.zones import (
    RegionSpec,
    SourceRegions,
    TrackEvent,
    ZoneCount,
    bind,
    check_classes,
    class_ids_of,
)

TRACK_STAGE = "track"  # its latency_ms key


@dataclass
class TrackedFrame:
    result: FrameResult  # detections with track_id
    events: List[TrackEvent] = field(default_factory=list)
    changed_zones: List[ZoneCount] = field(default_factory=list)


class SourceTracking:
    """Tracking state of one source; not thread-safe (one publishing thread per source)."""

    def __init__(
        self,
        tracker: Tracker,
        source: str,
        zones: Sequence[RegionSpec] = (),
        lines: Sequence[RegionSpec] = (),
        class_names: Sequence[str] = (),
        live: bool = False,
        absent_frames: int = 30,
        origin: str = "config",
    ) -> None:
        self.tracker = tracker
        self.source = source
        mine = (None, source)
        self._specs = (tuple(z for z in zones if z.source in mine),
                       tuple(line for line in lines if line.source in mine))
        self._class_names = list(class_names)
        self._followed: Optional[Sequence[str]] = None  # the last frame's class names, as is
        self._live = live  # live sources drop frames: the Kalman step follows capture time
        self._absent_frames = absent_frames
        self._origin = origin
        self._bound: Optional[Tuple[Tuple[int, int], SourceRegions]] = None
        self._announced = False  # every zone's count goes out once, at the first frame

    def regions(self, frame_size: Tuple[int, int]) -> SourceRegions:
        size = (int(frame_size[0]), int(frame_size[1]))
        if self._bound is None or self._bound[0] != size:
            previous = self._bound[1] if self._bound else None
            regions = bind(*self._specs, self.source, size, self._class_names, self._origin,
                           self._absent_frames)
            if previous is not None:  # a new frame size: the counts so far carry over
                for line, old in zip(regions.lines, previous.lines):
                    line.counts = dict(old.counts)
            self._bound = (size, regions)
        return self._bound[1]

    def follow_classes(self, class_names: Sequence[str]) -> None:
        """After a model swap: the zones' and lines' class filters, and the classes of the tracks
        already inside a zone, by name in the new model's class ids (the reloader refused a
        model that lacks a filtered class)."""
        if class_names is self._followed:  # one tuple per model: the per-frame test is cheap
            return
        self._followed = class_names
        if list(class_names) == self._class_names:
            return
        new_ids = {old: class_names.index(name) for old, name in enumerate(self._class_names)
                   if name in class_names}
        self._class_names = list(class_names)
        if self._bound is None:
            return
        regions, origin = self._bound[1], self._origin
        for zone, spec in zip(regions.zones, self._specs[0]):
            zone.class_ids = class_ids_of(spec, class_names, f"{origin}: zones")
            zone.renumber_classes(new_ids)
        for line, spec in zip(regions.lines, self._specs[1]):
            line.class_ids = class_ids_of(spec, class_names, f"{origin}: lines")

    def process(self, result: FrameResult) -> TrackedFrame:
        started = time.perf_counter()
        if result.class_names:  # the model that computed it (it changes at a swap)
            self.follow_classes(result.class_names)
        detections = self.tracker.update(result.detections,
                                         result.timestamp if self._live else None)
        regions = self.regions(result.frame_size)
        before = regions.zone_counts()
        events = regions.update(detections, result.timestamp)
        changed = [z.snapshot() for z in regions.zones
                   if not self._announced or z.count != before[z.name]]
        self._announced = True
        # the same dict: the pipeline adds postprocess and total to it after the hooks
        result.latency_ms[TRACK_STAGE] = (time.perf_counter() - started) * 1000.0
        tracked = replace(result, detections=detections)
        return TrackedFrame(tracked, events, changed)

    def stats(self) -> Dict[str, Any]:
        """``{"lines": {name: {"in", "out"}}, "zones": {name: count}}`` (the stats' tracking)."""
        if self._bound is None:
            return {"lines": {s.name: {"in": 0, "out": 0} for s in self._specs[1]},
                    "zones": {s.name: 0 for s in self._specs[0]}}
        regions = self._bound[1]
        return {"lines": regions.line_counts(), "zones": regions.zone_counts()}


def source_tracking_config(
    tracker: str, tracking: Any, source: str, class_names: Sequence[str], origin: str,
    run_sources: Sequence[str] = (),
) -> SourceTrackingConfig:
    """What ``source`` runs, checked against the run's sources (``run_sources``, default just
    ``source``) and the model's classes (what can be checked before the source opens and the
    engine builds)."""
    parsed = parse_tracking(tracking, origin)
    parsed.check_sources(tuple(run_sources) or (source,), f"{origin}: tracking")
    mine = parsed.for_source(tracker, source, f"{origin}: tracking")
    check_classes(mine.zones + mine.lines, class_names, f"{origin}: tracking")
    return mine


class TrackingPipeline(Protocol):
    """What ``attach_tracking`` needs of ``device.pipeline.Pipeline``."""

    source_name: str
    sinks: Any

    def add_frame_hook(self, hook: Callable[[FrameResult], FrameResult]) -> None: ...

    def add_stats(self, provider: Callable[[], Dict[str, Any]]) -> None: ...


def attach_tracking(
    pipeline: TrackingPipeline,
    tracker: str,
    tracking: Any,
    class_names: Sequence[str],
    live: bool,
    origin: str = "config",
    run_sources: Sequence[str] = (),
) -> Optional[SourceTracking]:
    """Add the tracking step of the pipeline's source (its frame hook, its stats), or None when
    that source does not track. Everything wrong is a JetyoloError before the first frame."""
    source = pipeline.source_name
    mine = source_tracking_config(tracker, tracking, source, class_names, origin, run_sources)
    made = make_tracker(mine.tracker, mine.settings)
    if made is None:
        return None
    settings = mine.settings
    stage = SourceTracking(made, source, mine.zones, mine.lines, class_names, live,
                           absent_frames=round(settings.lost_track_buffer * settings.frame_rate
                                               / 30.0), origin=f"{origin}: tracking")
    # Sinks without publish_events (a test's collector) still get the tracked detections.
    publish_events = getattr(pipeline.sinks, "publish_events", None)

    def hook(result: FrameResult) -> FrameResult:
        tracked = stage.process(result)
        if publish_events is not None:
            publish_events(tracked)
        return tracked.result

    pipeline.add_frame_hook(hook)
    pipeline.add_stats(lambda: {"tracking": {source: stage.stats()}})
    return stage
