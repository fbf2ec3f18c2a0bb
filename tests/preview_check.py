"""Finding the preview's drawn boxes again in an image (a decoded JPEG or a browser screenshot)."""

from __future__ import annotations

from typing import Sequence, Tuple

import cv2
import numpy as np

TOLERANCE = 60  # per-channel distance to the box colour that still counts (JPEG smears edges)


def colour_near(image: np.ndarray, colour: Tuple[int, int, int],
                tolerance: int = TOLERANCE) -> np.ndarray:
    """A bool mask: pixels with a pixel within 1 px whose every channel is within ``tolerance``
    of ``colour`` (BGR)."""
    distance = np.abs(image.astype(np.int16) - np.array(colour, np.int16)).max(axis=-1)
    near = (distance <= tolerance).astype(np.uint8)
    return cv2.dilate(near, np.ones((3, 3), np.uint8)).astype(bool)


def edge_coverage(image: np.ndarray, box: Sequence[float], colour: Tuple[int, int, int],
                  tolerance: int = TOLERANCE) -> float:
    """Fraction of points along the outline of ``box`` (x1, y1, x2, y2 in ``image`` pixels)
    where a pixel within 1 px has ``colour`` (BGR); points off the image count as misses."""
    return outline_coverage(colour_near(image, colour, tolerance), box)


def outline_coverage(near: np.ndarray, box: Sequence[float] | np.ndarray) -> float:
    """edge_coverage on a mask from colour_near (one mask serves many boxes of a colour)."""
    height, width = near.shape
    x1, y1, x2, y2 = (round(float(v)) for v in box)
    xs_h = np.arange(x1, x2 + 1, 2)
    ys_v = np.arange(y1, y2 + 1, 2)
    xs = np.concatenate([xs_h, xs_h, np.full(len(ys_v), x1), np.full(len(ys_v), x2)])
    ys = np.concatenate([np.full(len(xs_h), y1), np.full(len(xs_h), y2), ys_v, ys_v])
    if not len(xs):
        return 0.0
    # a point up to 1 px off the image still sees the pixels inside it (as the dilation does)
    inside = (xs >= -1) & (xs <= width) & (ys >= -1) & (ys <= height)
    hits = near[np.clip(ys, 0, height - 1), np.clip(xs, 0, width - 1)] & inside
    return float(hits.sum()) / len(xs)
