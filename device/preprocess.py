"""Letterbox a BGR frame into the model's input tensor, the way ultralytics does it.

The geometry (scale, rounding of the padding) matches ultralytics' ``LetterBox(auto=False)`` so
that host parity checks compare like with like. ``Preprocessor`` writes into one preallocated,
C-contiguous buffer (which may be page-locked memory owned by the TensorRT backend), so the hot
loop allocates nothing per frame once the frame size is known.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import cv2
import numpy as np

from device.decode_scale import Reduction
from device.errors import JetyoloError

PAD_VALUE = 114
FRAME_INPUT = "frame"  # the input name of a bundle's frame-input variant (letterbox in the graph)


@dataclass(frozen=True)
class Letterbox:
    """How a frame of ``frame_size`` (w, h) maps into the model input of ``input_size`` (h, w)."""

    frame_size: Tuple[int, int]
    input_size: Tuple[int, int]
    scale: float
    resized: Tuple[int, int]  # (w, h) of the frame after scaling
    pad_left: int
    pad_top: int

    @classmethod
    def fit(cls, frame_size: Tuple[int, int], input_size: Tuple[int, int]) -> Letterbox:
        frame_w, frame_h = frame_size
        input_h, input_w = input_size
        scale = min(input_h / frame_h, input_w / frame_w)
        resized = (round(frame_w * scale), round(frame_h * scale))
        pad_w = (input_w - resized[0]) / 2
        pad_h = (input_h - resized[1]) / 2
        # ultralytics rounds the two sides with a -0.1/+0.1 nudge; copy it for identical pixels.
        return cls(frame_size, input_size, scale, resized, round(pad_w - 0.1), round(pad_h - 0.1))

    def decoded_at(self, reduction: Optional[Reduction]) -> Letterbox:
        """This geometry (fitted to a frame decoded at 1/``reduction.factor``) mapping boxes to
        the camera's own pixels: ``frame_size`` becomes the source's, ``scale`` the product of
        the two reductions (a decoded pixel i covers source pixels [f*i, f*i + f))."""
        if reduction is None or reduction.factor == 1:
            return self
        return replace(self, frame_size=reduction.source_size, scale=self.scale / reduction.factor)

    def to_frame(self, xyxy: np.ndarray) -> np.ndarray:
        """Map boxes from input pixels back to frame pixels, clipped to the frame."""
        boxes = np.array(xyxy, dtype=np.float32)  # a copy; x and y columns as strided views
        xs, ys = boxes[:, 0::2], boxes[:, 1::2]
        xs -= self.pad_left
        ys -= self.pad_top
        boxes /= self.scale
        np.clip(xs, 0, self.frame_size[0], out=xs)
        np.clip(ys, 0, self.frame_size[1], out=ys)
        return boxes

    def to_input(self, xyxy: np.ndarray) -> np.ndarray:
        """Map boxes from frame pixels into input pixels (the inverse of ``to_frame``)."""
        boxes = np.asarray(xyxy, dtype=np.float32) * self.scale
        boxes[:, [0, 2]] += self.pad_left
        boxes[:, [1, 3]] += self.pad_top
        return boxes


def letterbox_image(frame: np.ndarray, input_size: Tuple[int, int]) -> Tuple[np.ndarray, Letterbox]:
    """Return the padded uint8 BGR image (h, w, 3) and its geometry. Allocates; see Preprocessor."""
    geometry = Letterbox.fit((frame.shape[1], frame.shape[0]), input_size)
    canvas = np.full((input_size[0], input_size[1], 3), PAD_VALUE, dtype=np.uint8)
    _paste_resized(frame, geometry, canvas)
    return canvas, geometry


def _paste_resized(frame: np.ndarray, geometry: Letterbox, canvas: np.ndarray) -> None:
    resized_w, resized_h = geometry.resized
    top, left = geometry.pad_top, geometry.pad_left
    target = canvas[top : top + resized_h, left : left + resized_w]
    if (frame.shape[1], frame.shape[0]) == geometry.resized:
        target[...] = frame
        return
    # Resize straight into the canvas (no per-frame allocation). An OpenCV build that cannot
    # write into a strided view returns a new array instead: copy that in.
    resized = cv2.resize(frame, geometry.resized, dst=target, interpolation=cv2.INTER_LINEAR)
    if not np.shares_memory(resized, target):
        target[...] = resized


class Preprocessor:
    """BGR frame -> model input, written in place into ``self.buffer``.

    ``input_dtype`` float32 gives NCHW RGB scaled to [0, 1]; uint8 gives NHWC RGB (for bundles
    whose graph casts, scales and transposes itself, the ``--uint8-input`` export).
    """

    def __init__(
        self,
        input_size: Tuple[int, int],
        input_dtype: str = "float32",
        buffer: Optional[np.ndarray] = None,
    ) -> None:
        self.input_size = input_size
        self.input_dtype = np.dtype(input_dtype)
        shape = self.input_shape(input_size, input_dtype)
        if buffer is None:
            buffer = np.empty(shape, dtype=self.input_dtype)
        contiguous = buffer.flags.c_contiguous
        if buffer.shape != shape or buffer.dtype != self.input_dtype or not contiguous:
            raise ValueError(
                f"preprocess buffer must be C-contiguous {shape} {self.input_dtype}, "
                f"got {buffer.shape} {buffer.dtype} contiguous={buffer.flags.c_contiguous}"
            )
        self.buffer = buffer
        self._canvas = np.full((input_size[0], input_size[1], 3), PAD_VALUE, dtype=np.uint8)
        self._fitted: Optional[Letterbox] = None  # to the decoded frame (what the canvas holds)
        self._geometry: Optional[Letterbox] = None  # the same, mapping to the source's pixels

    @staticmethod
    def input_shape(input_size: Tuple[int, int], input_dtype: str) -> Tuple[int, ...]:
        height, width = input_size
        return (1, height, width, 3) if np.dtype(input_dtype) == np.uint8 else (1, 3, height, width)

    def __call__(self, frame: np.ndarray, reduction: Optional[Reduction] = None) -> Letterbox:
        """Letterbox ``frame`` into the buffer; the geometry maps boxes to the source's pixels
        (``reduction``: the frame was decoded smaller than the source sent it)."""
        frame_size = (frame.shape[1], frame.shape[0])
        if self._fitted is None or self._fitted.frame_size != frame_size:
            self._fitted = Letterbox.fit(frame_size, self.input_size)
            self._geometry = None
            self._canvas[...] = PAD_VALUE  # padding changes only with the frame size
        if self._geometry is None or self._geometry.frame_size != _source_size(frame, reduction):
            self._geometry = self._fitted.decoded_at(reduction)
        _paste_resized(frame, self._fitted, self._canvas)
        if self.input_dtype == np.uint8:
            cv2.cvtColor(self._canvas, cv2.COLOR_BGR2RGB, dst=self.buffer[0])
        else:
            # BGR->RGB and HWC->CHW as a strided read, scaled into the contiguous buffer.
            np.multiply(
                self._canvas[:, :, ::-1].transpose(2, 0, 1),
                np.float32(1.0 / 255.0),
                out=self.buffer[0],
                casting="unsafe",
            )
        return self._geometry


class FrameCopier:
    """Preprocessing for the frame-input variant (``jetyolo export --frame-input``): the graph
    letterboxes, so the frame is only copied into ``self.buffer`` (uint8 [1, h, w, 3] BGR, the
    frame size the engine was built for); the geometry is still computed here, to map boxes
    back. Same interface as ``Preprocessor``.

    ``in_place``: the backend reads host arrays where they are (ONNX Runtime), so a frame it can
    read as it is (``feeds_itself``) is not copied at all; the caller feeds ``frame[None]``."""

    def __init__(self, input_size: Tuple[int, int], buffer: np.ndarray,
                 in_place: bool = False) -> None:
        if buffer.dtype != np.uint8 or buffer.ndim != 4 or buffer.shape[0] != 1 \
                or buffer.shape[3] != 3 or not buffer.flags.c_contiguous:
            raise ValueError(f"frame buffer must be C-contiguous uint8 [1,h,w,3], got "
                             f"{buffer.shape} {buffer.dtype}")
        self.input_size = input_size
        self.buffer = buffer
        self.in_place = in_place
        self.frame_size = (int(buffer.shape[2]), int(buffer.shape[1]))
        self._fitted = Letterbox.fit(self.frame_size, input_size)
        self._geometry = self._fitted

    def __call__(self, frame: np.ndarray, reduction: Optional[Reduction] = None) -> Letterbox:
        if frame.shape != self.buffer.shape[1:]:
            raise JetyoloError(
                f"the frame-input model was set up for {self.frame_size[0]}x{self.frame_size[1]} "
                f"frames, the source delivered {frame.shape[1]}x{frame.shape[0]}; fix the "
                "camera's capture size or use another variant"
            )
        if not self.feeds_itself(frame):
            np.copyto(self.buffer[0], frame)
        if self._geometry.frame_size != _source_size(frame, reduction):
            self._geometry = self._fitted.decoded_at(reduction)
        return self._geometry

    def feeds_itself(self, frame: np.ndarray) -> bool:
        """True when ``frame[None]`` is the input as it is: nothing to copy (``in_place``)."""
        return self.in_place and frame.dtype == np.uint8 and frame.flags.c_contiguous


def _source_size(frame: np.ndarray, reduction: Optional[Reduction]) -> Tuple[int, int]:
    """(w, h) of the frame as the source sent it."""
    if reduction is not None and reduction.factor != 1:
        return reduction.source_size
    return (frame.shape[1], frame.shape[0])
