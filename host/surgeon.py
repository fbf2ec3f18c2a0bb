"""onnx-graphsurgeon passes applied to the ultralytics ONNX export.

Each pass is a named function ``Graph -> Graph``. ``apply_passes`` runs them in order and, after
each one, cleans up, toposorts, runs ``onnx.checker`` with shape inference and opens the result in
ONNX Runtime, so a broken rewrite fails at the pass that broke it.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, List, Sequence, Tuple

import numpy as np

from device.errors import JetyoloError
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


def fold_constants(graph: Graph) -> Graph:
    """Fold constant subgraphs (shape arithmetic of the head) into initializers."""
    return graph.fold_constants().cleanup()


def remove_identity(graph: Graph) -> Graph:
    """Bypass Identity nodes: connect their consumers to their input."""
    for node in [n for n in graph.nodes if n.op == "Identity"]:
        source, target = node.inputs[0], node.outputs[0]
        if target in graph.outputs:
            source.name, target.name = target.name, f"{target.name}__identity_in"
            graph.outputs[graph.outputs.index(target)] = source
        for consumer in list(target.outputs):
            for index, tensor in enumerate(consumer.inputs):
                if tensor is target:
                    consumer.inputs[index] = source
        node.outputs.clear()
    return graph.cleanup()


def find_head_concat(graph: Graph) -> Any:
    """The final Concat joining boxes [B,4,N] and scores [B,nc,N] into YOLO's single output."""
    if len(graph.outputs) != 1:
        names = [t.name for t in graph.outputs]
        raise JetyoloError(f"expected one YOLO output to split, the graph has {names}; is it a detect model?")
    producer = graph.outputs[0].inputs[0] if graph.outputs[0].inputs else None
    if producer is None or producer.op != "Concat" or len(producer.inputs) != 2:
        raise JetyoloError("the model's output is not a 2-input Concat of boxes and scores; "
                           "export a YOLO11/YOLOv8 detect model with ultralytics")
    return producer


def split_head(graph: Graph) -> Graph:
    """Replace the final Concat with two outputs, ``boxes`` [B,4,N] and ``scores`` [B,nc,N].

    Boxes are 0..imgsz pixels, scores 0..1: sharing one INT8 scale wipes the scores (measured), so
    they must be separate tensors. Values are unchanged; only the split is new.
    """
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


def head_postprocess_nodes(graph: Graph) -> List[str]:
    """Names of the head's post-processing nodes (DFL, sigmoid, box decode): everything in the
    Detect module except its cv2/cv3 convolution branches. INT8 must not touch these."""
    prefix = _detect_prefix(graph)
    branches = (f"{prefix}cv2", f"{prefix}cv3", f"{prefix}one2one")
    return [n.name for n in graph.nodes if n.name.startswith(prefix) and not n.name.startswith(branches)]


def _detect_prefix(graph: Graph) -> str:
    producers = [t.inputs[0] for t in graph.outputs if t.inputs]
    if not producers or "/" not in producers[0].name.strip("/"):
        raise JetyoloError("cannot find the Detect module in the graph (node names are not ultralytics')")
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
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
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
