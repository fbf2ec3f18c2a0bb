"""Graph-surgeon passes on a tiny hand-built YOLO-like model (milliseconds, no ultralytics).

The tiny model mimics the ultralytics head: a box branch (Conv -> *10 -> Reshape [1,4,N]) and a
class branch (Conv -> Sigmoid -> Identity -> Reshape [1,nc,N]) joined by a final Concat into
``output0`` [1,4+nc,N]. The box Reshape's shape comes from a Concat of Constants, so
``fold_constants`` has work to do, and the Identity gives ``remove_identity`` something to remove.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from device.errors import JetyoloError
from device.postprocess import PostprocessConfig, decode_efficient_nms
from host import surgeon

NC, SIDE = 3, 8
ANCHORS = SIDE * SIDE
HEAD = "/model.23"


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(array))


def tiny_yolo(final: str = "concat", identity_output: bool = False) -> onnx.ModelProto:
    """``final``: "concat" (YOLO-like), "concat3" (3-input Concat) or "add" (no Concat)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "w_box"),
        numpy_helper.from_array(rng.normal(size=(NC, 3, 1, 1)).astype(np.float32), "w_cls"),
        numpy_helper.from_array(np.array(10.0, np.float32), "pixels"),
        numpy_helper.from_array(np.array([1, NC, ANCHORS], np.int64), "cls_shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["images", "w_box"], ["box_map"], name=f"{HEAD}/cv2.0/Conv"),
        helper.make_node("Mul", ["box_map", "pixels"], ["box_px"], name=f"{HEAD}/Mul"),
        _const("shape_head", np.array([1, 4], np.int64)),
        _const("shape_tail", np.array([ANCHORS], np.int64)),
        helper.make_node(
            "Concat",
            ["shape_head", "shape_tail"],
            ["box_shape"],
            axis=0,
            name=f"{HEAD}/ShapeConcat",
        ),
        helper.make_node("Reshape", ["box_px", "box_shape"], ["box_flat"], name=f"{HEAD}/Reshape"),
        helper.make_node("Conv", ["images", "w_cls"], ["cls_map"], name=f"{HEAD}/cv3.0/Conv"),
        helper.make_node("Sigmoid", ["cls_map"], ["cls_sig"], name=f"{HEAD}/Sigmoid"),
        helper.make_node("Identity", ["cls_sig"], ["cls_id"], name=f"{HEAD}/Identity"),
        helper.make_node(
            "Reshape", ["cls_id", "cls_shape"], ["cls_flat"], name=f"{HEAD}/Reshape_1"
        ),
    ]
    channels = 4 + NC
    final_name = "head_out" if identity_output else "output0"
    if final == "concat":
        nodes.append(
            helper.make_node(
                "Concat", ["box_flat", "cls_flat"], [final_name], axis=1, name=f"{HEAD}/Concat_3"
            )
        )
    elif final == "concat3":
        channels = 4 + 2 * NC
        nodes.append(
            helper.make_node(
                "Concat",
                ["box_flat", "cls_flat", "cls_flat"],
                [final_name],
                axis=1,
                name=f"{HEAD}/Concat_3",
            )
        )
    else:
        channels = 4
        nodes.append(
            helper.make_node("Add", ["box_flat", "box_flat"], [final_name], name=f"{HEAD}/Add")
        )
    if identity_output:
        nodes.append(
            helper.make_node("Identity", ["head_out"], ["output0"], name=f"{HEAD}/OutIdentity")
        )
    graph = helper.make_graph(
        nodes,
        "tiny_yolo",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, channels, ANCHORS])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def run(model: onnx.ModelProto, feed: np.ndarray) -> Dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {session.get_inputs()[0].name: feed})))


def ops(model: onnx.ModelProto) -> List[str]:
    return [node.op_type for node in model.graph.node]


def images(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 3, SIDE, SIDE), dtype=np.float32)


def value_info(model: onnx.ModelProto, name: str) -> Any:
    for info in [*model.graph.output, *model.graph.input]:
        if info.name == name:
            tensor = info.type.tensor_type
            return tensor.elem_type, [d.dim_value for d in tensor.shape.dim]
    raise KeyError(name)


