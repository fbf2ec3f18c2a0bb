"""Preview frames: drawn where the detections are, scaled down, and never made while nobody
watches; viewers share one encoding per frame; the rate limit holds."""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest
from preview_check import edge_coverage  # tests/ is on sys.path (tests/device/conftest.py)

from device.detections import Detections, FrameResult
from device.ops.preview import (
    PALETTE,
    ZONE_COLOUR,
    Annotations,
    PreviewHub,
    Region,
    _label,
    annotate,
    class_colour,
)

NAMES = ["red_circle", "green_square"]


def frame_and_result(index: int = 0) -> tuple:
    image = np.full((720, 1280, 3), 90, np.uint8)
    boxes = np.array([[100, 100, 500, 400], [700, 200, 1100, 600]], np.float32)
    detections = Detections(boxes, np.array([0.9, 0.6], np.float32), np.array([0, 1], np.int32))
    return image, FrameResult("gate", index, 0.0, (1280, 720), detections)


def test_boxes_are_drawn_scaled_in_their_class_colour() -> None:
    image, result = frame_and_result()
    canvas = annotate(image, result, NAMES, width=640)
    assert canvas.shape == (360, 640, 3)
    assert image.max() == 90  # the frame itself is untouched
    for box, class_id in zip(result.detections.xyxy, result.detections.class_id):
        scaled = box * 0.5
        assert edge_coverage(canvas, scaled, class_colour(class_id)) > 0.95
        # the comparison can fail: a box 40 px off is not found
        assert edge_coverage(canvas, scaled + 40, class_colour(class_id)) < 0.3


def test_jpeg_keeps_the_boxes_findable() -> None:
    image, result = frame_and_result()
    hub = PreviewHub(NAMES, width=640, max_fps=0)
    channel = hub.channel("gate")
    with channel.watching():
        hub.offer(image, result)
        got = channel.next_frame(0, 1.0)
    assert got is not None
    decoded = cv2.imdecode(np.frombuffer(got[1].jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (360, 640, 3)
    assert edge_coverage(decoded, result.detections.xyxy[1] * 0.5, PALETTE[1]) > 0.9


def test_small_frames_are_not_upscaled_and_zones_and_lines_are_drawn() -> None:
    image = np.zeros((240, 320, 3), np.uint8)
    result = FrameResult("gate", 0, 0.0, (320, 240), Detections.empty())
    zone = Region("door: 2", [(10, 10), (300, 10), (300, 200), (10, 200)])
    line = Region("gate: in 1 out 0", [(20, 220), (300, 220)], closed=False)
    canvas = annotate(image, result, NAMES, width=640,
                      annotations=Annotations(regions=[zone, line]))
    assert canvas.shape == image.shape
    assert edge_coverage(canvas, (10, 10, 300, 200), ZONE_COLOUR, tolerance=30) > 0.95
    assert (canvas[220, 40:290] > 200).all()  # the line
    assert canvas[150, 250].max() == 0  # an open line is not closed into a polygon
    assert _label("car", 0.876, 12) == "car 0.88 #12"
    assert _label("car", 0.876, None) == "car 0.88"


def test_nothing_is_kept_or_encoded_without_viewers() -> None:
    image, result = frame_and_result()
    hub = PreviewHub(NAMES, max_fps=0)
    for _ in range(50):
        hub.offer(image, result)
    channel = hub.channel("gate")
    assert (channel.offered, channel.encoded) == (0, 0)
    with channel.watching():
        hub.offer(image, result)
    assert channel.offered == 1 and channel.encoded == 0  # encoded only when a viewer asks
    assert channel.viewers == 0


def test_rate_limit() -> None:
    image, result = frame_and_result()
    hub = PreviewHub(NAMES, max_fps=5)
    channel = hub.channel("gate")
    with channel.watching():
        started = time.monotonic()
        while time.monotonic() - started < 0.5:
            hub.offer(image, result)
            time.sleep(0.005)
    assert 2 <= channel.offered <= 4  # 5/s over 0.5 s: 3 (first at once)


def test_viewers_share_one_encoding_per_frame() -> None:
    image, result = frame_and_result()
    hub = PreviewHub(NAMES, max_fps=0)
    channel = hub.channel("gate")
    got = []

    def viewer() -> None:
        with channel.watching():
            got.append(channel.next_frame(0, 2.0))

    threads = [threading.Thread(target=viewer) for _ in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 2
    while channel.viewers < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    hub.offer(image, result)
    for thread in threads:
        thread.join(3)
    assert len(got) == 3 and all(item is not None for item in got)
    assert channel.encoded == 1
    assert len({item[1].jpeg for item in got if item}) == 1


@pytest.mark.parametrize("timeout", [0.05])
def test_no_frame_within_the_timeout(timeout: float) -> None:
    channel = PreviewHub(NAMES).channel("gate")
    with channel.watching():
        assert channel.next_frame(0, timeout) is None


def test_track_ids_and_the_tracker_regions_reach_the_preview() -> None:
    from device.ops.extension import annotations_of, preview_regions
    from device.zones import bind, parse_lines, parse_zones

    zones = parse_zones({"door": {"polygon": [[0, 0], [100, 0], [100, 100], [0, 100]]}}, "t")
    lines = parse_lines({"gate": {"start": [0, 50], "end": [200, 50]}}, "t")
    regions = bind(zones, lines, "gate", (320, 240), NAMES)
    outlines = preview_regions(regions)
    assert [(r.label, r.closed) for r in outlines] == [("door: 0", True),
                                                      ("gate: in 0 out 0", False)]
    detections = Detections(np.array([[1, 1, 9, 9], [20, 20, 40, 40]], np.float32),
                            np.array([0.9, 0.8], np.float32), np.array([0, 1], np.int32),
                            track_id=np.array([7, -1]))
    result = FrameResult("gate", 0, 0.0, (320, 240), detections)
    annotations = annotations_of(result, lambda source, size: preview_regions(regions))
    assert annotations.track_ids == [7, -1] and len(annotations.regions) == 2
    assert annotations_of(FrameResult("gate", 0, 0.0, (320, 240),
                                      Detections.empty())).track_ids is None


def test_boxes_in_source_pixels_land_right_on_a_reduced_decode() -> None:
    image, result = frame_and_result()  # boxes and frame_size in the camera's 1280x720 pixels
    reduced = cv2.resize(image, (320, 180))  # the frame decoded at 1/4 (decode_scale)
    canvas = annotate(reduced, result, NAMES, width=640)
    assert canvas.shape == (180, 320, 3)  # not upscaled
    for box, class_id in zip(result.detections.xyxy, result.detections.class_id):
        assert edge_coverage(canvas, box * 0.25, class_colour(class_id)) > 0.9
        # the comparison can fail: drawn in decoded pixels as if they were the frame's
        assert edge_coverage(canvas, box, class_colour(class_id)) < 0.3
