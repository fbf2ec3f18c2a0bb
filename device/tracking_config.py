"""The ``tracking`` config key: tracker settings, zones, lines and per-source overrides.

::

    tracker: bytetrack                 # the default; `none` turns tracking off
    tracking:
      settings: {lost_track_buffer: 30, track_activation_threshold: 0.5}
      zones:
        door: {polygon: [[0.1, 0.2], [0.4, 0.2], [0.4, 0.9], [0.1, 0.9]], normalized: true,
               classes: [person]}
      lines:
        gate: {start: [960, 0], end: [960, 1080], classes: [car]}
      sources:                         # per source name: its own tracker and settings
        yard: {tracker: none}

Everything is checked when the config is read (no frame, no model, no import of the tracking
libraries); the class names and pixel coordinates are checked against the model and the frame
when the run starts (``device.zones.bind``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from device.errors import JetyoloError
from device.tracking import TRACKER_KINDS, TrackerSettings
from device.zones import RegionSpec, parse_lines, parse_zones

TRACKING_KEYS = ("settings", "zones", "lines", "sources")
SOURCE_KEYS = ("tracker", "settings")


@dataclass(frozen=True)
class SourceTrackingConfig:
    """What one source runs."""

    tracker: str
    settings: TrackerSettings
    zones: Tuple[RegionSpec, ...] = ()
    lines: Tuple[RegionSpec, ...] = ()


@dataclass(frozen=True)
class TrackingConfig:
    settings: TrackerSettings = field(default_factory=TrackerSettings)
    zones: Tuple[RegionSpec, ...] = ()
    lines: Tuple[RegionSpec, ...] = ()
    sources: Dict[str, Tuple[Optional[str], Optional[TrackerSettings]]] = field(
        default_factory=dict)

    def for_source(self, tracker: str, source: str, origin: str) -> SourceTrackingConfig:
        """``tracker`` (the run's) unless ``sources`` overrides it; the zones and lines of
        ``source``. Zones or lines on a source that does not track: JetyoloError."""
        kind, settings = self.sources.get(source, (None, None))
        config = SourceTrackingConfig(
            kind or tracker, settings or self.settings,
            tuple(z for z in self.zones if z.source in (None, source)),
            tuple(line for line in self.lines if line.source in (None, source)))
        if config.tracker == "none" and (config.zones or config.lines):
            names = [r.name for r in config.zones + config.lines]
            raise JetyoloError(f"{origin}: zones and lines need track ids, but source "
                               f"{source!r} has tracker: none ({', '.join(names)}); set "
                               "`tracker: bytetrack`")
        return config

    def check_sources(self, known: Tuple[str, ...], origin: str) -> None:
        """Every source a zone, line or override names is one of the run's sources."""
        named = [(f"zones.{r.name}", r.source) for r in self.zones]
        named += [(f"lines.{r.name}", r.source) for r in self.lines]
        named += [(f"sources.{name}", name) for name in self.sources]
        for where, source in named:
            if source is not None and source not in known:
                raise JetyoloError(f"{origin}: {where}: source {source!r} is not a source of "
                                   f"this run ({', '.join(known)}); use its source_name")


def parse_tracking(value: Any, origin: str) -> TrackingConfig:
    if value is None:
        return TrackingConfig()
    if not isinstance(value, Mapping):
        raise JetyoloError(f"{origin}: tracking must be a mapping with {', '.join(TRACKING_KEYS)}"
                           f", got {type(value).__name__}")
    for key in value:
        if key not in TRACKING_KEYS:
            raise JetyoloError(f"{origin}: tracking: unknown key {key!r}; allowed: "
                               f"{', '.join(TRACKING_KEYS)}")
    where = f"{origin}: tracking"
    return TrackingConfig(
        TrackerSettings.from_mapping(value.get("settings"), where),
        parse_zones(value.get("zones"), where),
        parse_lines(value.get("lines"), where),
        _overrides(value.get("sources"), where),
    )


def _overrides(
    value: Any, origin: str
) -> Dict[str, Tuple[Optional[str], Optional[TrackerSettings]]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise JetyoloError(f"{origin}: sources must map source names to {{tracker, settings}}")
    overrides = {}
    for name, body in value.items():
        where = f"{origin}: sources.{name}"
        if not isinstance(body, Mapping) or any(key not in SOURCE_KEYS for key in body):
            raise JetyoloError(f"{where}: must be a mapping of {', '.join(SOURCE_KEYS)}, "
                               f"got {body!r}")
        kind = body.get("tracker")
        if kind is not None and kind not in TRACKER_KINDS:
            raise JetyoloError(f"{where}: tracker {kind!r} is not known; use one of "
                               f"{', '.join(TRACKER_KINDS)}")
        settings = body.get("settings")
        overrides[str(name)] = (kind, None if settings is None
                                else TrackerSettings.from_mapping(settings, where))
    return overrides
