"""The one value every consumer of detections uses: sinks, verification, evaluation, benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Union

import numpy as np


@dataclass
class Detections:
    """Boxes of one image in frame pixels.

    ``xyxy`` (N, 4) float32 corners, ``confidence`` (N,) float32, ``class_id`` (N,) int32,
    sorted by confidence, highest first.
    """

    xyxy: np.ndarray
    confidence: np.ndarray
    class_id: np.ndarray

    def __post_init__(self) -> None:
        self.xyxy = np.asarray(self.xyxy, dtype=np.float32).reshape(-1, 4)
        self.confidence = np.asarray(self.confidence, dtype=np.float32).reshape(-1)
        self.class_id = np.asarray(self.class_id, dtype=np.int32).reshape(-1)
        n = len(self.xyxy)
        if len(self.confidence) != n or len(self.class_id) != n:
            raise ValueError(
                f"Detections needs equal lengths: xyxy {self.xyxy.shape}, "
                f"confidence {self.confidence.shape}, class_id {self.class_id.shape}"
            )

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))

    def __len__(self) -> int:
        return len(self.xyxy)

    def __getitem__(self, index: Union[int, slice, np.ndarray]) -> Detections:
        return Detections(self.xyxy[index], self.confidence[index], self.class_id[index])

    def to_list(self, class_names: list[str] | None = None) -> list[dict]:
        """JSON-ready list: ``[{label, class_id, score, box: [x1, y1, x2, y2]}]``."""
        items = []
        for box, score, cls in zip(self.xyxy.tolist(), self.confidence.tolist(), self.class_id):
            cls_int = int(cls)
            label = (
                class_names[cls_int] if class_names and cls_int < len(class_names) else str(cls_int)
            )
            items.append(
                {
                    "label": label,
                    "class_id": cls_int,
                    "score": round(float(score), 4),
                    "box": [round(v, 1) for v in box],
                }
            )
        return items

    @classmethod
    def from_list(cls, items: list[dict]) -> Detections:
        if not items:
            return cls.empty()
        return cls(
            np.array([d["box"] for d in items], np.float32),
            np.array([d["score"] for d in items], np.float32),
            np.array([d["class_id"] for d in items], np.int32),
        )


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
