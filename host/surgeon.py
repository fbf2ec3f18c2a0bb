"""onnx-graphsurgeon passes applied to the ultralytics ONNX export.

Each pass is a named function ``Graph -> Graph``. ``apply_passes`` runs them in order and, after
each one, cleans up, toposorts, runs ``onnx.checker`` with shape inference and opens the result in
ONNX Runtime (skipped for graphs with TensorRT plugins), so a broken rewrite fails at the pass
that broke it. Passes that only rewrite (fold_constants, remove_identity, split_head) keep every
value; uint8_input and efficient_nms change the interface as their docstrings say.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, List, Sequence, Tuple, Union

import numpy as np

from device.errors import JetyoloError
from device.preprocess import FRAME_INPUT
from host._env import require

log = logging.getLogger(__name__)
Graph = Any  # onnx_graphsurgeon.Graph (imported lazily: host extras)
GraphPass = Callable[[Graph], Graph]


def _gs() -> Any:
    return require("onnx_graphsurgeon", "export")


def _onnx() -> Any:
    return require("onnx", "export")


def import_graph(model: Any) -> Graph:
    return _gs().import_onnx(model)


def export_model(graph: Graph) -> Any:
    return _gs().export_onnx(graph.cleanup().toposort())


def load_onnx(path: Union[str, Path], verb: str = "export") -> Any:
    """Read an ONNX file, or fail with one line saying which file and what is wrong with it
    (``verb``: the jetyolo command named when onnx is not installed)."""
    onnx = require("onnx", verb)
    path = Path(path)
    if not path.is_file():
        raise JetyoloError(f"ONNX model {path} does not exist")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf DecodeError, checker ValidationError, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise JetyoloError(
            f"{path} is not a valid ONNX model ({type(exc).__name__}: {reason}); the file is "
            "truncated or corrupted: re-create it with `jetyolo export`"
        ) from exc
    return model


BATCH_DIM = "batch"  # the symbolic dim 0 of a --batch N graph (N > 1): 1..N rows per call


def pin_spatial(model: Any, height: int, width: int) -> Any:
    """A dynamic ultralytics export (``dynamic=True``: batch, height and width symbolic) with
    height and width fixed: the input becomes ``["batch", 3, height, width]``, onnxslim re-infers
    the shapes and folds what only depended on H x W (anchors, strides, reshape targets), and
    dim 0 of every input and output is named ``batch``. Nothing may depend on the batch but
    dim 0 itself; ``host.export`` checks that by running 1 and N rows."""
    onnx = _onnx()
    onnxslim = require("onnxslim", "export")
    images = model.graph.input[0].type.tensor_type.shape.dim
    if len(images) != 4:
        raise JetyoloError(f"expected a [B,3,H,W] input, the export has {len(images)} dims")
    for dim, size in ((images[2], height), (images[3], width)):
        dim.Clear()
        dim.dim_value = size
    del model.graph.value_info[:]  # shapes inferred for a symbolic H x W
    for output in model.graph.output:
        for dim in list(output.type.tensor_type.shape.dim)[1:]:
            dim.Clear()
    slimmed = onnxslim.slim(onnx.shape_inference.infer_shapes(model))
    for value in (*slimmed.graph.input, *slimmed.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = BATCH_DIM
    return slimmed


def fold_constants(graph: Graph) -> Graph:
    """Fold constant subgraphs (shape arithmetic of the head) into initializers."""
    return graph.fold_constants().cleanup()


def remove_identity(graph: Graph) -> Graph:
    """Bypass Identity nodes: connect their consumers to their input."""
    for node in [n for n in graph.nodes if n.op == "Identity"]:
        source, target = node.inputs[0], node.outputs[0]
        if target in graph.outputs:  # the input takes over the output's name, dtype and shape
            source.name, target.name = target.name, f"{target.name}__identity_in"
            source.dtype, source.shape = target.dtype, target.shape
            graph.outputs[graph.outputs.index(target)] = source
        for consumer in list(target.outputs):
            for index, tensor in enumerate(consumer.inputs):
                if tensor is target:
                    consumer.inputs[index] = source
        node.outputs.clear()
    return graph.cleanup()


def find_head_concat(graph: Graph) -> Any:
    """The final Concat of YOLO's single output: boxes [B,4,N] + scores [B,nc,N] (one-to-many
    head), or boxes [B,K,4] + score [B,K,1] + class [B,K,1] (YOLO26's end-to-end head)."""
    if len(graph.outputs) != 1:
        names = [t.name for t in graph.outputs]
        raise JetyoloError(
            f"expected one YOLO output to split, the graph has {names}; is it a detect model?"
        )
    output = graph.outputs[0]
    producer = output.inputs[0] if output.inputs else None
    if producer is None or producer.op != "Concat" or len(producer.inputs) not in (2, 3):
        found = f"{producer.op} with {len(producer.inputs)} inputs" if producer else "no producer"
        raise JetyoloError(
            f"the model's output {output.name} {list(output.shape or [])} is made by {found}, not "
            "the Concat of YOLO's one-to-many [B,4+nc,N] or end-to-end [B,K,6] head; export a "
            "YOLOv8/11/12/26 detect model with ultralytics"
        )
    return producer


def head_layout(graph: Graph) -> str:
    """``one2many`` or ``end2end``: which YOLO head the single-output graph ends in."""
    concat = find_head_concat(graph)
    shape = list(graph.outputs[0].shape or [])
    if len(concat.inputs) == 2 and len(shape) == 3:
        return "one2many"
    if len(concat.inputs) == 3 and len(shape) == 3 and shape[2] == 6:
        return "end2end"
    raise JetyoloError(
        f"the model's output {graph.outputs[0].name} {shape} is a {len(concat.inputs)}-input "
        "Concat of neither YOLO head layout ([B,4+nc,N] one-to-many, [B,K,6] end-to-end)"
    )


def split_head(graph: Graph) -> Graph:
    """Replace the final Concat with separate outputs; values are unchanged, only the split is new.

    One-to-many head: ``boxes`` [B,4,N] (cx, cy, w, h px) and ``scores`` [B,nc,N]. Boxes are
    0..imgsz pixels, scores 0..1: sharing one INT8 scale wipes the scores (measured), so they must
    be separate tensors. End-to-end head: ``det_boxes`` [B,K,4] (x1, y1, x2, y2 px),
    ``det_scores`` [B,K] and ``det_classes`` [B,K] (float class ids), the contract
    ``device.postprocess.decode_end2end`` reads.
    """
    if head_layout(graph) == "end2end":
        return _split_end2end(graph)
    concat = find_head_concat(graph)
    boxes, scores = concat.inputs
    output = graph.outputs[0]
    batch, channels, anchors = output.shape
    boxes.name, scores.name = "boxes", "scores"
    boxes.shape, scores.shape = [batch, 4, anchors], [batch, channels - 4, anchors]
    boxes.dtype = scores.dtype = np.float32
    graph.outputs = [boxes, scores]
    concat.outputs.clear()
    return graph.cleanup()


def _split_end2end(graph: Graph) -> Graph:
    """[B,K,6] -> det_boxes [B,K,4], det_scores [B,K], det_classes [B,K]. The two Reshapes are
    named inside the Detect module, so they count as head post-processing (kept out of INT8)."""
    gs = _gs()
    concat = find_head_concat(graph)
    boxes, scores, classes = concat.inputs
    batch, count, _ = graph.outputs[0].shape
    prefix = _detect_prefix(graph)
    boxes.name, boxes.shape, boxes.dtype = "det_boxes", [batch, count, 4], np.float32
    rows = batch if isinstance(batch, int) else 0  # Reshape's 0 keeps a symbolic batch
    flat = gs.Constant(f"{prefix}split_shape", np.array([rows, count], dtype=np.int64))
    outputs = []
    for name, tensor in (("det_scores", scores), ("det_classes", classes)):
        flattened = gs.Variable(name, dtype=np.float32, shape=[batch, count])
        graph.nodes.append(
            gs.Node("Reshape", f"{prefix}split/{name}", inputs=[tensor, flat], outputs=[flattened])
        )
        outputs.append(flattened)
    graph.outputs = [boxes, *outputs]
    concat.outputs.clear()
    return graph.cleanup()


def uint8_input(graph: Graph) -> Graph:
    """Take ``images`` as uint8 NHWC RGB [B,H,W,3]; the graph does Cast, Transpose and *1/255.

    The input keeps its name; the old float NCHW tensor becomes an internal tensor fed by the new
    nodes. The Cast comes first: TensorRT accepts a uint8 network input only when a Cast consumes
    it. ``float32(1/255)`` is the constant the device's float path multiplies by, so both inputs
    give bit-identical tensors.
    """
    gs = _gs()
    images = _single_float_input(graph, "--uint8-input")
    shape = list(images.shape)
    batch, channels, height, width = shape
    name = images.name
    images.name = f"{name}_float_nchw"
    raw = gs.Variable(name, dtype=np.uint8, shape=[batch, height, width, channels])
    as_float = gs.Variable(
        f"{name}_float_nhwc", dtype=np.float32, shape=[batch, height, width, channels]
    )
    unscaled = gs.Variable(f"{name}_unscaled_nchw", dtype=np.float32, shape=shape)
    scale = gs.Constant(f"{name}_scale", np.array(1.0 / 255.0, dtype=np.float32))
    graph.nodes += [
        gs.Node(
            "Cast",
            f"/{name}/Cast",
            attrs={"to": _onnx().TensorProto.FLOAT},
            inputs=[raw],
            outputs=[as_float],
        ),
        gs.Node(
            "Transpose",
            f"/{name}/Transpose",
            attrs={"perm": [0, 3, 1, 2]},
            inputs=[as_float],
            outputs=[unscaled],
        ),
        gs.Node("Mul", f"/{name}/Scale", inputs=[unscaled, scale], outputs=[images]),
    ]
    graph.inputs = [raw]
    return graph




def frame_input(graph: Graph) -> Graph:
    """Take the camera frame itself: ``frame`` uint8 [1, height, width, 3] BGR of any size; the
    graph letterboxes it (Resize linear + Pad 114), swaps BGR to RGB and scales by 1/255.

    The letterbox geometry is ``device.preprocess.Letterbox.fit``'s, computed in int64 from the
    input's shape: the side that binds is the one with ``H*w <= W*h``, the other side is
    ``round(side * scale)`` as ``(2*side*S + s) // (2*s)`` (half up; Python's float ``round``
    agrees except at exact halves), the top/left pad is ``(H - new_h) // 2`` (what
    ``round(d/2 - 0.1)`` gives for integer ``d``). Integer shape arithmetic only, so the shape
    subgraph is a shape-tensor computation (TensorRT folds it once the optimisation profile pins
    the frame size; ONNX Runtime runs it per call). Resize runs on the float frame (no uint8
    rounding between resize and scale, which the CPU path has: differences up to one grey
    level, judged at the detection level by ``host.parity.frame_difference``).
    """
    gs = _gs()
    onnx = _onnx()
    images = _single_float_input(graph, "--frame-input")
    batch, _, height, width = images.shape
    if batch != 1:
        raise JetyoloError(f"--frame-input needs a batch-1 model, this one has batch {batch!r}")
    name = images.name
    images.name = f"{name}_from_frame"
    frame = gs.Variable(FRAME_INPUT, dtype=np.uint8, shape=[1, "frame_height", "frame_width", 3])
    const = _constants(gs, name)

    def node(op: str, inputs: List[Any], dtype: Any = np.int64, **attrs: Any) -> Any:
        out = gs.Variable(f"/{name}/frame/{op}_{len(graph.nodes)}", dtype=dtype)
        graph.nodes.append(gs.Node(op, out.name, attrs=attrs, inputs=inputs, outputs=[out]))
        return out

    shape = node("Shape", [frame])
    src_h = node("Slice", [shape, const([1]), const([2])])
    src_w = node("Slice", [shape, const([2]), const([3])])
    model_h, model_w = const([height]), const([width])
    height_binds = node("LessOrEqual", [node("Mul", [model_h, src_w]),
                                        node("Mul", [model_w, src_h])], dtype=np.bool_)

    def rounded(side: Any, model_side: Any, src_side: Any) -> Any:  # round(side * S / s)
        twice = node("Mul", [node("Mul", [side, model_side]), const([2])])
        return node("Div", [node("Add", [twice, src_side]), node("Mul", [src_side, const([2])])])

    new_h = node("Where", [height_binds, model_h, rounded(src_h, model_w, src_w)])
    new_w = node("Where", [height_binds, rounded(src_w, model_h, src_h), model_w])
    pad_h, pad_w = node("Sub", [model_h, new_h]), node("Sub", [model_w, new_w])
    top, left = node("Div", [pad_h, const([2])]), node("Div", [pad_w, const([2])])
    bottom, right = node("Sub", [pad_h, top]), node("Sub", [pad_w, left])
    zero = const([0])
    sizes = node("Concat", [const([1]), const([3]), new_h, new_w], axis=0)
    pads = node("Concat", [zero, zero, top, left, zero, zero, bottom, right], axis=0)

    as_float = node("Cast", [frame], dtype=np.float32, to=onnx.TensorProto.FLOAT)
    nchw = node("Transpose", [as_float], dtype=np.float32, perm=[0, 3, 1, 2])
    empty = gs.Constant(f"{name}_frame_empty", np.zeros([0], dtype=np.float32))
    resized = node("Resize", [nchw, empty, empty, sizes], dtype=np.float32, mode="linear",
                   coordinate_transformation_mode="half_pixel")
    pad_value = gs.Constant(f"{name}_frame_pad", np.array(114.0, dtype=np.float32))
    padded = node("Pad", [resized, pads, pad_value], dtype=np.float32, mode="constant")
    bgr_to_rgb = gs.Constant(f"{name}_frame_rgb", np.array([2, 1, 0], dtype=np.int64))
    rgb = node("Gather", [padded, bgr_to_rgb], dtype=np.float32, axis=1)
    scale = gs.Constant(f"{name}_frame_scale", np.array(1.0 / 255.0, dtype=np.float32))
    graph.nodes.append(gs.Node("Mul", f"/{name}/frame/Scale", inputs=[rgb, scale],
                               outputs=[images]))
    graph.inputs = [frame]
    return graph


def _constants(gs: Any, prefix: str) -> Callable[[List[int]], Any]:
    """A factory of named int64 1-D constants (shape-tensor operands)."""
    made: List[Any] = []

    def const(values: List[int]) -> Any:
        made.append(gs.Constant(f"{prefix}_frame_c{len(made)}", np.array(values, np.int64)))
        return made[-1]

    return const


def _single_float_input(graph: Graph, flag: str) -> Any:
    if len(graph.inputs) != 1:
        raise JetyoloError(
            f"{flag} needs a model with one input, this one has {[t.name for t in graph.inputs]}"
        )
    images = graph.inputs[0]
    shape = list(images.shape or [])
    if len(shape) != 4 or shape[1] != 3 or np.dtype(images.dtype) != np.float32:
        raise JetyoloError(
            f"{flag} needs a float32 [B,3,H,W] input, {images.name!r} is "
            f"{images.dtype} {shape}; export with a static --imgsz"
        )
    return images


NMS_OUTPUTS = ("num_dets", "det_boxes", "det_scores", "det_classes")


def efficient_nms(score_threshold: float, iou_threshold: float, max_output_boxes: int) -> GraphPass:
    """A pass appending TensorRT's ``EfficientNMS_TRT`` to a split-head graph.

    Boxes [B,4,N] and scores [B,nc,N] are transposed to the plugin's [B,N,4] and [B,N,nc]; the
    outputs become ``num_dets`` [B,1] int32, ``det_boxes`` [B,M,4] float32 (x1,y1,x2,y2 input
    pixels), ``det_scores`` [B,M] float32 and ``det_classes`` [B,M] int32, M = max_output_boxes.
    The node lives in the ``TRT`` domain so ``onnx.checker`` accepts it; TensorRT's ONNX parser
    resolves it from the plugin registry by op type. ONNX Runtime cannot run it.
    """

    def efficient_nms(graph: Graph) -> Graph:
        gs = _gs()
        boxes, scores = split_outputs(graph, "--nms")
        batch, _, anchors = boxes.shape
        classes = scores.shape[1]
        boxes_t = gs.Variable("boxes_bn4", dtype=np.float32, shape=[batch, anchors, 4])
        scores_t = gs.Variable("scores_bnc", dtype=np.float32, shape=[batch, anchors, classes])
        outputs = [
            gs.Variable("num_dets", dtype=np.int32, shape=[batch, 1]),
            gs.Variable("det_boxes", dtype=np.float32, shape=[batch, max_output_boxes, 4]),
            gs.Variable("det_scores", dtype=np.float32, shape=[batch, max_output_boxes]),
            gs.Variable("det_classes", dtype=np.int32, shape=[batch, max_output_boxes]),
        ]
        attrs = {
            "plugin_version": "1",
            "background_class": -1,
            "max_output_boxes": max_output_boxes,
            "score_threshold": float(score_threshold),
            "iou_threshold": float(iou_threshold),
            "score_activation": 0,
            "class_agnostic": 0,
            "box_coding": 1,
        }
        graph.nodes += [
            gs.Node(
                "Transpose",
                "/nms/TransposeBoxes",
                attrs={"perm": [0, 2, 1]},
                inputs=[boxes],
                outputs=[boxes_t],
            ),
            gs.Node(
                "Transpose",
                "/nms/TransposeScores",
                attrs={"perm": [0, 2, 1]},
                inputs=[scores],
                outputs=[scores_t],
            ),
            gs.Node(
                "EfficientNMS_TRT",
                "/nms/EfficientNMS_TRT",
                attrs=attrs,
                inputs=[boxes_t, scores_t],
                outputs=outputs,
                domain="TRT",
            ),
        ]
        graph.outputs = outputs
        return graph

    return efficient_nms


def split_outputs(
    graph: Graph, needed_by: str, fix: str = "run split_head first"
) -> Tuple[Any, Any]:
    """The ``boxes`` and ``scores`` outputs of a split one-to-many graph, or one line saying what
    ``needed_by`` needs, the layout found and ``fix``."""
    by_name = {t.name: t for t in graph.outputs}
    if set(by_name) != {"boxes", "scores"}:
        if set(by_name) == {"det_boxes", "det_scores", "det_classes"}:
            fix = "the end-to-end head is NMS-free already: export with --head one2many for it"
        found = ", ".join(f"{t.name} {list(t.shape or [])}" for t in graph.outputs)
        raise JetyoloError(
            f"{needed_by} needs the split one-to-many head (outputs boxes [B,4,N], scores "
            f"[B,nc,N]), the graph has {found}; {fix}"
        )
    return by_name["boxes"], by_name["scores"]


def head_postprocess_nodes(graph: Graph) -> List[str]:
    """Names of the head's post-processing nodes (DFL, sigmoid, box decode): everything in the
    Detect module except its cv2/cv3 convolution branches. INT8 must not touch these."""
    prefix = _detect_prefix(graph)
    branches = (f"{prefix}cv2", f"{prefix}cv3", f"{prefix}one2one")
    return [
        n.name for n in graph.nodes if n.name.startswith(prefix) and not n.name.startswith(branches)
    ]


def _detect_prefix(graph: Graph) -> str:
    producers = [t.inputs[0] for t in graph.outputs if t.inputs]
    if not producers or "/" not in producers[0].name.strip("/"):
        raise JetyoloError(
            "cannot find the Detect module in the graph (node names are not ultralytics')"
        )
    module = producers[0].name.strip("/").split("/")[0]
    return f"/{module}/"


def check_model(model: Any, stage: str) -> Any:
    """onnx.checker + shape inference + an ONNX Runtime session; returns the inferred model."""
    onnx = _onnx()
    try:
        onnx.checker.check_model(model)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as exc:
        raise JetyoloError(f"graph check failed after {stage}: {exc}") from exc
    if not _uses_trt_plugins(model):
        ort = require("onnxruntime", "export")
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise JetyoloError(f"ONNX Runtime cannot load the graph after {stage}: {exc}") from exc
    return inferred


def _uses_trt_plugins(model: Any) -> bool:
    return any(node.op_type.endswith("_TRT") for node in model.graph.node)


def apply_passes(model: Any, passes: Sequence[GraphPass]) -> Tuple[Any, List[str]]:
    """Run ``passes`` in order, checking the model after each; returns (model, names applied)."""
    applied = []
    for graph_pass in passes:
        model = export_model(graph_pass(import_graph(model)))
        check_model(model, graph_pass.__name__)
        applied.append(graph_pass.__name__)
        log.info("  pass %-16s ok (%d nodes)", graph_pass.__name__, len(model.graph.node))
    return model, applied