def test_fold_constants_folds_and_keeps_outputs() -> None:
    model = tiny_yolo()
    folded, applied = surgeon.apply_passes(model, [surgeon.fold_constants])
    assert applied == ["fold_constants"]
    assert "Constant" not in ops(folded) and ops(folded).count("Concat") == 1  # shape Concat folded
    np.testing.assert_array_equal(run(folded, images())["output0"], run(model, images())["output0"])


@pytest.mark.parametrize("identity_output", [False, True])  # Identity inside / producing the output
def test_remove_identity_removes_and_keeps_outputs(identity_output: bool) -> None:
    model = tiny_yolo(identity_output=identity_output)
    cleaned, _ = surgeon.apply_passes(model, [surgeon.remove_identity])
    assert "Identity" not in ops(cleaned)
    assert [o.name for o in cleaned.graph.output] == ["output0"]
    np.testing.assert_array_equal(
        run(cleaned, images())["output0"], run(model, images())["output0"]
    )


def test_split_head_outputs_concatenate_to_the_old_output() -> None:
    model = tiny_yolo()
    split, _ = surgeon.apply_passes(model, [surgeon.split_head])
    assert value_info(split, "boxes") == (TensorProto.FLOAT, [1, 4, ANCHORS])
    assert value_info(split, "scores") == (TensorProto.FLOAT, [1, NC, ANCHORS])
    new, old = run(split, images()), run(model, images())["output0"]
    np.testing.assert_array_equal(np.concatenate([new["boxes"], new["scores"]], axis=1), old)


@pytest.mark.parametrize(
    "final, message",
    [
        # the output is not produced by a Concat: the message names what makes it
        ("add", r"output0 \[1, 4, 64\] is made by Add with 2 inputs, not the Concat"),
        # a Concat of three tensors, but not [B,K,6]: neither head layout
        ("concat3", r"output0 \[1, 10, 64\] is a 3-input Concat of neither YOLO head layout"),
    ],
)
def test_split_head_refuses_other_heads(final: str, message: str) -> None:
    with pytest.raises(JetyoloError, match=message):
        surgeon.apply_passes(tiny_yolo(final), [surgeon.split_head])


def test_split_head_refuses_two_outputs() -> None:
    split, _ = surgeon.apply_passes(tiny_yolo(), [surgeon.split_head])
    with pytest.raises(JetyoloError, match="expected one YOLO output"):
        surgeon.apply_passes(split, [surgeon.split_head])


def test_base_passes_in_order_keep_every_value() -> None:
    model = tiny_yolo(identity_output=True)
    passes = [surgeon.fold_constants, surgeon.remove_identity, surgeon.split_head]
    final, applied = surgeon.apply_passes(model, passes)
    assert applied == ["fold_constants", "remove_identity", "split_head"]
    new, old = run(final, images()), run(model, images())["output0"]
    np.testing.assert_array_equal(np.concatenate([new["boxes"], new["scores"]], axis=1), old)


def split_model() -> onnx.ModelProto:
    return surgeon.apply_passes(tiny_yolo(), [surgeon.split_head])[0]


def test_uint8_input_equals_fp32_model_on_scaled_input() -> None:
    base = split_model()
    uint8, _ = surgeon.apply_passes(base, [surgeon.uint8_input])
    assert value_info(uint8, "images") == (TensorProto.UINT8, [1, SIDE, SIDE, 3])
    consumers = {i: n for n in uint8.graph.node for i in n.input}
    cast = consumers["images"]  # TensorRT accepts a uint8 input only when a Cast consumes it
    transpose = consumers[cast.output[0]]
    assert (cast.op_type, transpose.op_type, consumers[transpose.output[0]].op_type) == (
        "Cast",
        "Transpose",
        "Mul",
    )
    pixels = np.random.default_rng(2).integers(0, 256, (1, SIDE, SIDE, 3), dtype=np.uint8)
    pixels[0, 0, 0] = (0, 255, 128)  # the extremes
    as_float = pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    # the graph's own float NCHW tensor is pixels / 255 within 1e-6 (Mul by float32(1/255))
    probe = onnx.ModelProto()
    probe.CopyFrom(uint8)
    probe.graph.output.append(
        helper.make_tensor_value_info("images_float_nchw", TensorProto.FLOAT, None)
    )
    np.testing.assert_allclose(run(probe, pixels)["images_float_nchw"], as_float, rtol=0, atol=1e-6)
    # so outputs match the fp32 model fed pixels / 255 to float32 rounding (1 input ulp)
    got, want = run(uint8, pixels), run(base, as_float)
    for name in ("boxes", "scores"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6)
    # and bit for bit the fp32 model fed the device's float path (Preprocessor: * float32(1/255))
    device_float = pixels.transpose(0, 3, 1, 2) * np.float32(1 / 255)
    for name in ("boxes", "scores"):
        np.testing.assert_array_equal(got[name], run(base, device_float)[name])


