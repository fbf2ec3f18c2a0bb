"""Finding the preview's drawn boxes again in an image (a decoded JPEG or a browser screenshot)."""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

TOLERANCE = 60  # per-channel distance to the box colour that still counts (JPEG smears edges)


def edge_coverage(image: np.ndarray, box: Sequence[float], colour: Tuple[int, int, int],
                  tolerance: int = TOLERANCE) -> float:
    """Fraction of points along the outline of ``box`` (x1, y1, x2, y2 in ``image`` pixels)
    where a pixel within 1 px has ``colour`` (BGR)."""
    height, width = image.shape[:2]
    x1, y1, x2, y2 = (round(float(v)) for v in box)
    points = [(x, y) for x in range(x1, x2 + 1, 2) for y in (y1, y2)]
    points += [(x, y) for y in range(y1, y2 + 1, 2) for x in (x1, x2)]
    target = np.array(colour, np.int16)
    hits = 0
    for x, y in points:
        patch = image[max(0, y - 1): min(height, y + 2), max(0, x - 1): min(width, x + 2)]
        if patch.size and (np.abs(patch.astype(np.int16) - target).max(axis=-1) <= tolerance).any():
            hits += 1
    return hits / max(1, len(points))
