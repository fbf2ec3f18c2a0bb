"""Zones (polygons) and lines (segments) of one source, fed by tracked detections.

Each is a small value with ``trigger(detections)`` (per-detection booleans, as supervision's
``PolygonZone`` / ``LineZone``, which do the geometry) and its counts as state. ``update`` turns
what changed into ``TrackEvent`` values: ``enter`` / ``leave`` a zone, ``cross`` a line with its
direction. Config values (``ZoneSpec`` / ``LineSpec``) are checked when read, without the frame or
the model; ``bind`` checks them against the frame size and the model's class names.

Line direction follows supervision: ``in`` is a move onto the left-hand side of someone walking
the segment from ``start`` to ``end`` on the image (y pointing down), ``out`` the reverse. So for
a line drawn top to bottom, left-to-right motion is ``in``; for one drawn left to right, upward
motion is ``in``. The unit tests pin both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from device.detections import Detections
from device.errors import JetyoloError

Point = Tuple[float, float]
ANCHORS = ("center", "center_left", "center_right", "top_center", "top_left", "top_right",
           "bottom_left", "bottom_center", "bottom_right")
ZONE_KEYS = ("polygon", "classes", "anchor", "normalized", "source")
LINE_KEYS = ("start", "end", "classes", "anchor", "normalized", "source")
DEFAULT_ZONE_ANCHOR = "bottom_center"  # where a standing object touches the ground
DEFAULT_LINE_ANCHOR = "center"


@dataclass(frozen=True)
class TrackEvent:
    """One thing that happened to one track: ``enter``/``leave`` a zone, ``cross`` a line."""

    kind: str  # "enter" | "leave" | "cross"
    region: str  # the zone's or line's name
    track_id: int
    class_id: int
    box: Tuple[float, float, float, float]  # the object's last box (frame pixels)
    timestamp: float  # capture time of the frame it happened in
    direction: Optional[str] = None  # "in" | "out" for cross
    entered_at: Optional[float] = None  # for leave: capture time of the enter


@dataclass(frozen=True)
class ZoneCount:
    """A zone's occupancy at one frame (a copy: the zone itself moves on)."""

    name: str
    count: int
    counts_by_class: Dict[int, int]


# ---- config values: checked without the frame or the model ---------------------------------
@dataclass(frozen=True)
class RegionSpec:
    name: str
    points: Tuple[Point, ...]
    classes: Tuple[str, ...] = ()  # empty: every class
    anchor: str = DEFAULT_ZONE_ANCHOR
    normalized: bool = False  # points in 0..1 of the frame width/height, else frame pixels
    source: Optional[str] = None  # only this source (its name); None: every source

    def pixel_points(self, frame_size: Tuple[int, int], origin: str) -> np.ndarray:
        """The points in frame pixels; a point outside the frame is a JetyoloError."""
        width, height = frame_size
        points = np.asarray(self.points, np.float64)
        if self.normalized:
            points = points * np.array([width, height], np.float64)
        outside = [tuple(p) for p, q in zip(self.points, points)
                   if not (0 <= q[0] <= width and 0 <= q[1] <= height)]
        if outside:
            unit = "normalised" if self.normalized else f"pixels of the {width}x{height} frame"
            raise JetyoloError(f"{origin}: {self.name}: point {outside[0]} is outside the frame "
                               f"({unit}); keep x in 0..{1 if self.normalized else width} and "
                               f"y in 0..{1 if self.normalized else height}")
        return points


def parse_zones(value: Any, origin: str) -> Tuple[RegionSpec, ...]:
    """``zones: {NAME: {polygon: [[x, y], ...], classes: [...], anchor, normalized, source}}``."""
    specs = []
    for name, body in _named_entries(value, "zones", origin).items():
        where = f"{origin}: zones.{name}"
        _check_keys(body, ZONE_KEYS, where)
        points = _points(body.get("polygon"), where, "polygon")
        if len(points) < 3:
            raise JetyoloError(f"{where}: polygon has {len(points)} points; a zone needs at "
                               "least 3 ([[x, y], [x, y], [x, y], ...])")
        _check_simple_polygon(points, where)
        specs.append(_spec(name, points, body, where, DEFAULT_ZONE_ANCHOR))
    return tuple(specs)


def parse_lines(value: Any, origin: str) -> Tuple[RegionSpec, ...]:
    """``lines: {NAME: {start: [x, y], end: [x, y], classes, anchor, normalized, source}}``."""
    specs = []
    for name, body in _named_entries(value, "lines", origin).items():
        where = f"{origin}: lines.{name}"
        _check_keys(body, LINE_KEYS, where)
        start = _points([body.get("start")], where, "start")[0]
        end = _points([body.get("end")], where, "end")[0]
        if start == end:
            raise JetyoloError(f"{where}: start and end are the same point {list(start)}; a "
                               "line needs two different points")
        specs.append(_spec(name, (start, end), body, where, DEFAULT_LINE_ANCHOR))
    return tuple(specs)


