"""Multi-object tracking per source: detections in, the same detections with ``track_id`` out.

ByteTrack comes from the ``trackers`` package (Roboflow, Apache-2.0): a maintained clean-room
implementation, chosen over supervision's older ``ByteTrack`` by measurement (docs/BENCHMARKS.md,
"Tracking"). It is imported only when a source tracks, so ``tracker: none`` costs nothing and a
device without the package still runs detection. IDs are the library's: from 0, increasing, never
reused within a run; a detection the tracker has not confirmed yet has ``track_id`` -1 (published
as ``null``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, fields
from typing import Any, Dict, Mapping, Optional, Protocol, Tuple

import numpy as np

from device.detections import Detections
from device.errors import JetyoloError

TRACKER_KINDS = ("bytetrack", "botsort", "none")
UNCONFIRMED = -1


@dataclass(frozen=True)
class TrackerSettings:
    """ByteTrack's knobs (``trackers.ByteTrackTracker`` names and meaning); None means default.

    The bounds live in ``SETTING_BOUNDS``; ``from_mapping`` checks a config's ``tracker_settings``.
    """

    lost_track_buffer: int = 30  # frames (at 30 FPS) a lost track is kept for re-association
    frame_rate: float = 30.0  # the source's nominal rate; scales lost_track_buffer
    track_activation_threshold: float = 0.5  # confidence a detection needs to start a track
    minimum_consecutive_frames: int = 2  # matched frames before a track gets its id
    minimum_iou_threshold: float = 0.1  # IoU a detection needs to match a predicted track
    high_conf_det_threshold: float = 0.5  # first-stage (high) vs second-stage (low) detections

    @classmethod
    def from_mapping(cls, values: Optional[Mapping[str, Any]], origin: str) -> TrackerSettings:
        """Settings from a config mapping; unknown keys and out-of-range values: JetyoloError."""
        if values is None:
            return cls()
        if not isinstance(values, Mapping):
            raise JetyoloError(f"{origin}: tracker_settings must be a mapping of ByteTrack "
                               f"settings ({', '.join(SETTING_BOUNDS)}), got {values!r}")
        checked: Dict[str, Any] = {}
        for key, value in values.items():
            checked[str(key)] = _checked_setting(str(key), value, origin)
        return cls(**checked)


# (type, inclusive low, inclusive high) per setting
SETTING_BOUNDS: Dict[str, Tuple[type, float, float]] = {
    "lost_track_buffer": (int, 0, 10_000),
    "frame_rate": (float, 0.1, 1000.0),
    "track_activation_threshold": (float, 0.0, 1.0),
    "minimum_consecutive_frames": (int, 1, 1000),
    "minimum_iou_threshold": (float, 0.0, 1.0),
    "high_conf_det_threshold": (float, 0.0, 1.0),
}
if set(SETTING_BOUNDS) != {f.name for f in fields(TrackerSettings)}:
    raise RuntimeError("SETTING_BOUNDS and TrackerSettings disagree")  # a programming error


def _checked_setting(key: str, value: Any, origin: str) -> Any:
    if key not in SETTING_BOUNDS:
        raise JetyoloError(f"{origin}: tracker_settings: unknown key {key!r}; allowed: "
                           f"{', '.join(SETTING_BOUNDS)}")
    kind, low, high = SETTING_BOUNDS[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise JetyoloError(f"{origin}: tracker_settings.{key} must be {kind.__name__}, "
                           f"got {value!r}")
    if not low <= value <= high:  # type: ignore[operator]  # an int or a float by now
        raise JetyoloError(f"{origin}: tracker_settings.{key} = {value!r} is outside "
                           f"{low:g}..{high:g}")
    return value


class Tracker(Protocol):
    """What the pipeline needs of a tracker: one call per frame of one source."""

    def update(self, detections: Detections, timestamp: Optional[float] = None) -> Detections: ...


class ByteTracker:
    """``trackers.ByteTrackTracker`` (or, ``kind="botsort"``, ``BoTSORTTracker`` without camera
    motion compensation or re-identification) behind our ``Detections``.

    ``timestamp`` (capture seconds) makes the Kalman step follow real time on live sources that
    drop frames; None steps one frame per call (files, where every frame is decoded).
    """

    def __init__(self, settings: TrackerSettings, kind: str = "bytetrack") -> None:
        library, self._sv = _import_library()
        self.settings = settings
        common = {
            "lost_track_buffer": settings.lost_track_buffer,
            "frame_rate": settings.frame_rate,
            "track_activation_threshold": settings.track_activation_threshold,
            "minimum_consecutive_frames": settings.minimum_consecutive_frames,
            "high_conf_det_threshold": settings.high_conf_det_threshold,
        }
        if kind == "botsort":
            self._tracker = library.BoTSORTTracker(
                **common, minimum_iou_threshold_first_assoc=settings.minimum_iou_threshold,
                enable_cmc=False)  # CMC needs the frame, which the publishing thread has not
        else:
            self._tracker = library.ByteTrackTracker(
                **common, minimum_iou_threshold=settings.minimum_iou_threshold)

    def update(self, detections: Detections, timestamp: Optional[float] = None) -> Detections:
        given = self._sv.Detections(
            xyxy=detections.xyxy.astype(np.float64),
            confidence=detections.confidence,
            class_id=detections.class_id,
            data={"order": np.arange(len(detections))},
        )
        tracked = self._tracker.update(given, timestamp=timestamp)
        if len(tracked) == 0:
            return detections[np.zeros(0, np.int64)].with_track_ids(np.zeros(0, np.int64))
        # The library may reorder; restore our confidence order (what consumers rely on).
        order = np.asarray(tracked.data["order"], np.int64)
        ids = np.asarray(tracked.tracker_id, np.int64)
        keep = np.argsort(order, kind="stable")
        return detections[order[keep]].with_track_ids(ids[keep])


def _missing_library(reason: str) -> JetyoloError:
    return JetyoloError(
        f"tracking needs the `trackers` package ({reason}); install jetyolo's "
        "[device] extra (Python >= 3.10: JetPack 6 or 7), or set `tracker: none`"
    )


def check_tracker_available(kind: str) -> None:
    """Fail now, not after a minutes-long engine build, when the library is missing (a look-up
    only: importing it takes seconds)."""
    if kind != "none":
        for package in ("trackers", "supervision", "scipy"):
            if importlib.util.find_spec(package) is None:
                raise _missing_library(f"{package} is not installed")


def _import_library() -> Tuple[Any, Any]:
    try:
        import supervision
        import trackers
    except ImportError as exc:
        raise _missing_library(str(exc)) from exc
    return trackers, supervision


def make_tracker(kind: str, settings: TrackerSettings) -> Optional[Tracker]:
    """The tracker for one source, or None for ``tracker: none``."""
    if kind == "none":
        return None
    if kind in ("bytetrack", "botsort"):
        return ByteTracker(settings, kind)
    raise JetyoloError(f"tracker: {kind!r} is not known; use one of {', '.join(TRACKER_KINDS)}")
