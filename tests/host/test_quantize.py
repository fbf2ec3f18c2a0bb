"""Calibration ranges on degenerate tensors (constant, near-constant, subnormal)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List

import cv2
import numpy as np
import pytest

from host import quantize

SIDE = 16


def _degenerate_model(path: Path) -> Path:
    """Conv -> (x*0 + 0.5: constant), Softmax of x*1e-7 over 1024 values (each 1/1024 within a few
    float32 steps, like an untrained attention Softmax), x*1e-44 (subnormal), all summed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)
    constants = {
        "w": weights, "zero": np.float32(0), "half": np.float32(0.5), "tiny": np.float32(1e-7),
        "sub": np.float32(1e-44), "flat_shape": np.array([1, 4 * SIDE * SIDE], np.int64),
        "shape": np.array([1, 4, SIDE, SIDE], np.int64),
    }
    node = helper.make_node
    nodes = [
        node("Conv", ["images", "w"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        node("Mul", ["conv", "zero"], ["zeroed"], name="zeroed"),
        node("Add", ["zeroed", "half"], ["constant"], name="constant"),
        node("Mul", ["conv", "tiny"], ["small"], name="small"),
        node("Reshape", ["small", "flat_shape"], ["flat"], name="flat"),
        node("Softmax", ["flat"], ["attn"], name="attn", axis=-1),
        node("Reshape", ["attn", "shape"], ["attn4"], name="attn4"),
        node("Mul", ["conv", "sub"], ["vanishing"], name="vanishing"),
        node("Add", ["vanishing", "attn4"], ["mixed"], name="mixed"),
        node("Add", ["constant", "mixed"], ["out"], name="out"),
    ]
    graph = helper.make_graph(
        nodes, "degenerate",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, SIDE, SIDE])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def degenerate(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    folder = tmp_path_factory.mktemp("degenerate")
    images: List[Path] = []
    for index in range(10):  # > quantize.CHUNK: ranges are merged across collect_data() calls
        path = folder / f"{index}.png"
        pixels = np.random.default_rng(index).integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)
        cv2.imwrite(str(path), pixels)
        images.append(path)
    return _degenerate_model(folder / "degenerate.onnx"), images


@pytest.mark.parametrize("method", quantize.METHODS)
def test_degenerate_tensors_get_a_defined_range(
    degenerate: tuple, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before the fix percentile raised ``Too many bins for data range`` on ``attn`` and entropy
    on ``vanishing``; now every tensor has a finite range whose int8 scale is a normal float."""
    model, images = degenerate
    with caplog.at_level(logging.WARNING, logger="host.quantize"):
        ranges = quantize.collect_ranges(model, "images", (SIDE, SIDE), images, method, {})
    for name in ("conv", "zeroed", "constant", "attn", "vanishing", "out"):
        amax = ranges.amax(name)
        assert np.isfinite(amax) and amax / 127 >= np.finfo(np.float32).tiny, name
    assert ranges.amax("constant") == pytest.approx(0.5)
    assert ranges.amax("attn") == pytest.approx(1 / (4 * SIDE * SIDE), rel=1e-5)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert ranges.amax("vanishing") == ranges.amax("zeroed") == 1.0  # no normal int8 scale
    assert "vanishing" in warned and "zeroed" in warned
    if method == "minmax":
        assert "too narrow" not in warned  # MinMax has no histogram
    else:
        assert "vanishing spans" in warned
    if method == "percentile":
        assert "attn spans" in warned


def test_qdq_model_builds_from_degenerate_ranges(degenerate: tuple, tmp_path: Path) -> None:
    import onnxruntime as ort

    model, images = degenerate
    ranges = quantize.collect_ranges(model, "images", (SIDE, SIDE), images, "percentile", {})
    qdq = quantize.build_qdq_model(model, ranges, tmp_path / "qdq.onnx", [])
    session = ort.InferenceSession(str(qdq), providers=["CPUExecutionProvider"])
    feed = next(quantize.preprocessed_inputs(images[:1], (SIDE, SIDE)))
    (out,) = session.run(None, {"images": feed})
    assert np.isfinite(out).all() and out.shape == (1, 4, SIDE, SIDE)
