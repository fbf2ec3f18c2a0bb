"""argparse types shared by the verbs: numbers are untrusted input too."""

from __future__ import annotations

import argparse
import math
from typing import Tuple


def finite_float(text: str) -> float:
    """A float flag that refuses ``nan`` and ``inf`` (``float()`` takes both, and NaN then passes
    every range check: ``nan < 0`` and ``nan > 1`` are both false)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def frame_size(text: str) -> Tuple[int, int]:
    """``WIDTHxHEIGHT`` (a camera's frame, width first as cameras state it) as (w, h)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a frame size; give WIDTHxHEIGHT, "
                                         "e.g. 1920x1080")
    return (int(parts[0]), int(parts[1]))
