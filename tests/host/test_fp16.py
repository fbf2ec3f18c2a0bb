"""The fp16 variant every export writes: float16 body, float32 I/O and head post-processing, at
parity with fp32 on ONNX Runtime (and a damaged one is refused)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from device.bundle import Bundle
from device.errors import JetyoloError
from host import fp16, parity


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path) -> Bundle:
    return Bundle.load(bundle_dir)


def test_fp16_variant_is_half_with_float_io_and_head(bundle: Bundle) -> None:
    variant = bundle.variant("fp16")
    assert variant["float_dtype"] == "float16"
    assert variant["input"] == bundle.variant("fp32")["input"]
    model = onnx.load(str(bundle.model_path("fp16")))
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [TensorProto.FLOAT]
    assert [o.name for o in model.graph.output] == ["boxes", "scores"]
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {TensorProto.FLOAT}
    weights = {init.name: init.data_type for init in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    head = set(bundle.manifest["head"]["postprocess_nodes"])
    for conv in convs:  # the body's weights are half, the DFL conv of the head stays float
        expected = TensorProto.FLOAT if conv.name in head else TensorProto.FLOAT16
        assert weights[conv.input[1]] == expected, conv.name
    assert sum(conv.name in head for conv in convs) == 1


def test_fp16_parity_is_recorded_within_tolerance(bundle: Bundle) -> None:
    record = bundle.manifest["parity"]["fp16_vs_fp32"]
    limits = fp16.Fp16Tolerance()
    assert 0 < record["boxes"] <= limits.boxes_atol and 0 < record["scores"] <= limits.scores_atol
    assert record["detections"]["agreement"] >= 0.9  # recorded, not gated (host/fp16.py)
    assert record["detections"]["matched"] > 10
    lines = parity.report_lines(bundle.manifest["parity"])
    assert any("fp16 variant vs fp32" in line for line in lines)


def test_a_damaged_fp16_model_fails_parity(bundle: Bundle, tmp_path: Path) -> None:
    model = onnx.load(str(bundle.model_path("fp16")))
    first_conv = next(n for n in model.graph.node if n.op_type == "Conv")
    weight = next(i for i in model.graph.initializer if i.name == first_conv.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float16(0.5),
                                            weight.name))
    damaged = tmp_path / "damaged.onnx"
    onnx.save(model, str(damaged))
    frames = parity.synthetic_frames(len(bundle.manifest["class_names"]), 4)
    refused = r"fp16 variant is not at parity with fp32 on ONNX Runtime: boxes differ"
    with pytest.raises(JetyoloError, match=refused):
        fp16.checked_fp16(bundle.model_path("fp32"), damaged, frames, bundle.input_size)
    # the undamaged model's figures on the 16 parity frames: test_fp16_parity_is_recorded_...
