"""The HTTP endpoint as a ``device.setup`` extension of ``jetyolo run``.

``http_extensions(config)`` checks the ``http*`` settings (address, credentials files) before
anything opens, so a bad setting fails in one line before a camera wait or an engine build, and
returns the extension to hand to ``run_configured``. Called with the built pipeline, the
extension adds one frame observer (latency histograms, FPS, last-frame time, preview offer) and
starts the server; the run's ExitStack closes it before the sinks close.

prometheus-client is imported only when ``http`` is set: a run without it loads nothing new.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from device.config import RunConfig, optional_path
from device.detections import FrameResult
from device.jetson_stats import jetson_readings
from device.ops.access import AccessPlan, plan_access
from device.ops.preview import Annotations, PreviewHub, Region
from device.pipeline import Pipeline
from device.sdnotify import watchdog_seconds

LOG = logging.getLogger(__name__)
DEFAULT_HEALTH_WINDOW_S = 30.0  # jetyolo.service's WatchdogSec=
FPS_WINDOW_S = 2.0


def health_window_s(env: Any = os.environ) -> float:
    """The systemd watchdog's window when there is one, else the unit's default."""
    return watchdog_seconds(env) or DEFAULT_HEALTH_WINDOW_S


@dataclass
class _Progress:
    """Per-source figures only the frame observer sees: when the last frame came, and FPS over
    the last ``FPS_WINDOW_S``."""

    last_at: Optional[float] = None
    fps: float = 0.0
    window_start: float = field(default_factory=time.monotonic)
    window_frames: int = 0

    def tick(self, now: float) -> None:
        self.last_at = now
        self.window_frames += 1
        elapsed = now - self.window_start
        if elapsed >= FPS_WINDOW_S:
            self.fps = self.window_frames / elapsed
            self.window_start, self.window_frames = now, 0


RegionsFn = Callable[[str, Tuple[int, int]], Sequence[Region]]


def no_regions(_source: str, _frame_size: Tuple[int, int]) -> Sequence[Region]:
    return ()


def preview_regions(regions: Any) -> List[Region]:
    """A source's bound zones and lines (``device.zones.SourceRegions``) as preview outlines,
    labelled with their live counts."""
    outlines = [Region(f"{zone.name}: {zone.count}", [tuple(p) for p in zone.polygon])
                for zone in regions.zones]
    outlines += [Region(f"{line.name}: in {line.counts['in']} out {line.counts['out']}",
                        [tuple(line.start), tuple(line.end)], closed=False)
                 for line in regions.lines]
    return outlines


def tracking_regions(tracking: Dict[str, Any]) -> RegionsFn:
    """The outlines of each source's tracking step (``Pipeline.tracking``: its zones and lines
    with their live counts); called on the publishing thread, as the tracking step is."""

    def regions(source: str, frame_size: Tuple[int, int]) -> Sequence[Region]:
        stage = tracking.get(source)
        return preview_regions(stage.regions(frame_size)) if stage is not None else ()

    return regions


def annotations_of(result: FrameResult, regions: RegionsFn = no_regions) -> Annotations:
    """Track ids (when a tracker set them on the detections) and the source's regions."""
    track_id = result.detections.track_id
    return Annotations(track_ids=None if track_id is None else track_id.tolist(),
                       regions=regions(result.source, result.frame_size))


class HttpExtension:
    """``extension(pipeline, config, stack)``: observer + server for one run."""

    def __init__(self, plan: AccessPlan, config: RunConfig,
                 regions: Optional[RegionsFn] = None) -> None:
        self.plan = plan
        # zones/lines to outline: (source, frame size) -> regions; None: the run's tracking
        self.regions = regions
        self.preview_fps = config.http_preview_fps
        self.variant = config.variant or "default"
        self.progress: Dict[str, _Progress] = {}
        self._lock = threading.Lock()
        self.endpoint: Any = None  # OpsEndpoint once started (tests read its address)

    def __call__(self, pipeline: Pipeline, config: RunConfig,
                 stack: contextlib.ExitStack) -> None:
        from device.ops.metrics import RunMetrics
        from device.ops.server import OpsEndpoint, OpsView

        options = getattr(pipeline.sinks, "options", None)
        class_names = list(getattr(options, "class_names", ()))
        info = self._info(pipeline, options)
        metrics = RunMetrics(lambda: self.snapshot(pipeline, info))
        previews = PreviewHub(class_names, max_fps=self.preview_fps)
        regions = self.regions or tracking_regions(pipeline.tracking)

        def observe(image: np.ndarray, result: FrameResult) -> None:
            self._progress(result.source).tick(time.monotonic())
            metrics.observe(result)
            # annotations only for a viewer; a viewer who came after the frame was
            # letterboxed gets the next one (this one's pixels were let go: RELEASED)
            if image.size and previews.watched(result.source):
                previews.offer(image, result, annotations_of(result, regions))

        pipeline.add_frame_observer(observe, previews.watched)
        pipeline.add_batch_observer(metrics.observe_batch)  # frames per inference call
        title = f"jetyolo {getattr(options, 'device_id', '')}".strip()
        view = OpsView(title, metrics, previews, lambda: self.snapshot(pipeline, info),
                       lambda: getattr(pipeline.sinks, "last_stats", None), health_window_s())
        self.endpoint = OpsEndpoint(self.plan, view).start()
        stack.callback(self.endpoint.close)

    def _progress(self, source: str) -> _Progress:
        found = self.progress.get(source)
        if found is None:
            with self._lock:
                found = self.progress.setdefault(source, _Progress())
        return found

    def _info(self, pipeline: Pipeline, options: Any) -> Dict[str, str]:
        return {
            "model_id": str(getattr(options, "model_id", "")),
            "device_id": str(getattr(options, "device_id", "")),
            "backend": pipeline.backend.kind,
            "backend_name": pipeline.backend.name,
            "precision": str(pipeline.precision or ""),
            "variant": self.variant,
        }

    def snapshot(self, pipeline: Pipeline, info: Dict[str, str]) -> Any:
        from device.ops.metrics import RunSnapshot, SourceCounters

        counters = pipeline.counters()
        name = str(counters["source"])
        progress = self.progress.get(name, _Progress())
        source = SourceCounters(
            name, frames=int(counters["frames"]), dropped=int(counters["dropped_frames"]),
            decode_errors=int(counters["decode_errors"]),
            reconnects=int(counters["reconnects"]), fps=round(progress.fps, 2),
            seconds_since_progress=None if progress.last_at is None
            else time.monotonic() - progress.last_at,
        )
        depths = getattr(pipeline.sinks, "depths", None)
        return RunSnapshot([source], depths() if callable(depths) else {}, jetson_readings(),
                           dict(info, backend=str(counters["backend"]),
                                backend_name=str(counters["backend_name"])))


def http_extensions(config: RunConfig) -> List[HttpExtension]:
    """The HTTP endpoint's extension when ``http`` is set (its settings checked now)."""
    if not config.http:
        if config.http_allow_remote or config.http_token_file or config.http_basic_auth_file:
            LOG.warning("http is not set: http_allow_remote/http_token_file/"
                        "http_basic_auth_file have no effect")
        return []
    plan = plan_access(config.http, config.http_allow_remote,
                       optional_path(config.http_token_file),
                       optional_path(config.http_basic_auth_file))
    return [HttpExtension(plan, config)]
