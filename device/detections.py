"""The one value every consumer of detections uses: sinks, verification, evaluation, benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Union

import numpy as np


@dataclass
class Detections:
    """Boxes of one image in frame pixels.

    ``xyxy`` (N, 4) float32 corners, ``confidence`` (N,) float32, ``class_id`` (N,) int32,
    sorted by confidence, highest first. ``track_id`` (N,) int64 when a tracker ran (-1: not
    confirmed yet), None otherwise.
    """

    xyxy: np.ndarray
    confidence: np.ndarray
    class_id: np.ndarray
    track_id: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        self.xyxy = np.asarray(self.xyxy, dtype=np.float32).reshape(-1, 4)
        self.confidence = np.asarray(self.confidence, dtype=np.float32).reshape(-1)
        self.class_id = np.asarray(self.class_id, dtype=np.int32).reshape(-1)
        if self.track_id is not None:
            self.track_id = np.asarray(self.track_id, dtype=np.int64).reshape(-1)
        n = len(self.xyxy)
        lengths = [len(self.confidence), len(self.class_id)]
        if self.track_id is not None:
            lengths.append(len(self.track_id))
        if any(length != n for length in lengths):
            raise ValueError(
                f"Detections needs equal lengths: xyxy {self.xyxy.shape}, "
                f"confidence {self.confidence.shape}, class_id {self.class_id.shape}, "
                f"track_id {None if self.track_id is None else self.track_id.shape}"
            )

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))

    def __len__(self) -> int:
        return len(self.xyxy)

    def __getitem__(self, index: Union[int, slice, np.ndarray]) -> Detections:
        track_id = None if self.track_id is None else self.track_id[index]
        return Detections(
            self.xyxy[index], self.confidence[index], self.class_id[index], track_id
        )

    def with_track_ids(self, track_id: np.ndarray) -> Detections:
        return Detections(self.xyxy, self.confidence, self.class_id, track_id)

    def to_list(self, class_names: list[str] | None = None) -> list[dict]:
        """JSON-ready list: ``[{label, class_id, score, box: [x1, y1, x2, y2]}]``, plus
        ``track_id`` (an int, or None while unconfirmed) when a tracker ran."""
        items = []
        for index, (box, score, cls) in enumerate(
            zip(self.xyxy.tolist(), self.confidence.tolist(), self.class_id)
        ):
            item = {
                "label": class_label(int(cls), class_names),
                "class_id": int(cls),
                "score": round(float(score), 4),
                "box": [round(v, 1) for v in box],
            }
            if self.track_id is not None:
                track = int(self.track_id[index])
                item["track_id"] = track if track >= 0 else None
            items.append(item)
        return items

    @classmethod
    def from_list(cls, items: list[dict]) -> Detections:
        if not items:
            return cls.empty()
        track_id = None
        if all("track_id" in d for d in items):
            track_id = np.array([-1 if d["track_id"] is None else d["track_id"] for d in items])
        return cls(
            np.array([d["box"] for d in items], np.float32),
            np.array([d["score"] for d in items], np.float32),
            np.array([d["class_id"] for d in items], np.int32),
            track_id,
        )


def class_label(class_id: int, class_names: Optional[Sequence[str]]) -> str:
    """The class name, or the id as text when the bundle names no such class."""
    if class_names and 0 <= class_id < len(class_names):
        return str(class_names[class_id])
    return str(class_id)


@dataclass
class FrameResult:
    """Detections of one frame plus where and when it came from and what each stage cost."""

    source: str
    frame_index: int
    timestamp: float  # capture time, seconds since the epoch (UTC)
    frame_size: tuple  # (width, height)
    detections: Detections
    latency_ms: Dict[str, float] = field(default_factory=dict)
    # The model that computed it, when the runtime can switch models (``jetyolo update``);
    # empty/None: the sinks' configured model_id and class names.
    model_id: str = ""
    class_names: Optional[Sequence[str]] = None
