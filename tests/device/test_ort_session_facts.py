"""What jetyolo relies on in ONNX Runtime's CPU sessions: the frame-input variant feeds each
camera frame as it is (ORT reads a bound array where it is; a frame that cannot be read as it is
still gets copied), and Q/DQ graphs can be scored without the fused int8 kernels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from device.backends.onnxruntime import OnnxRuntimeBackend
from device.preprocess import FrameCopier, Letterbox

FRAME_HW = (54, 96)


def cast_model() -> onnx.ModelProto:
    """x (uint8 frame) -> float32 x: the output shows what the call read."""
    shape = [1, *FRAME_HW, 3]
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], "cast",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def cast_session() -> ort.InferenceSession:
    return ort.InferenceSession(cast_model().SerializeToString(),
                                providers=["CPUExecutionProvider"])


def test_onnxruntime_reads_a_bound_frame_where_it_is() -> None:
    """OnnxRuntimeBackend.reads_host_arrays: a change made after binding is what the call sees."""
    session = cast_session()
    frame = np.zeros((*FRAME_HW, 3), np.uint8)
    binding = session.io_binding()
    binding.bind_cpu_input("x", frame[None])
    binding.bind_output("y")
    frame[5, 7, 1] = 9  # after binding: seen only if ORT did not copy
    session.run_with_iobinding(binding)
    assert binding.copy_outputs_to_cpu()[0][0, 5, 7, 1] == 9


def test_in_place_copier_leaves_the_buffer_alone_for_a_frame_fed_as_it_is() -> None:
    buffer = np.zeros((1, *FRAME_HW, 3), np.uint8)
    copier = FrameCopier((32, 64), buffer, in_place=True)
    frame = np.full((*FRAME_HW, 3), 200, np.uint8)
    geometry = copier(frame)
    assert copier.feeds_itself(frame) and not buffer.any()
    assert geometry == Letterbox.fit((FRAME_HW[1], FRAME_HW[0]), (32, 64))


def test_a_frame_that_cannot_be_fed_as_it_is_is_still_copied() -> None:
    buffer = np.zeros((1, *FRAME_HW, 3), np.uint8)
    copier = FrameCopier((32, 64), buffer, in_place=True)
    wide = np.random.default_rng(1).integers(0, 255, (FRAME_HW[0], FRAME_HW[1] * 2, 3), np.uint8)
    strided = wide[:, ::2]  # the frame's shape, not C-contiguous
    copier(strided)
    assert not copier.feeds_itself(strided) and np.array_equal(buffer[0], strided)
    copying = FrameCopier((32, 64), np.zeros_like(buffer))  # TensorRT: always its own buffer
    contiguous = np.ascontiguousarray(strided)
    copying(contiguous)
    assert not copying.feeds_itself(contiguous) and np.array_equal(copying.buffer[0], contiguous)



def test_qdq_in_float_turns_off_the_fused_int8_kernels(tmp_path: Path) -> None:
    """``jetyolo eval`` and the INT8 gate score Q/DQ graphs with the Q/DQ pairs run as they are
    (OnnxRuntimeBackend.qdq_in_float): the CPU's saturating int8 kernels are not TensorRT's."""
    path = tmp_path / "cast.onnx"
    onnx.save(cast_model(), path)

    def disabled(qdq_in_float: bool) -> bool:
        with OnnxRuntimeBackend(path, qdq_in_float=qdq_in_float) as backend:
            options = backend._session.get_session_options()
            return options.get_session_config_entry("session.disable_quant_qdq") == "1"

    assert disabled(True)
    with pytest.raises(Exception):  # noqa: B017 - ORT raises its own type for a missing key
        disabled(False)
