"""Letterbox geometry (round trips, hypothesis) and the in-place Preprocessor."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device.preprocess import PAD_VALUE, Letterbox, Preprocessor, letterbox_image

frame_sizes = st.tuples(st.integers(16, 4096), st.integers(16, 4096))  # (w, h)
input_sizes = st.sampled_from([(160, 160), (320, 320), (384, 640), (640, 640), (736, 1280)])


@st.composite
def frame_and_boxes(draw: st.DrawFn) -> tuple:
    width, height = draw(frame_sizes)
    count = draw(st.integers(1, 8))
    corners = []
    for _ in range(count):
        x1 = draw(st.floats(0, width - 2))
        y1 = draw(st.floats(0, height - 2))
        x2 = draw(st.floats(x1 + 1, width))
        y2 = draw(st.floats(y1 + 1, height))
        corners.append([x1, y1, x2, y2])
    return (width, height), np.array(corners, np.float32)


@settings(max_examples=300, deadline=None)
@given(frame_and_boxes(), input_sizes)
def test_to_input_then_to_frame_is_identity_within_a_pixel(case: tuple, input_size: tuple) -> None:
    frame_size, boxes = case
    geometry = Letterbox.fit(frame_size, input_size)
    back = geometry.to_frame(geometry.to_input(boxes))
    # one input pixel is 1/scale frame pixels; float32 rounding stays far below that
    tolerance = max(1.0, 1e-6 * max(frame_size))
    np.testing.assert_allclose(back, boxes, atol=tolerance)


@settings(max_examples=300, deadline=None)
@given(frame_sizes, input_sizes)
def test_letterbox_keeps_aspect_and_fits_inside_the_input(
    frame_size: tuple, input_size: tuple
) -> None:
    geometry = Letterbox.fit(frame_size, input_size)
    input_h, input_w = input_size
    resized_w, resized_h = geometry.resized
    assert geometry.pad_left >= 0 and geometry.pad_top >= 0
    assert geometry.pad_left + resized_w <= input_w and geometry.pad_top + resized_h <= input_h
    # one side fills the input (within rounding), the padding is split evenly (within one pixel)
    assert resized_w >= input_w - 1 or resized_h >= input_h - 1
    assert abs((input_w - resized_w) - 2 * geometry.pad_left) <= 1
    assert abs((input_h - resized_h) - 2 * geometry.pad_top) <= 1
    assert abs(resized_w / resized_h - frame_size[0] / frame_size[1]) <= 2 * (
        frame_size[0] / frame_size[1]
    ) / min(resized_w, resized_h)


def test_to_frame_clips_to_the_frame() -> None:
    geometry = Letterbox.fit((640, 480), (320, 320))
    boxes = np.array([[-50, -50, 400, 400]], np.float32)  # reaches into the padding on all sides
    mapped = geometry.to_frame(boxes)
    assert mapped.min() >= 0 and mapped[0, 2] <= 640 and mapped[0, 3] <= 480


def test_a_drawn_box_lands_where_to_input_says() -> None:
    frame = np.zeros((540, 960, 3), np.uint8)
    box = np.array([[300, 100, 500, 260]], np.float32)
    x1, y1, x2, y2 = box[0].astype(int)
    frame[y1:y2, x1:x2] = 255
    image, geometry = letterbox_image(frame, (320, 320))
    ys, xs = np.nonzero(image[:, :, 0] > 127)
    found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
    np.testing.assert_allclose(found, geometry.to_input(box)[0], atol=1.5)


def reference_input(frame: np.ndarray, input_size: tuple) -> np.ndarray:
    image, _ = letterbox_image(frame, input_size)
    return (image[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32) / 255.0).astype(
        np.float32
    )


@pytest.mark.parametrize("frame_hw", [(540, 960), (1080, 1920), (480, 480), (720, 300)])
def test_float_path_is_rgb_chw_scaled_letterbox(frame_hw: tuple) -> None:
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, size=(*frame_hw, 3), dtype=np.uint8)
    preprocessor = Preprocessor((320, 320))
    preprocessor(frame)
    np.testing.assert_allclose(preprocessor.buffer, reference_input(frame, (320, 320)), atol=1e-6)
    # sensitive to channel order: BGR would not pass
    bgr = letterbox_image(frame, (320, 320))[0].transpose(2, 0, 1)[None] / 255.0
    assert not np.allclose(preprocessor.buffer, bgr, atol=1e-3)


def test_uint8_path_is_rgb_nhwc_letterbox() -> None:
    rng = np.random.default_rng(2)
    frame = rng.integers(0, 256, size=(540, 960, 3), dtype=np.uint8)
    preprocessor = Preprocessor((320, 320), "uint8")
    preprocessor(frame)
    assert preprocessor.buffer.shape == (1, 320, 320, 3)
    np.testing.assert_array_equal(
        preprocessor.buffer[0], letterbox_image(frame, (320, 320))[0][:, :, ::-1]
    )


def test_writes_in_place_and_resets_padding_when_the_frame_size_changes() -> None:
    buffer = np.empty((1, 3, 320, 320), np.float32)
    preprocessor = Preprocessor((320, 320), buffer=buffer)
    pointer = buffer.ctypes.data
    tall = np.full((640, 320, 3), 255, np.uint8)  # pads left/right
    wide = np.full((320, 640, 3), 255, np.uint8)  # pads top/bottom
    preprocessor(tall)
    geometry = preprocessor(wide)
    assert preprocessor.buffer is buffer and buffer.ctypes.data == pointer
    pad_rows = buffer[0, :, : geometry.pad_top, :]
    np.testing.assert_allclose(pad_rows, PAD_VALUE / 255.0, atol=1e-6)
    np.testing.assert_allclose(buffer, reference_input(wide, (320, 320)), atol=1e-6)


def test_refuses_a_buffer_of_the_wrong_shape_or_layout() -> None:
    with pytest.raises(ValueError, match="C-contiguous"):
        Preprocessor((320, 320), buffer=np.empty((1, 320, 320, 3), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        Preprocessor(
            (320, 320), buffer=np.empty((1, 320, 320, 3), np.float32).transpose(0, 3, 1, 2)
        )


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_no_frame_sized_allocation_per_frame(dtype: str) -> None:
    import tracemalloc

    frame = np.random.default_rng(3).integers(0, 256, size=(1080, 1920, 3), dtype=np.uint8)
    preprocessor = Preprocessor((320, 320), dtype)
    preprocessor(frame)  # first frame: geometry and canvas set up
    tracemalloc.start()
    try:
        for _ in range(5):
            preprocessor(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # a resized 320x180 frame alone would be 172,800 bytes, the float input 1,228,800; numpy's
    # casting buffer for the strided uint8 -> float32 multiply is about 32 kB
    assert peak < 64_000


def test_frame_copier_copies_the_frame_and_keeps_the_letterbox_geometry() -> None:
    from device.errors import JetyoloError
    from device.preprocess import FrameCopier

    buffer = np.zeros((1, 540, 960, 3), np.uint8)
    copier = FrameCopier((192, 320), buffer)
    frame = np.random.default_rng(0).integers(0, 255, (540, 960, 3), dtype=np.uint8)
    geometry = copier(frame)
    assert np.array_equal(buffer[0], frame) and geometry == Letterbox.fit((960, 540), (192, 320))
    with pytest.raises(JetyoloError, match="for 960x540 frames, the source delivered 640x480"):
        copier(np.zeros((480, 640, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        FrameCopier((192, 320), np.zeros((1, 540, 960, 3), np.float32))