def _named_entries(value: Any, what: str, origin: str) -> Dict[str, Mapping[str, Any]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise JetyoloError(f"{origin}: {what} must be a mapping of names to settings, "
                           f"got {type(value).__name__}")
    entries = {}
    for name, body in value.items():
        if not isinstance(name, str) or not name or any(c in name for c in "/+# "):
            raise JetyoloError(f"{origin}: {what}: name {name!r} must be a non-empty string "
                               "without '/', '+', '#' or spaces (it becomes a topic level)")
        if not isinstance(body, Mapping):
            raise JetyoloError(f"{origin}: {what}.{name} must be a mapping, got {body!r}")
        entries[name] = body
    return entries


def _check_keys(body: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in body:
        if key not in allowed:
            raise JetyoloError(f"{where}: unknown key {key!r}; allowed: {', '.join(allowed)}")


def _points(value: Any, where: str, key: str) -> Tuple[Point, ...]:
    shape = "[[x, y], ...]" if key == "polygon" else "[x, y]"
    if not isinstance(value, (list, tuple)):
        raise JetyoloError(f"{where}: {key} must be {shape}, got {value!r}")
    points = []
    for item in value:
        if (not isinstance(item, (list, tuple)) or len(item) != 2
                or not all(_is_number(v) for v in item)):
            raise JetyoloError(f"{where}: {key} must be {shape} numbers, got {item!r}")
        points.append((float(item[0]), float(item[1])))
    return tuple(points)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _spec(name: str, points: Tuple[Point, ...], body: Mapping[str, Any], where: str,
          default_anchor: str) -> RegionSpec:
    classes = body.get("classes", [])
    if isinstance(classes, str):
        classes = [classes]
    if not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes):
        raise JetyoloError(f"{where}: classes must be a list of class names, got {classes!r}")
    anchor = body.get("anchor", default_anchor)
    if anchor not in ANCHORS:
        raise JetyoloError(f"{where}: anchor {anchor!r} is not known; use one of "
                           f"{', '.join(ANCHORS)}")
    normalized = body.get("normalized", False)
    if not isinstance(normalized, bool):
        raise JetyoloError(f"{where}: normalized must be true or false, got {normalized!r}")
    if normalized:
        outside = [p for p in points if not (0 <= p[0] <= 1 and 0 <= p[1] <= 1)]
        if outside:
            raise JetyoloError(f"{where}: point {list(outside[0])} is outside the frame: "
                               "normalised coordinates are 0..1 (or set normalized: false)")
    source = body.get("source")
    if source is not None and (not isinstance(source, str) or not source):
        raise JetyoloError(f"{where}: source must be a source name, got {source!r}")
    return RegionSpec(name, points, tuple(classes), anchor, normalized, source)


def _check_simple_polygon(points: Sequence[Point], where: str) -> None:
    """No repeated neighbours, no zero area, no two edges crossing or touching (but neighbours
    at their shared corner)."""
    count = len(points)
    edges = [(points[i], points[(i + 1) % count]) for i in range(count)]
    for index, (a, b) in enumerate(edges):
        if a == b:
            raise JetyoloError(f"{where}: polygon repeats the point {list(a)}; list each corner "
                               "once")
        for other in range(index + 1, count):
            if other == index + 1 or (index == 0 and other == count - 1):
                continue
            if _segments_touch(a, b, *edges[other]):
                raise JetyoloError(
                    f"{where}: polygon is self-intersecting (edge {list(a)}-{list(b)} crosses "
                    f"edge {list(edges[other][0])}-{list(edges[other][1])}); list the corners "
                    "in order around the zone")
    if _area(points) == 0.0:
        raise JetyoloError(f"{where}: polygon has no area (its points are on one line)")


def _orientation(p: Point, q: Point, r: Point) -> float:
    return (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])


def _on_segment(p: Point, q: Point, r: Point) -> bool:
    """``r`` (collinear with p-q) lies within the p-q box."""
    return (min(p[0], q[0]) <= r[0] <= max(p[0], q[0])
            and min(p[1], q[1]) <= r[1] <= max(p[1], q[1]))


