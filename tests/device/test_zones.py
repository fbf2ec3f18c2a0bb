"""device.zones: config checks (one line each), enter/leave with occlusion grace, line direction."""

from __future__ import annotations

from typing import Any, List, Optional

import numpy as np
import pytest

from device.detections import Detections
from device.errors import JetyoloError
from device.zones import Line, Zone, bind, parse_lines, parse_zones

NAMES = ["person", "car"]
SQUARE = [[100, 100], [300, 100], [300, 300], [100, 300]]


def tracked(*items: tuple) -> Detections:
    """``tracked((track_id, class_id, cx, cy), ...)``: 20-px boxes around the centres."""
    if not items:
        return Detections.empty().with_track_ids(np.zeros(0, np.int64))
    boxes = [[cx - 10, cy - 10, cx + 10, cy + 10] for _, _, cx, cy in items]
    return Detections(np.array(boxes), np.full(len(items), 0.9), [c for _, c, _, _ in items],
                      track_id=[t for t, _, _, _ in items])


def _zone_of(polygon: Any, **extra: Any) -> dict:
    return {"door": {"polygon": polygon, **extra}}


BOWTIE = [[0, 0], [10, 10], [10, 0], [0, 10]]
TOUCHING = [[0, 0], [10, 0], [5, 5], [10, 10], [0, 10], [5, 0]]  # two edges meet at (5, 0)
# (what the case covers, zones or lines, the mapping, expected message)
BAD_INPUT: List[tuple] = [
    ("two points", "zones", _zone_of([[0, 0], [10, 10]]), "has 2 points; a zone needs at least 3"),
    ("bow tie", "zones", _zone_of(BOWTIE), "self-intersecting"),
    ("touching edges", "zones", _zone_of(TOUCHING), "self-intersecting"),
    ("repeated corner", "zones", _zone_of([[0, 0], [0, 0], [10, 0], [0, 10]]), "repeats the point"),
    ("collinear", "zones", _zone_of([[0, 0], [5, 5], [10, 10]]), "no area"),
    ("point not a pair", "zones", _zone_of([[0, 0], [10], [0, 10]]), "must be"),
    ("normalised above 1", "zones", _zone_of([[0, 0], [1.2, 0], [0, 1]], normalized=True),
     "outside the frame"),
    ("unknown key", "zones", _zone_of(SQUARE, colour="red"), "unknown key 'colour'"),
    ("bad anchor", "zones", _zone_of(SQUARE, anchor="feet"), "anchor 'feet'"),
    ("name with a slash", "zones", {"a/b": {"polygon": SQUARE}}, "without '/'"),
    ("zero length", "lines", {"gate": {"start": [5, 5], "end": [5, 5]}}, "same point"),
    ("missing end", "lines", {"gate": {"start": [5, 5]}}, "end must be"),
    ("not a mapping", "lines", [1, 2], "must be a mapping"),
]


