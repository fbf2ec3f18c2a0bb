"""The one place that turns a ``RunConfig`` into running objects.

``jetyolo run`` (``device.run``) and the bench's pipeline child (``device.bench.worker``) call
``run_configured``; nothing else reads a ``RunConfig`` for running. In order::

    check the sink URLs and TLS files      (a --sink typo fails before any wait or build)
    check the sources' names               (two on one topic, a name that is no topic level)
    check each source's classes, report    (a class the bundle lacks)
    check batch_size                       (above the bundle's batch)
    with ExitStack() as stack:
        source  = open the source          (a bad --source fails before a minutes-long build;
                                             a live one is waited for, source_timeout_s)
        backend = open the backend         (TensorRT engine loaded or built; not yet active)
        sinks   = open the sinks           (``online`` only with the first result)
        pipeline = Pipeline(backend, source, ..., sinks)
        attach_tracking(pipeline, ...)     (config.tracker: track ids, zones, lines, events)
        for extension in extensions:       (an HTTP endpoint, a reload handler...)
            extension(pipeline, config, stack)
        pipeline.run()                     (SIGTERM/SIGINT drain it)
    # the stack closes sinks, backend, source: the reverse order

Extension point: an ``Extension`` is ``f(pipeline, config, stack) -> None``, called once after
the pipeline is built and before it runs. It may add a frame hook (``pipeline.add_frame_hook``),
start a thread that reads ``pipeline.counters()`` (register its stop with ``stack.callback``:
it runs before the sinks close), or keep the pipeline to call ``swap_backend`` later (with a
backend from ``open_configured_backend``). It may raise ``JetyoloError`` to refuse the run:
everything opened so far is closed again.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

from device.backends import Backend, FrameSizeProbe, open_chosen
from device.bundle import Bundle
from device.choice import BackendChoice
from device.config import RunConfig, SourceEntry, optional_path
from device.detections import FrameResult
from device.errors import JetyoloError
from device.message import detections_topic
from device.multisource import MultiSource
from device.pipeline import (
    FrameSink,
    ModelInfo,
    Pipeline,
    ProgressNotifier,
    SourceFilter,
    batch_above_engine,
    stop_on_signals,
)
from device.postprocess import PostprocessConfig
from device.sdnotify import Notifier
from device.sinks import SinkOptions, check_sinks, open_checked_sinks
from device.sinks.base import is_topic_level
from device.sources import CaptureOptions, Source, default_source_name, open_source
from device.stats import RunSummary
from device.tracking import check_tracker_available
from device.tracking_stage import attach_tracking, source_tracking_config

LOG = logging.getLogger(__name__)
START_OPEN_MARGIN_S = 60.0  # FFmpeg's own connect timeouts are in the tens of seconds

Extension = Callable[[Pipeline, RunConfig, contextlib.ExitStack], None]


@dataclass
class RunParts:
    """What ``open_parts`` opened (all registered on the caller's ExitStack)."""

    bundle: Bundle
    source: Source
    backend: Backend
    sinks: FrameSink
    closer: _SourceCloser
    source_name: str = ""  # topics and messages (several sources: their names, comma-joined)
    filters: Dict[str, SourceFilter] = field(default_factory=dict)  # per source name


# ---- config -> settings ------------------------------------------------------------------------


def postprocess_config(config: RunConfig, bundle: Bundle) -> PostprocessConfig:
    """Thresholds: the config's, else the bundle manifest's."""
    defaults: Mapping[str, Any] = bundle.manifest.get("postprocess", {})
    fallback = PostprocessConfig()
    return PostprocessConfig(
        conf=config.conf if config.conf is not None else float(defaults.get("conf", fallback.conf)),
        iou=config.iou if config.iou is not None else float(defaults.get("iou", fallback.iou)),
        max_det=config.max_det if config.max_det is not None
        else int(defaults.get("max_det", fallback.max_det)),
    )


def source_timeout_s(config: RunConfig, env: Mapping[str, str] = os.environ) -> float:
    """How long a live source may take to open at start: the config's, else forever under
    systemd (``$NOTIFY_SOCKET``: a restart would only burn the start limit) and 0 elsewhere (a
    wrong URL typed at a shell fails at once)."""
    if config.source_timeout_s is not None:
        return config.source_timeout_s
    return float("inf") if env.get("NOTIFY_SOCKET") else 0.0


def capture_options(
    config: RunConfig, env: Mapping[str, str] = os.environ, entry: Optional[SourceEntry] = None,
    model_input: Optional[Tuple[int, int]] = None,
) -> CaptureOptions:
    """The config's capture settings; a ``sources:`` entry's own override them. ``model_input``
    (h, w): what the frames are letterboxed into (``decode_scale: auto`` needs it)."""

    def pick(name: str) -> Any:
        return entry.get(name, config) if entry is not None else getattr(config, name)

    return CaptureOptions(
        width=pick("capture_width"), height=pick("capture_height"), fps=pick("capture_fps"),
        rtsp_latency_ms=config.rtsp_latency_ms, reconnect_max_s=config.reconnect_max_s,
        source_timeout_s=source_timeout_s(config, env), decode_scale=config.decode_scale,
        model_input=model_input,
    )


def source_entries(config: RunConfig) -> List[SourceEntry]:
    """``sources:``, else the single ``source`` (with ``source_name``) as a list of one."""
    if config.sources:
        return list(config.sources)
    return [SourceEntry(source=config.source, name=config.source_name)]


def source_names(entries: Sequence[SourceEntry], topic: Callable[[str], str]) -> List[str]:
    """Each source's name (its topic level): its ``name``, else one made from the source.
    Refuses a name that is not one topic level and two sources on one topic (``topic(name)``)."""
    names: List[str] = []
    for index, entry in enumerate(entries):
        name = entry.name or default_source_name(entry.source)
        if not is_topic_level(name):
            raise JetyoloError(f"sources[{index}]: name {name!r} cannot be an MQTT topic level; "
                               "use letters, digits, '-', '_' or '.' in `name:`")
        if name in names:
            other = entries[names.index(name)]
            if entry.name and other.name:
                raise JetyoloError(f"sources: two sources are named {name!r}; give each a "
                                   "distinct `name:`")
            raise JetyoloError(f"sources: {other.source!r} and {entry.source!r} both resolve to "
                               f"topic {topic(name)}; give each a distinct `name:`")
        names.append(name)
    return names


def class_ids(classes: Sequence[str], class_names: Sequence[str], where: str) -> FrozenSet[int]:
    """``classes`` (names or ids) as the bundle's class ids; refuses one the bundle lacks."""
    ids = set()
    for item in classes:
        if item.isdigit() and int(item) < len(class_names):
            ids.add(int(item))
        elif item in class_names:
            ids.add(list(class_names).index(item))
        else:
            shown = ", ".join(class_names[:10]) + (", ..." if len(class_names) > 10 else "")
            raise JetyoloError(f"{where}: class {item!r} is not in the bundle ({shown}); use a "
                               f"class name or an id 0..{len(class_names) - 1}")
    return frozenset(ids)


def source_filters(
    config: RunConfig, entries: Sequence[SourceEntry], names: Sequence[str],
    class_names: Sequence[str],
) -> Dict[str, SourceFilter]:
    """Each source's own threshold and class filter (``sources:`` conf and classes, else the
    top-level classes); sources with neither are left out."""
    filters: Dict[str, SourceFilter] = {}
    for index, (entry, name) in enumerate(zip(entries, names)):
        own = "classes" in entry.overrides
        classes = entry.get("classes", config)
        ids = class_ids(classes, class_names, f"sources[{index}]: classes" if own
                        else "classes") if classes else None
        conf = entry.overrides.get("conf")
        if conf is not None or ids is not None:
            filters[name] = SourceFilter(conf, ids)
    return filters


def check_batch_size(config: RunConfig, bundle: Bundle) -> None:
    """``batch_size`` within the bundle's batch (the manifest's input dim 0)."""
    engine_batch = bundle.max_batch()
    if config.batch_size is not None and config.batch_size > engine_batch:
        raise JetyoloError(f"{bundle.root}: {batch_above_engine(config.batch_size, engine_batch)}")


def open_sources(
    config: RunConfig, entries: Sequence[SourceEntry], names: Sequence[str], notifier: Any,
    model_input: Optional[Tuple[int, int]] = None,
) -> Source:
    """The one source, or a ``MultiSource`` over several (each opened in order; if one fails,
    those already open are closed again)."""
    reporter = start_wait_reporter(notifier)
    named: List[Tuple[str, Source]] = []
    try:
        for entry, name in zip(entries, names):
            options = capture_options(config, entry=entry, model_input=model_input)
            named.append((name, open_source(entry.source, options, reporter)))
    except BaseException:
        for _, source in named:
            source.close()
        raise
    return named[0][1] if len(named) == 1 else MultiSource(named)


def sink_options(config: RunConfig, bundle: Bundle) -> SinkOptions:
    extra: Dict[str, Any] = {}
    if config.device_id:
        extra["device_id"] = config.device_id
    if config.spool_dir:
        extra["spool_dir"] = config.spool_dir
    if config.spool_max_messages is not None:
        extra["spool_max_messages"] = config.spool_max_messages
    options = SinkOptions(
        class_names=bundle.class_names, model_id=bundle.model_id, prefix=config.topic_prefix,
        report=config.report, max_rate_hz=config.report_max_rate_hz, qos=config.mqtt_qos,
        mqtt_ca=optional_path(config.mqtt_ca), mqtt_cert=optional_path(config.mqtt_cert),
        mqtt_key=optional_path(config.mqtt_key),
        stats_interval_s=config.stats_interval_s, **extra,
    )
    if config.homeassistant:
        from device.ops.homeassistant import config_announcements

        options.announcements = config_announcements(config, options)
    return options


def model_info(config: RunConfig, bundle: Bundle) -> ModelInfo:
    """The model the pipeline publishes frames as: id, class names, thresholds."""
    return ModelInfo(bundle.model_id, tuple(bundle.class_names),
                     postprocess_config(config, bundle))


def open_configured_backend(
    config: RunConfig, bundle: Bundle, frame_size: Optional[FrameSizeProbe] = None
) -> Backend:
    """The (not yet activated) backend ``config`` names (``device.choice.BackendChoice``;
    ``frame_size``: the source's, asked for by the frame-input variant only)."""
    return open_chosen(BackendChoice.from_config(config), bundle, frame_size)


def start_wait_reporter(notifier: Any) -> Callable[[str, float], None]:
    """``on_wait`` for ``open_source`` while the unit is still starting (before READY=1):
    ``STATUS=`` names the camera and ``EXTEND_TIMEOUT_USEC`` covers the pause plus one slow
    open, so ``TimeoutStartSec=`` does not kill a process that is only waiting."""

    def report(name: str, pause_s: float) -> None:
        notifier.status(f"waiting for camera {name}")
        notifier.extend_timeout(pause_s + START_OPEN_MARGIN_S)

    return report


# ---- opening -----------------------------------------------------------------------------------


class _SourceCloser:
    """Closes the source at the end, unless the pipeline's capture thread is still blocked in
    a read of it (``Pipeline.still_reading``)."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.pipeline: Optional[Pipeline] = None

    def close(self) -> None:
        if self.pipeline is not None and self.pipeline.still_reading():
            LOG.warning("setup: %s is still in a read; not closing it", self.source.name)
            return
        self.source.close()


def open_parts(
    config: RunConfig,
    stack: contextlib.ExitStack,
    notifier: Any,
    sinks: Optional[FrameSink] = None,
) -> RunParts:
    """Source, backend, sinks (``sinks`` given: those, not opened here), in that order, each
    closed by ``stack``. The sink URLs and TLS files are checked before anything opens."""
    bundle = Bundle.load(config.bundle)
    options = sink_options(config, bundle)
    entries = source_entries(config)
    names = source_names(entries, lambda name: detections_topic(options.prefix,
                                                                options.device_id, name))
    options.source_reports = {name: entry.overrides["report"] for entry, name in
                              zip(entries, names) if "report" in entry.overrides}
    options.check()
    checked = check_sinks(config.sinks, options) if sinks is None else []
    filters = source_filters(config, entries, names, bundle.class_names)
    check_batch_size(config, bundle)
    for name in names:  # every source's tracking checked before anything opens
        tracking = source_tracking_config(config.tracker, config.tracking, name,
                                          bundle.class_names, "config", names)
        check_tracker_available(tracking.tracker)
    source = open_sources(config, entries, names, notifier, bundle.input_size)
    closer = _SourceCloser(source)
    stack.callback(closer.close)
    backend = open_configured_backend(config, bundle, source.frame_size)
    stack.callback(backend.deactivate)  # a no-op when the inference thread already did
    if sinks is None:
        sinks = stack.enter_context(open_checked_sinks(checked, options))
    return RunParts(bundle, source, backend, sinks, closer, ",".join(names), filters)


def build_pipeline(
    config: RunConfig, parts: RunParts, notifier: Optional[ProgressNotifier],
    max_frames: Optional[int] = None,
) -> Pipeline:
    return Pipeline(
        parts.backend, parts.source, parts.bundle.input_size,
        postprocess_config(config, parts.bundle), parts.sinks,
        buffers=config.buffers,
        max_frames=max_frames if max_frames is not None else config.max_frames,
        stats_interval_s=config.stats_interval_s,
        notifier=notifier,
        precision=parts.backend.precision,
        source_name=parts.source_name or None,
        model=model_info(config, parts.bundle),
        batch_size=config.batch_size,
        batch_timeout_ms=config.batch_timeout_ms,
        source_filters=parts.filters,
    )


class _OneSource:
    """One source of several, as ``attach_tracking`` sees a pipeline: its frame hook runs on
    that source's frames only, its stats merge into one ``tracking`` section."""

    def __init__(self, pipeline: Pipeline, name: str, stats: List[Callable[[], Any]]) -> None:
        self.source_name = name
        self.sinks = pipeline.sinks
        self._pipeline = pipeline
        self._stats = stats

    def add_frame_hook(self, hook: Callable[[FrameResult], FrameResult]) -> None:
        name = self.source_name
        self._pipeline.add_frame_hook(lambda result: hook(result) if result.source == name
                                      else result)

    def add_stats(self, provider: Callable[[], Dict[str, Any]]) -> None:
        self._stats.append(provider)


def attach_source_tracking(config: RunConfig, parts: RunParts, pipeline: Pipeline) -> None:
    """Each source's tracker (one per source: track ids never cross cameras)."""
    names = parts.source_name.split(",")
    if len(names) == 1:
        stage = attach_tracking(pipeline, config.tracker, config.tracking,
                                parts.bundle.class_names, parts.source.live)
        if stage is not None:
            pipeline.tracking[names[0]] = stage
        return
    stats: List[Callable[[], Dict[str, Any]]] = []
    live = {feed.name: feed.source.live for feed in getattr(parts.source, "feeds", [])}
    for name in names:
        stage = attach_tracking(_OneSource(pipeline, name, stats), config.tracker,
                                config.tracking, parts.bundle.class_names, live.get(name, False),
                                run_sources=names)
        if stage is not None:
            pipeline.tracking[name] = stage
    if stats:
        pipeline.add_stats(lambda: {"tracking": {source: figures for provider in stats
                                                 for source, figures in
                                                 provider()["tracking"].items()}})


def run_configured(
    config: RunConfig,
    *,
    notifier: Optional[Notifier] = None,
    sinks: Optional[FrameSink] = None,
    wrap_sinks: Optional[Callable[[FrameSink], FrameSink]] = None,
    extensions: Sequence[Extension] = (),
    max_frames: Optional[int] = None,
    handle_signals: bool = True,
) -> RunSummary:
    """Open everything ``config`` names, run the pipeline to its end, close everything.

    ``sinks`` replaces the configured sinks (tests collect results); ``wrap_sinks`` decorates
    the opened ones (the bench records publish times). ``max_frames`` overrides the config's.
    Signals are handled only when called from the main thread.
    """
    notifier = notifier if notifier is not None else Notifier.from_env()
    with contextlib.ExitStack() as stack:
        parts = open_parts(config, stack, notifier, sinks)
        if wrap_sinks is not None:
            parts.sinks = wrap_sinks(parts.sinks)
        pipeline = build_pipeline(config, parts, notifier, max_frames)
        parts.closer.pipeline = pipeline
        attach_source_tracking(config, parts, pipeline)
        for extension in extensions:
            extension(pipeline, config, stack)
        with stop_on_signals(pipeline, handle_signals):
            return pipeline.run()