def test_uint8_input_differs_from_unscaled_input() -> None:
    # guards the test above: forgetting /255 would be caught
    base = split_model()
    uint8, _ = surgeon.apply_passes(base, [surgeon.uint8_input])
    pixels = np.random.default_rng(2).integers(0, 256, (1, SIDE, SIDE, 3), dtype=np.uint8)
    unscaled = pixels.transpose(0, 3, 1, 2).astype(np.float32)
    assert not np.allclose(run(uint8, pixels)["boxes"], run(base, unscaled)["boxes"], atol=1e-3)


def test_uint8_input_refuses_a_non_image_input() -> None:
    model = split_model()
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8
    with pytest.raises(JetyoloError, match="needs a float32"):
        surgeon.apply_passes(model, [surgeon.uint8_input])


def test_efficient_nms_structure() -> None:
    nms_pass = surgeon.efficient_nms(0.25, 0.45, 100)
    model, applied = surgeon.apply_passes(split_model(), [nms_pass])  # checker + shape inference
    assert applied == ["efficient_nms"]
    onnx.checker.check_model(model)
    (node,) = [n for n in model.graph.node if n.op_type == "EfficientNMS_TRT"]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {
        "plugin_version": b"1",
        "background_class": -1,
        "max_output_boxes": 100,
        "score_threshold": pytest.approx(0.25),
        "iou_threshold": pytest.approx(0.45),
        "score_activation": 0,
        "class_agnostic": 0,
        "box_coding": 1,
    }
    producers = {o: n for n in model.graph.node for o in n.output}
    for tensor in node.input:  # boxes [B,4,N] -> [B,N,4], scores [B,nc,N] -> [B,N,nc]
        assert producers[tensor].op_type == "Transpose"
        assert [a.ints for a in producers[tensor].attribute] == [[0, 2, 1]]
    assert [o.name for o in model.graph.output] == list(surgeon.NMS_OUTPUTS)
    assert value_info(model, "num_dets") == (TensorProto.INT32, [1, 1])
    assert value_info(model, "det_boxes") == (TensorProto.FLOAT, [1, 100, 4])
    assert value_info(model, "det_scores") == (TensorProto.FLOAT, [1, 100])
    assert value_info(model, "det_classes") == (TensorProto.INT32, [1, 100])


def test_efficient_nms_outputs_are_what_the_device_decodes() -> None:
    model, _ = surgeon.apply_passes(split_model(), [surgeon.efficient_nms(0.25, 0.45, 10)])
    fake = {
        o.name: np.zeros([d.dim_value for d in o.type.tensor_type.shape.dim])
        for o in model.graph.output
    }
    fake["num_dets"][:] = 2
    assert len(decode_efficient_nms(fake, PostprocessConfig().max_det)) == 2


def test_efficient_nms_needs_the_split_head() -> None:
    with pytest.raises(JetyoloError, match=r"needs the split one-to-many head .* the graph has "
                       r"output0 \[1, 7, 64\]; run split_head first"):
        surgeon.apply_passes(tiny_yolo(), [surgeon.efficient_nms(0.25, 0.45, 100)])