def _segments_touch(a: Point, b: Point, c: Point, d: Point) -> bool:
    d1, d2 = _orientation(c, d, a), _orientation(c, d, b)
    d3, d4 = _orientation(a, b, c), _orientation(a, b, d)
    if ((d1 > 0) != (d2 > 0) and d1 != 0 and d2 != 0
            and (d3 > 0) != (d4 > 0) and d3 != 0 and d4 != 0):
        return True
    return ((d1 == 0 and _on_segment(c, d, a)) or (d2 == 0 and _on_segment(c, d, b))
            or (d3 == 0 and _on_segment(a, b, c)) or (d4 == 0 and _on_segment(a, b, d)))


def _area(points: Sequence[Point]) -> float:
    xs, ys = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    return float(abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))) / 2)


def class_ids_of(
    spec: RegionSpec, class_names: Sequence[str], origin: str
) -> Optional[FrozenSet[int]]:
    """The filter's class ids (None: every class); an unknown name is a JetyoloError."""
    if not spec.classes:
        return None
    ids = []
    for name in spec.classes:
        if name not in class_names:
            raise JetyoloError(f"{origin}: {spec.name}: class {name!r} is not one of the model's "
                               f"classes ({', '.join(class_names) or 'none named'})")
        ids.append(list(class_names).index(name))
    return frozenset(ids)


# ---- running values: bound to one source's frame size and the model's classes -------------
def _track_ids(detections: Detections) -> np.ndarray:
    if detections.track_id is None:
        raise JetyoloError("zones and lines need track ids: set `tracker: bytetrack`")
    return detections.track_id


def _tracked_subset(detections: Detections, class_ids: Optional[FrozenSet[int]]) -> np.ndarray:
    """Indices of confirmed tracks of the filtered classes."""
    wanted = _track_ids(detections) >= 0
    if class_ids is not None:
        wanted &= np.isin(detections.class_id, sorted(class_ids))
    return np.flatnonzero(wanted)


def _as_sv(sv: Any, detections: Detections) -> Any:
    return sv.Detections(xyxy=detections.xyxy.astype(np.float64),
                         confidence=detections.confidence, class_id=detections.class_id,
                         tracker_id=detections.track_id)


def _box(detections: Detections, index: int) -> Tuple[float, float, float, float]:
    x1, y1, x2, y2 = (round(float(v), 1) for v in detections.xyxy[index])
    return (x1, y1, x2, y2)


