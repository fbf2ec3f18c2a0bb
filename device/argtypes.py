"""argparse types shared by the verbs: numbers are untrusted input too."""

from __future__ import annotations

import argparse
import math


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