def test_apply_passes_names_the_pass_that_broke_the_graph() -> None:
    def break_graph(graph: Any) -> Any:
        mul = next(n for n in graph.nodes if n.op == "Mul")
        mul.inputs[1].values = np.array(10, np.int64)  # float * int64: a type error
        return graph

    with pytest.raises(JetyoloError, match="break_graph"):
        surgeon.apply_passes(tiny_yolo(), [break_graph])


def test_head_postprocess_nodes_exclude_the_conv_branches() -> None:
    names = surgeon.head_postprocess_nodes(surgeon.import_graph(tiny_yolo()))
    assert f"{HEAD}/Sigmoid" in names and f"{HEAD}/Concat_3" in names
    assert not any("/cv2." in n or "/cv3." in n for n in names)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_load_onnx_reports_a_damaged_file(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "model.onnx"
    data = tiny_yolo().SerializeToString()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00\xff" * 100)
    with pytest.raises(JetyoloError, match=str(path)) as info:
        surgeon.load_onnx(path)
    assert "\n" not in str(info.value)


def test_load_onnx_reads_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(tiny_yolo(), str(path))
    assert surgeon.load_onnx(path).graph.name == "tiny_yolo"


def tiny_end2end(rows: int = 5) -> onnx.ModelProto:
    """YOLO26's end-to-end output, in miniature: a Concat of boxes [1,K,4], score [1,K,1] and
    class [1,K,1] into [1,K,6] (the TopK before it does not matter to the split)."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.normal(size=(6, 3, 1, 1)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([1, 6, ANCHORS], np.int64), "flat"),
    ]
    node = helper.make_node
    nodes = [
        node("Conv", ["images", "w"], ["maps"], name=f"{HEAD}/one2one_cv2.0/Conv"),
        node("Reshape", ["maps", "flat"], ["flat_maps"], name=f"{HEAD}/Reshape"),
        node("Transpose", ["flat_maps"], ["rows_all"], perm=[0, 2, 1], name=f"{HEAD}/Transpose"),
        node("Slice", ["rows_all", "s0", "s1", "axis1"], ["rows"], name=f"{HEAD}/Slice"),
        node("Split", ["rows", "parts"], ["b", "s", "c"], axis=2, name=f"{HEAD}/Split"),
        node("Concat", ["b", "s", "c"], ["output0"], axis=2, name=f"{HEAD}/Concat_5"),
    ]
    inits += [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in
              (("s0", [0]), ("s1", [rows]), ("axis1", [1]), ("parts", [4, 1, 1]))]
    graph = helper.make_graph(
        nodes, "tiny_end2end",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, rows, 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_split_head_splits_the_end2end_head_into_the_device_contract() -> None:
    from device.postprocess import END2END_OUTPUTS, contract_of

    feed = np.random.default_rng(2).normal(size=(1, 3, SIDE, SIDE)).astype(np.float32)
    old = run(tiny_end2end(), feed)["output0"]
    model, _ = surgeon.apply_passes(tiny_end2end(), [surgeon.split_head])
    new = run(model, feed)
    assert contract_of(new) == "end2end" and list(new) == list(END2END_OUTPUTS)
    assert new["det_boxes"].shape == (1, 5, 4) and new["det_scores"].shape == (1, 5)
    rebuilt = np.concatenate(
        [new["det_boxes"], new["det_scores"][..., None], new["det_classes"][..., None]], axis=2
    )
    np.testing.assert_array_equal(rebuilt, old)
    head = surgeon.head_postprocess_nodes(surgeon.import_graph(model))
    assert f"{HEAD}/split/det_scores" in head and f"{HEAD}/split/det_classes" in head
    assert f"{HEAD}/one2one_cv2.0/Conv" not in head  # convs stay quantizable


def test_efficient_nms_refuses_the_end2end_head_naming_it() -> None:
    model, _ = surgeon.apply_passes(tiny_end2end(), [surgeon.split_head])
    with pytest.raises(JetyoloError, match=r"the graph has det_boxes \[1, 5, 4\], det_scores "
                       r"\[1, 5\], det_classes \[1, 5\]; the end-to-end head is NMS-free already"):
        surgeon.apply_passes(model, [surgeon.efficient_nms(0.25, 0.7, 100)])
