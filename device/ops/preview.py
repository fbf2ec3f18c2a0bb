"""Live preview frames: downscaled, annotated (boxes, labels, track ids, zones), JPEG-encoded —
only while someone watches.

The frame loop calls ``PreviewHub.offer(image, result)`` for every frame. With no viewer that is
one dict lookup and one integer test; nothing is copied, drawn or encoded. While a viewer is
connected, at most ``max_fps`` frames per source are kept (a reference: sources hand out a new
array per frame, so no copy either) and the *viewer's* thread draws and encodes them, once per
frame however many viewers share it. A slow viewer slows only its own connection.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from device.detections import FrameResult

DEFAULT_WIDTH = 640  # preview width in pixels (frames narrower than this are not upscaled)
DEFAULT_FPS = 5.0
JPEG_QUALITY = 75
# BGR, saturated and far from the synthetic classes' colours; one per class id, cycling.
PALETTE: Tuple[Tuple[int, int, int], ...] = (
    (255, 0, 255), (128, 255, 128), (255, 255, 0), (0, 128, 255), (255, 0, 0), (0, 255, 255),
    (128, 0, 255), (0, 0, 255),
)
ZONE_COLOUR = (255, 255, 255)
FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE = 0.45
BOX_THICKNESS = 2


def class_colour(class_id: int) -> Tuple[int, int, int]:
    return PALETTE[int(class_id) % len(PALETTE)]


@dataclass(frozen=True)
class Region:
    """A zone (closed polygon) or a line (open segment) in frame pixels, with its label."""

    label: str
    points: Sequence[Tuple[float, float]]
    closed: bool = True


@dataclass(frozen=True)
class Annotations:
    """What is drawn over one frame besides the boxes of ``result``."""

    track_ids: Optional[Sequence[int]] = None  # one per detection (-1: untracked), or None
    regions: Sequence[Region] = ()


NO_ANNOTATIONS = Annotations()


def preview_scale(frame_width: int, width: int) -> float:
    return min(1.0, width / float(frame_width)) if frame_width > 0 else 1.0


def _label(name: str, score: float, track_id: Optional[int]) -> str:
    text = f"{name} {score:.2f}"
    return f"{text} #{track_id}" if track_id is not None else text


def _draw_label(canvas: np.ndarray, text: str, corner: Tuple[int, int],
                colour: Tuple[int, int, int]) -> None:
    """Text on a filled tag just inside the box's top-left corner (inside: the box's outline
    stays exactly where the box is)."""
    (text_w, text_h), baseline = cv2.getTextSize(text, FONT, FONT_SCALE, 1)
    x, y = corner
    cv2.rectangle(canvas, (x, y), (x + text_w + 4, y + text_h + baseline + 2), colour, -1)
    cv2.putText(canvas, text, (x + 2, y + text_h + 1), FONT, FONT_SCALE, (0, 0, 0), 1,
                cv2.LINE_AA)


def annotate(
    image: np.ndarray,
    result: FrameResult,
    class_names: Sequence[str],
    width: int = DEFAULT_WIDTH,
    annotations: Annotations = NO_ANNOTATIONS,
) -> np.ndarray:
    """A new BGR image: ``image`` scaled to at most ``width`` pixels wide, with the zones and
    lines, each box in its class colour, and ``label score #track`` tags. Boxes and zones are
    in the source's pixels (``result.frame_size``), which ``image`` may be a reduced decode of
    (``decode_scale``)."""
    fit = preview_scale(image.shape[1], width)
    if fit < 1.0:
        size = (max(1, round(image.shape[1] * fit)), max(1, round(image.shape[0] * fit)))
        canvas = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    else:
        canvas = image.copy()
    source_width = int(result.frame_size[0]) if result.frame_size else image.shape[1]
    scale = canvas.shape[1] / float(source_width) if source_width > 0 else fit
    for region in annotations.regions:
        points = np.round(np.asarray(region.points, np.float32) * scale).astype(np.int32)
        cv2.polylines(canvas, [points.reshape(-1, 1, 2)], region.closed, ZONE_COLOUR, 1,
                      cv2.LINE_AA)
        cv2.putText(canvas, region.label, (int(points[0][0]) + 3, int(points[0][1]) + 14), FONT,
                    FONT_SCALE, ZONE_COLOUR, 1, cv2.LINE_AA)
    detections = result.detections
    track_ids = annotations.track_ids
    for index in range(len(detections)):
        x1, y1, x2, y2 = (round(float(v) * scale) for v in detections.xyxy[index])
        class_id = int(detections.class_id[index])
        colour = class_colour(class_id)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, BOX_THICKNESS)
        name = class_names[class_id] if class_id < len(class_names) else str(class_id)
        track = int(track_ids[index]) if track_ids is not None else None
        track = track if track is not None and track >= 0 else None
        _draw_label(canvas, _label(name, float(detections.confidence[index]), track),
                    (x1, y1), colour)
    return canvas


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV could not encode a preview frame as JPEG")
    return data.tobytes()


@dataclass
class PreviewFrame:
    index: int  # the frame's index in its source (as in its detections message)
    jpeg: bytes


class PreviewChannel:
    """One source's preview: the latest offered frame, and its JPEG once a viewer asked."""

    def __init__(self, class_names: Sequence[str], width: int, max_fps: float) -> None:
        self.class_names = list(class_names)
        self.width = width
        self.min_gap_s = 1.0 / max_fps if max_fps > 0 else 0.0
        self.viewers = 0
        self.offered = 0  # frames kept for viewers (tests and the cost benchmark read it)
        self.encoded = 0
        self._last_offer = float("-inf")
        self._pending: Optional[Tuple[int, np.ndarray, FrameResult, Annotations]] = None
        self._latest: Optional[PreviewFrame] = None
        self._serial = 0  # increments per offered frame
        self._encoded_serial = 0
        self._changed = threading.Condition()
        self._encoding = threading.Lock()

    def offer(self, image: np.ndarray, result: FrameResult, annotations: Annotations) -> None:
        """Called by the frame loop; returns at once when nobody watches or it is too soon."""
        if not self.viewers:
            return
        now = time.monotonic()
        if now - self._last_offer < self.min_gap_s:
            return
        self._last_offer = now
        with self._changed:
            self._serial += 1
            self._pending = (self._serial, image, result, annotations)
            self.offered += 1
            self._changed.notify_all()

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        with self._changed:
            self.viewers += 1
        try:
            yield
        finally:
            with self._changed:
                self.viewers -= 1

    def next_frame(self, after: int, timeout: float) -> Optional[Tuple[int, PreviewFrame]]:
        """The first frame offered after serial ``after`` as ``(serial, frame)``; None when
        none came within ``timeout`` s. Call inside ``watching()``."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._serial > after, timeout):
                return None
            pending = self._pending
        if pending is None:
            return None
        return pending[0], self._encode(pending)

    def _encode(self, pending: Tuple[int, np.ndarray, FrameResult, Annotations]) -> PreviewFrame:
        serial, image, result, annotations = pending
        with self._encoding:  # viewers of the same frame share one encoding
            if self._latest is None or self._encoded_serial != serial:
                names = result.class_names or self.class_names  # after a model switch: its own
                canvas = annotate(image, result, names, self.width, annotations)
                self._latest = PreviewFrame(result.frame_index, encode_jpeg(canvas))
                self._encoded_serial = serial
                self.encoded += 1
            return self._latest


class PreviewHub:
    """The preview channels of a run, keyed by source name (as in the messages)."""

    def __init__(self, class_names: Sequence[str], width: int = DEFAULT_WIDTH,
                 max_fps: float = DEFAULT_FPS) -> None:
        self.class_names = list(class_names)
        self.width = width
        self.max_fps = max_fps
        self._channels: Dict[str, PreviewChannel] = {}
        self._lock = threading.Lock()

    def channel(self, source: str) -> PreviewChannel:
        with self._lock:
            found = self._channels.get(source)
            if found is None:
                found = self._channels[source] = PreviewChannel(
                    self.class_names, self.width, self.max_fps)
            return found

    def sources(self) -> List[str]:
        with self._lock:
            return sorted(self._channels)

    def watched(self, source: str) -> bool:
        channel = self._channels.get(source)
        return channel is not None and channel.viewers > 0

    def offer(self, image: np.ndarray, result: FrameResult,
              annotations: Annotations = NO_ANNOTATIONS) -> None:
        channel = self._channels.get(result.source)
        if channel is None:
            channel = self.channel(result.source)
        channel.offer(image, result, annotations)
