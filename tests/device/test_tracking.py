"""device.tracking: ByteTrack (the `trackers` package) behind our Detections; settings checks."""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import pytest

from device.detections import Detections
from device.errors import JetyoloError
from device.tracking import ByteTracker, TrackerSettings, make_tracker


def _frame(centres: List[tuple], score: float = 0.9, size: float = 40.0) -> Detections:
    boxes = [[x - size / 2, y - size / 2, x + size / 2, y + size / 2] for x, y in centres]
    return Detections(np.array(boxes, np.float32).reshape(-1, 4),
                      np.full(len(boxes), score, np.float32), np.zeros(len(boxes), np.int32))


def _crossing_paths(frames: int = 60) -> List[List[tuple]]:
    """Two objects on an X: one left to right, one right to left, overlapping mid-way."""
    return [[(20 + 5 * f, 100 + 1 * f), (320 - 5 * f, 190 - 1 * f)] for f in range(frames)]


@pytest.mark.parametrize("kind", ["bytetrack", "botsort"])
def test_ids_stay_with_their_objects_through_a_crossing(kind: str) -> None:
    tracker = ByteTracker(TrackerSettings(minimum_consecutive_frames=1), kind)
    ids_of: Dict[int, set] = {0: set(), 1: set()}
    for index, centres in enumerate(_crossing_paths()):
        tracked = tracker.update(_frame(centres))
        assert tracked.track_id is not None and len(tracked) == 2
        if index == 0:  # a track gets its id when it is first matched
            continue
        middles = (tracked.xyxy[:, :2] + tracked.xyxy[:, 2:]) / 2
        for obj, centre in enumerate(centres):
            row = int(np.argmin(np.linalg.norm(middles - np.array(centre), axis=1)))
            ids_of[obj].add(int(tracked.track_id[row]))
    assert len(ids_of[0]) == 1 and len(ids_of[1]) == 1 and ids_of[0] != ids_of[1]


def test_unconfirmed_first_frame_then_ids_never_reused() -> None:
    tracker = ByteTracker(TrackerSettings(minimum_consecutive_frames=2, lost_track_buffer=2))
    first = tracker.update(_frame([(50, 50)]))
    assert first.track_id is not None and first.track_id.tolist() == [-1]  # not confirmed yet
    seen = set()
    for _appearance in range(3):  # the object comes and goes; each return is a new track
        for _ in range(4):
            tracked = tracker.update(_frame([(50, 50)]))
        assert tracked.track_id is not None
        seen.add(int(tracked.track_id[0]))
        for _ in range(10):
            tracker.update(Detections.empty())
    assert len(seen) == 3 and min(seen) >= 0


def test_confidence_order_and_every_detection_kept() -> None:
    tracker = ByteTracker(TrackerSettings(minimum_consecutive_frames=1))
    frame = Detections(np.array([[0, 0, 20, 20], [100, 0, 120, 20], [200, 0, 220, 20]]),
                       np.array([0.9, 0.7, 0.3]), np.array([0, 1, 2]))
    tracked = tracker.update(frame)
    np.testing.assert_array_equal(tracked.confidence, frame.confidence)  # low one kept, unmatched
    np.testing.assert_array_equal(tracked.class_id, frame.class_id)
    assert tracked.track_id is not None and tracked.track_id[2] == -1
    assert len(tracker.update(Detections.empty())) == 0


def test_tracker_none_is_no_tracker() -> None:
    assert make_tracker("none", TrackerSettings()) is None
    assert isinstance(make_tracker("bytetrack", TrackerSettings()), ByteTracker)
    assert isinstance(make_tracker("botsort", TrackerSettings()), ByteTracker)
    with pytest.raises(JetyoloError, match="not known"):
        make_tracker("sort", TrackerSettings())


# (what the case covers, the tracker_settings mapping, expected message or None for valid)
SETTINGS_CASES: List[tuple] = [
    ("defaults", None, None),
    ("ints become floats", {"frame_rate": 25}, None),
    ("unknown key", {"lost_buffer": 3}, "unknown key 'lost_buffer'"),
    ("below range", {"minimum_consecutive_frames": 0}, "outside 1..1000"),
    ("above range", {"minimum_iou_threshold": 1.5}, "outside 0..1"),
    ("wrong type", {"lost_track_buffer": 2.5}, "must be int"),
    ("bool is no number", {"frame_rate": True}, "must be float"),
    ("not a mapping", [1, 2], "must be a mapping"),
]


@pytest.mark.parametrize(
    "case, values, message", SETTINGS_CASES, ids=[c[0] for c in SETTINGS_CASES]
)
def test_settings_are_checked(case: str, values: Any, message: str) -> None:
    if message is None:
        settings = TrackerSettings.from_mapping(values, "cfg.yaml")
        assert isinstance(settings.frame_rate, float)
        return
    with pytest.raises(JetyoloError, match=message) as caught:
        TrackerSettings.from_mapping(values, "cfg.yaml")
    assert str(caught.value).startswith("cfg.yaml: tracker_settings")
    assert "\n" not in str(caught.value)