@dataclass
class Zone:
    """A polygon; ``inside`` holds the tracks in it (track id -> (class id, entered at)).

    A track leaves when it is seen outside, or when it has not been seen for ``absent_frames``
    frames (the tracker lost it): a brief occlusion is not a leave and an enter.
    """

    name: str
    polygon: np.ndarray  # (N, 2) frame pixels
    class_ids: Optional[FrozenSet[int]]
    anchor: str
    absent_frames: int = 30
    inside: Dict[int, Tuple[int, float]] = field(default_factory=dict)
    _unseen: Dict[int, int] = field(default_factory=dict)
    _last_box: Dict[int, Tuple[float, float, float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import supervision as sv

        self._sv = sv
        self._zone = sv.PolygonZone(np.round(self.polygon).astype(np.int64),
                                    triggering_anchors=(sv.Position[self.anchor.upper()],))

    def trigger(self, detections: Detections) -> np.ndarray:
        """Per detection: a confirmed track of the filtered classes with its anchor inside."""
        hits = np.zeros(len(detections), bool)
        subset = _tracked_subset(detections, self.class_ids)
        if len(subset):
            hits[subset] = self._zone.trigger(_as_sv(self._sv, detections[subset]))
        return hits

    @property
    def count(self) -> int:
        return len(self.inside)

    def counts_by_class(self) -> Dict[int, int]:
        counts: Dict[int, int] = {}
        for class_id, _ in self.inside.values():
            counts[class_id] = counts.get(class_id, 0) + 1
        return counts

    def snapshot(self) -> ZoneCount:
        return ZoneCount(self.name, self.count, self.counts_by_class())

    def renumber_classes(self, new_ids: Mapping[int, int]) -> None:
        """After a model swap: the tracks inside keep their class by name (``new_ids``: old id
        -> the new model's id for the same name). A class the new model does not name has no
        new id, so its tracks keep the old one until they leave."""
        self.inside = {track: (new_ids.get(class_id, class_id), entered)
                       for track, (class_id, entered) in self.inside.items()}

    def update(self, detections: Detections, timestamp: float) -> List[TrackEvent]:
        hits = self.trigger(detections)
        tracks = _track_ids(detections)
        seen = {int(t): _box(detections, i) for i, t in enumerate(tracks.tolist()) if t >= 0}
        events = []
        for index in np.flatnonzero(hits).tolist():
            track, class_id = int(tracks[index]), int(detections.class_id[index])
            self._last_box[track] = _box(detections, index)
            if track not in self.inside:
                self.inside[track] = (class_id, timestamp)
                events.append(TrackEvent("enter", self.name, track, class_id,
                                         self._last_box[track], timestamp))
        inside_now = set(tracks[hits].tolist())
        for track in list(self.inside):
            if track in inside_now:
                self._unseen.pop(track, None)
                continue
            if track in seen:  # seen, outside
                self._last_box[track] = seen[track]
            else:
                self._unseen[track] = self._unseen.get(track, 0) + 1
                if self._unseen[track] <= self.absent_frames:
                    continue
            events.append(self._leave(track, timestamp))
        return events

    def _leave(self, track: int, timestamp: float) -> TrackEvent:
        class_id, entered = self.inside.pop(track)
        self._unseen.pop(track, None)
        box = self._last_box.pop(track)
        return TrackEvent("leave", self.name, track, class_id, box, timestamp,
                          entered_at=entered)


@dataclass
class Line:
    """A segment; ``counts`` holds the crossings so far per direction (``in``, ``out``)."""

    name: str
    start: Point
    end: Point
    class_ids: Optional[FrozenSet[int]]
    anchor: str
    counts: Dict[str, int] = field(default_factory=lambda: {"in": 0, "out": 0})

    def __post_init__(self) -> None:
        import supervision as sv

        self._sv = sv
        self._line = sv.LineZone(sv.Point(*self.start), sv.Point(*self.end),
                                 triggering_anchors=(sv.Position[self.anchor.upper()],))

    def trigger(self, detections: Detections) -> Tuple[np.ndarray, np.ndarray]:
        """Per detection: crossed ``in`` / crossed ``out`` in this frame."""
        crossed_in = np.zeros(len(detections), bool)
        crossed_out = np.zeros(len(detections), bool)
        subset = _tracked_subset(detections, self.class_ids)
        if len(subset):
            hits_in, hits_out = self._line.trigger(_as_sv(self._sv, detections[subset]))
            crossed_in[subset], crossed_out[subset] = hits_in, hits_out
        else:
            no_tracks = Detections.empty().with_track_ids(np.zeros(0, np.int64))
            self._line.trigger(_as_sv(self._sv, no_tracks))
        return crossed_in, crossed_out

    def update(self, detections: Detections, timestamp: float) -> List[TrackEvent]:
        crossed_in, crossed_out = self.trigger(detections)
        tracks = _track_ids(detections)
        events = []
        for direction, hits in (("in", crossed_in), ("out", crossed_out)):
            for index in np.flatnonzero(hits).tolist():
                self.counts[direction] += 1
                events.append(TrackEvent(
                    "cross", self.name, int(tracks[index]),
                    int(detections.class_id[index]), _box(detections, index), timestamp,
                    direction=direction))
        return events


@dataclass
class SourceRegions:
    """The zones and lines of one source."""

    zones: List[Zone]
    lines: List[Line]

    def update(self, detections: Detections, timestamp: float) -> List[TrackEvent]:
        events: List[TrackEvent] = []
        for zone in self.zones:
            events += zone.update(detections, timestamp)
        for line in self.lines:
            events += line.update(detections, timestamp)
        return events

    def line_counts(self) -> Dict[str, Dict[str, int]]:
        return {line.name: dict(line.counts) for line in self.lines}

    def zone_counts(self) -> Dict[str, int]:
        return {zone.name: zone.count for zone in self.zones}


def bind(
    zones: Sequence[RegionSpec],
    lines: Sequence[RegionSpec],
    source: str,
    frame_size: Tuple[int, int],
    class_names: Sequence[str],
    origin: str = "config",
    absent_frames: int = 30,
) -> SourceRegions:
    """The running zones and lines of ``source`` (those with no ``source`` or this one)."""
    mine = [s for s in zones if s.source in (None, source)]
    my_lines = [s for s in lines if s.source in (None, source)]
    return SourceRegions(
        [Zone(s.name, s.pixel_points(frame_size, f"{origin}: zones"),
              class_ids_of(s, class_names, f"{origin}: zones"), s.anchor, absent_frames)
         for s in mine],
        [_line(s, frame_size, class_names, f"{origin}: lines") for s in my_lines],
    )


def _line(
    spec: RegionSpec, frame_size: Tuple[int, int], class_names: Sequence[str], origin: str
) -> Line:
    (x1, y1), (x2, y2) = spec.pixel_points(frame_size, origin).tolist()
    return Line(spec.name, (x1, y1), (x2, y2), class_ids_of(spec, class_names, origin),
                spec.anchor)


def check_classes(specs: Sequence[RegionSpec], class_names: Sequence[str], origin: str) -> None:
    """Every class filter names one of the model's classes (before any frame is read)."""
    for spec in specs:
        class_ids_of(spec, class_names, origin)