@pytest.mark.parametrize("case, kind, value, message", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_regions_are_one_clear_line(case: str, kind: str, value: Any, message: str) -> None:
    parse = parse_zones if kind == "zones" else parse_lines
    with pytest.raises(JetyoloError, match=message) as caught:
        parse(value, "cfg.yaml")
    assert str(caught.value).startswith("cfg.yaml:") and "\n" not in str(caught.value)


def test_good_regions_parse() -> None:
    zones = parse_zones({"door": {"polygon": SQUARE, "classes": ["person"]},
                         "yard": {"polygon": [[0, 0], [1, 0], [1, 1]], "normalized": True}}, "c")
    lines = parse_lines({"gate": {"start": [0, 0.5], "end": [1, 0.5], "normalized": True}}, "c")
    assert [z.name for z in zones] == ["door", "yard"] and zones[0].classes == ("person",)
    assert lines[0].points == ((0.0, 0.5), (1.0, 0.5))


@pytest.mark.parametrize(
    "zones, lines, size, message",
    [
        # a pixel point beyond the frame, known only once the frame size is
        ({"door": {"polygon": [[0, 0], [700, 0], [0, 100]]}}, {}, (640, 480), "outside the frame"),
        # a class the model does not have
        ({"door": {"polygon": SQUARE, "classes": ["dog"]}}, {}, (640, 480), "'dog' is not one"),
        ({}, {"gate": {"start": [0, 0], "end": [10, 900]}}, (640, 480), "outside the frame"),
    ],
)
def test_binding_checks_frame_and_classes(
    zones: dict, lines: dict, size: tuple, message: str
) -> None:
    with pytest.raises(JetyoloError, match=message):
        bind(parse_zones(zones, "c"), parse_lines(lines, "c"), "cam", size, NAMES)


def test_normalised_points_scale_to_the_frame_and_sources_filter() -> None:
    zones = parse_zones({"yard": {"polygon": [[0, 0], [0.5, 0], [0.5, 1]], "normalized": True},
                         "other": {"polygon": SQUARE, "source": "cam2"}}, "c")
    regions = bind(zones, (), "cam1", (640, 480), NAMES)
    assert [z.name for z in regions.zones] == ["yard"]
    np.testing.assert_allclose(regions.zones[0].polygon, [[0, 0], [320, 0], [320, 480]])


def _zone(classes: Optional[frozenset] = None, absent_frames: int = 3) -> Zone:
    return Zone("door", np.array(SQUARE, float), classes, "center", absent_frames)


def test_zone_enter_stay_leave() -> None:
    zone = _zone()
    path = [(7, 0, 50, 200), (7, 0, 150, 200), (7, 0, 200, 200), (7, 0, 350, 200)]
    kinds = [[e.kind for e in zone.update(tracked(p), t)] for t, p in enumerate(path)]
    assert kinds == [[], ["enter"], [], ["leave"]]
    assert zone.count == 0


def test_a_short_occlusion_is_no_leave_a_long_one_is() -> None:
    zone = _zone(absent_frames=3)
    assert [e.kind for e in zone.update(tracked((1, 0, 200, 200)), 0.0)] == ["enter"]
    for t in (1.0, 2.0, 3.0):  # hidden for 3 frames: still inside
        assert zone.update(tracked(), t) == []
    assert zone.count == 1 and zone.update(tracked((1, 0, 200, 200)), 4.0) == []
    events: List = []
    for t in (5.0, 6.0, 7.0, 8.0):
        events += zone.update(tracked(), t)
    assert [(e.kind, e.track_id, e.entered_at, e.timestamp) for e in events] == [
        ("leave", 1, 0.0, 8.0)]


def test_zone_class_filter_and_unconfirmed_tracks() -> None:
    zone = _zone(classes=frozenset({1}))
    events = zone.update(tracked((1, 0, 200, 200), (2, 1, 210, 210), (-1, 1, 190, 190)), 0.0)
    assert [(e.kind, e.track_id, e.class_id) for e in events] == [("enter", 2, 1)]
    assert zone.counts_by_class() == {1: 1}


@pytest.mark.parametrize(
    "start, end, path, direction",
    [
        ((100.0, 0.0), (100.0, 200.0), [(60, 100), (80, 100), (120, 100)], "in"),  # rightwards
        ((100.0, 0.0), (100.0, 200.0), [(140, 100), (120, 100), (80, 100)], "out"),
        ((0.0, 100.0), (200.0, 100.0), [(100, 140), (100, 120), (100, 80)], "in"),  # upwards
        ((0.0, 100.0), (200.0, 100.0), [(100, 60), (100, 80), (100, 120)], "out"),
    ],
)
def test_line_direction(start: tuple, end: tuple, path: list, direction: str) -> None:
    line = Line("gate", start, end, None, "center")
    events = []
    for t, (x, y) in enumerate(path):
        events += line.update(tracked((3, 0, x, y)), float(t))
    assert [(e.kind, e.direction, e.track_id) for e in events] == [("cross", direction, 3)]
    other = "out" if direction == "in" else "in"
    assert line.counts == {direction: 1, other: 0}


def test_line_outside_its_ends_and_filtered_classes_do_not_count() -> None:
    line = Line("gate", (100.0, 0.0), (100.0, 50.0), frozenset({0}), "center")
    for t, x in enumerate((60, 80, 120, 140)):
        line.update(tracked((1, 0, x, 100), (2, 1, x, 20)), float(t))  # 1 passes below the end
    assert line.counts == {"in": 0, "out": 0}
    for t, x in enumerate((60, 80, 120, 140)):
        line.update(tracked((3, 0, x, 20)), float(10 + t))
    assert line.counts == {"in": 1, "out": 0}


class Passthrough:
    """A tracker for detections that carry their track ids already."""

    def update(self, detections: Detections, timestamp: Optional[float] = None) -> Detections:
        return detections


def test_class_filters_follow_the_class_names_across_a_model_swap() -> None:
    from device.detections import FrameResult
    from device.tracking_stage import SourceTracking

    (door,) = parse_zones({"door": {"polygon": SQUARE, "classes": ["car"]}}, "config")
    stage = SourceTracking(Passthrough(), "cam", [door], class_names=NAMES)  # car: id 1

    def frame(index: int, names: tuple, *items: tuple) -> FrameResult:
        return FrameResult("cam", index, float(index), (640, 480), tracked(*items),
                           class_names=names)

    stage.process(frame(0, ("person", "car"), (7, 1, 200, 200), (8, 0, 210, 210)))
    assert set(stage.regions((640, 480)).zones[0].inside) == {7}  # the car
    # the new model numbers its classes the other way round: car is id 0 now
    stage.process(frame(1, ("car", "person"), (7, 0, 200, 200), (8, 1, 210, 210)))
    assert set(stage.regions((640, 480)).zones[0].inside) == {7}  # still the car, not 8


def test_tracks_inside_a_zone_keep_their_class_by_name_across_a_model_swap() -> None:
    from types import SimpleNamespace

    from device.detections import FrameResult
    from device.events import build_zone_message
    from device.tracking_stage import SourceTracking

    (door,) = parse_zones({"door": {"polygon": SQUARE}}, "config")
    stage = SourceTracking(Passthrough(), "cam", [door], class_names=("person", "car"))

    def frame(index: int, names: tuple, *items: tuple) -> FrameResult:
        return FrameResult("cam", index, float(index), (640, 480), tracked(*items),
                           class_names=names)

    stage.process(frame(0, ("person", "car"), (7, 1, 200, 200)))  # a car walks in
    second_model = ("car", "person", "bus")  # car is id 0 now
    after = stage.process(frame(1, second_model, (7, 0, 200, 200)))
    zone = stage.regions((640, 480)).zones[0]
    assert zone.inside[7][0] == 0  # car in the new numbering (it was 1)
    context = SimpleNamespace(device_id="dev", model_id="m", class_names=("person", "car"))
    message = build_zone_message(zone.snapshot(), after.result, 1, context)
    assert message["counts"] == {"car": 1}  # not "person", the new model's id 1
    third_model = ("bus", "car", "person")  # car is id 1 again
    stage.process(frame(2, third_model, (7, 1, 200, 200)))
    assert zone.inside[7][0] == 1 and zone.snapshot().counts_by_class == {1: 1}


def test_a_swap_to_a_model_without_a_filtered_class_is_refused() -> None:
    from types import SimpleNamespace

    from device.config import config_from_mapping
    from device.reload import check_tracking_classes

    config = config_from_mapping({"bundle": "b", "source": "v.mp4", "tracker": "bytetrack",
                                  "tracking": {"zones": {"door": {"polygon": SQUARE,
                                                                  "classes": ["car"]}}}})
    check_tracking_classes(config, ["cam"], SimpleNamespace(class_names=["person", "car"]))
    with pytest.raises(JetyoloError, match="'car' is not one"):
        check_tracking_classes(config, ["cam"], SimpleNamespace(class_names=["person", "bus"]))


def test_zones_need_track_ids() -> None:
    with pytest.raises(JetyoloError, match="tracker: bytetrack"):
        _zone().update(Detections(np.array([[0, 0, 5, 5]]), [0.9], [0]), 0.0)
