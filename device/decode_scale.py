"""Decoding MJPEG frames smaller than the camera sends them (``decode_scale``).

A JPEG decoder can hand out the image at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling,
OpenCV's ``IMREAD_REDUCED_COLOR_2/4/8``) for a fraction of the work: a 1080p frame in 6-7 ms
instead of 15 on this 2-core workstation (docs/BENCHMARKS.md), most of the full decode being the
colour conversion of pixels the letterbox then throws away. The pipeline works on the reduced
frame and maps boxes back to the camera's pixels (``Reduction``, ``Letterbox.decoded_at``).

Pure rules only (no OpenCV): the config declares ``decode_scale`` with ``DECODE_SCALES``; the
sources (``device.sources``) decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

DECODE_SCALES = ("auto", "1", "2", "4", "8")
FACTORS = (8, 4, 2)  # what libjpeg's scaled decoding offers below full size, largest first


@dataclass(frozen=True)
class Reduction:
    """A frame decoded at 1/``factor`` of ``source_size`` (w, h), the size the camera sent."""

    factor: int
    source_size: Tuple[int, int]


def reduced_size(source_size: Tuple[int, int], factor: int) -> Tuple[int, int]:
    """(w, h) of a JPEG of ``source_size`` decoded at 1/``factor``: libjpeg rounds up
    (``jdiv_round_up`` in jpeg_calc_output_dimensions, libjpeg-turbo jdmaster.c)."""
    width, height = source_size
    return (-(-width // factor), -(-height // factor))


def letterboxed_size(source_size: Tuple[int, int], input_size: Tuple[int, int]) -> Tuple[int, int]:
    """(w, h) the frame has inside the model input (h, w) once letterboxed."""
    width, height = source_size
    scale = min(input_size[0] / height, input_size[1] / width)
    return (round(width * scale), round(height * scale))


def auto_factor(source_size: Tuple[int, int], input_size: Tuple[int, int]) -> int:
    """The largest reduction whose decoded frame is still at least as large, on both axes, as
    the image the letterbox makes of it: the resize after decoding then only ever shrinks, so
    no detail the model would see is lost (1080p into 320x320: 1/4, 480x270 -> 320x180; into
    384x640: 1/2). docs/BENCHMARKS.md has the agreement with the full decode."""
    target = letterboxed_size(source_size, input_size)
    for factor in FACTORS:
        width, height = reduced_size(source_size, factor)
        if width >= target[0] and height >= target[1]:
            return factor
    return 1


def decode_factor(
    setting: str, source_size: Optional[Tuple[int, int]], input_size: Optional[Tuple[int, int]]
) -> int:
    """The reduction ``setting`` (one of ``DECODE_SCALES``) asks for: ``auto`` from the frame
    and model input sizes (1 when either is unknown), else the number given."""
    if setting != "auto":
        return int(setting)
    if source_size is None or input_size is None or min(source_size) <= 0:
        return 1
    return auto_factor(source_size, input_size)
