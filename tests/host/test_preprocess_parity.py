"""The device letterbox is pixel-identical to ultralytics' ``LetterBox(auto=False)``, the
preprocessing the model was trained and validated with."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from device.preprocess import letterbox_image
from host._env import ultralytics_offline

SIZES = [
    ((540, 960), (320, 320)),
    ((1080, 1920), (640, 640)),
    ((480, 640), (320, 320)),
    ((720, 1280), (384, 640)),
    ((333, 517), (320, 320)),  # odd sizes: the padding rounding matters
    ((1000, 199), (640, 640)),  # tall
    ((100, 100), (320, 320)),  # upscaled
]


@pytest.fixture(scope="module")
def ultralytics_letterbox() -> Any:
    ultralytics_offline("test")
    from ultralytics.data.augment import LetterBox

    return LetterBox


def random_frame(frame_hw: tuple, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*frame_hw, 3), dtype=np.uint8)


@pytest.mark.parametrize("frame_hw, input_hw", SIZES)
def test_letterbox_is_pixel_identical_to_ultralytics(
    ultralytics_letterbox: Any,
    frame_hw: tuple,
    input_hw: tuple,
) -> None:
    frame = random_frame(frame_hw)
    expected = ultralytics_letterbox(new_shape=input_hw, auto=False, scale_fill=False)(image=frame)
    ours, _ = letterbox_image(frame, input_hw)
    assert ours.shape == expected.shape
    np.testing.assert_array_equal(ours, expected)


def test_the_comparison_catches_padding_on_the_wrong_side(ultralytics_letterbox: Any) -> None:
    # ultralytics' top-left letterbox (center=False) differs from ours only by where the padding
    # goes; pixel equality must catch it.
    frame = random_frame((540, 960))
    top_left = ultralytics_letterbox(new_shape=(320, 320), auto=False, center=False)(image=frame)
    ours, _ = letterbox_image(frame, (320, 320))
    assert ours.shape == top_left.shape
    assert not np.array_equal(ours, top_left)
