"""The TensorRT calibration cache of each bundle variant, built from that variant's own ONNX graph.

A cache holds one scale per tensor TensorRT's ONNX parser names after an ONNX tensor. The uint8
and nms variants parse to networks with float tensors the fp32 graph does not have (the uint8
prologue ``images_float_nhwc``, ``images_unscaled_nchw``, ``images_float_nchw``; the NMS
transposes ``boxes_bn4``, ``scores_bnc`` and the plugin's ``det_*`` outputs), so a cache made for
the fp32 graph does not cover them. Each variant gets its own cache here:

- a tensor the fp32 graph also has keeps the range calibration measured for it;
- the network input and the tensors that only rescale it (Cast, Transpose, Mul by a constant)
  take their range from the preprocessing contract, not from percentiles: a float input is
  ``[0, 255 * preprocess.scale]`` (``[0, 1]``), a uint8 input ``[0, 255]``;
- tensors computed from the head's post-processing only (NMS) are kept in float: left out of
  the cache, their nodes added to the variant's FP16 layers.

A float tensor that fits none of these is an error, never a guessed scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Set

from device.errors import JetyoloError
from host._env import require

UINT8_MAX = 255.0
# Ops whose output holds values of their first input only (its range bounds theirs): data
# movement, and Resize in linear or nearest mode (each output is a convex combination of inputs;
# cubic can overshoot, so it is not listed).
VALUE_PRESERVING_OPS = ("Cast", "Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze",
                        "Flatten", "Gather", "Slice")
BOUNDED_RESIZE_MODES = (b"linear", b"nearest")
SCALING_OPS = ("Mul", "Div")


@dataclass
class VariantCache:
    """What one variant's cache holds and what it leaves in float."""

    variant: str
    entries: Dict[str, float]  # tensor -> amax, in graph order: the cache's lines
    uncached: List[str]  # float tensors of the graph kept in float on purpose
    fp16_layers: List[str]  # nodes of the graph kept in float (head post-processing and beyond)
    from_contract: Dict[str, float] = field(default_factory=dict)  # tensors whose amax is derived
    graph_tensors: List[str] = field(default_factory=list)  # every float tensor, graph order

    @property
    def tensors(self) -> List[str]:
        return list(self.entries)


def float_tensors(model: Any) -> List[str]:
    """The graph's float32 tensors TensorRT can give a scale: non-initializer graph inputs and
    node outputs, in graph order (types from ONNX shape inference and the graph's declarations)."""
    onnx = require("onnx", "calibrate")
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {info.name: info.type.tensor_type.elem_type
             for info in [*graph.value_info, *graph.input, *graph.output]}
    initializers = {init.name for init in graph.initializer}
    order = [i.name for i in graph.input if i.name not in initializers]
    order += [name for node in graph.node for name in node.output if name]
    return [name for name in dict.fromkeys(order) if types.get(name) == onnx.TensorProto.FLOAT]


def postprocess_nodes(model: Any, head_nodes: Iterable[str], fp32_nodes: Set[str]) -> List[str]:
    """The head's post-processing nodes present in ``model`` plus the variant's own nodes that
    read nothing but post-processing tensors (the NMS appended to the split head)."""
    initializers = {init.name for init in model.graph.initializer}
    kept = [node.name for node in model.graph.node if node.name in set(head_nodes)]
    kept_tensors = {t for node in model.graph.node if node.name in set(kept) for t in node.output}
    for node in model.graph.node:  # graph order is topological (onnx.checker)
        if node.name in fp32_nodes or node.name in kept:
            continue
        inputs = [t for t in node.input if t and t not in initializers]
        if inputs and all(t in kept_tensors for t in inputs):
            kept.append(node.name)
            kept_tensors.update(t for t in node.output if t)
    return kept


def input_contract_amax(input_dtype: str, preprocess: Mapping[str, Any]) -> float:
    """The largest value the device feeds the network input: uint8 pixels are 0..255, a float
    input is the pixels times ``preprocess.scale`` (1/255: 0..1)."""
    if input_dtype == "uint8":
        return UINT8_MAX
    scale = preprocess.get("scale")
    if not isinstance(scale, (int, float)) or not 0 < float(scale) <= 1:
        raise JetyoloError(
            f"manifest preprocess.scale is {scale!r}; calibration needs the pixel scale of the "
            "float input (1/255 from `jetyolo export`)"
        )
    return UINT8_MAX * float(scale)


def contract_ranges(model: Any, input_amax: float) -> Dict[str, float]:
    """amax of the graph inputs (the contract) and of every tensor that only rescales them."""
    numpy_helper = require("onnx.numpy_helper", "calibrate")
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    initializers = set(constants)
    amax = {i.name: input_amax for i in model.graph.input if i.name not in initializers}
    for node in model.graph.node:
        if not node.input or node.input[0] not in amax or not node.output:
            continue
        source = amax[node.input[0]]
        if node.op_type in VALUE_PRESERVING_OPS or _bounded_resize(node):
            amax[node.output[0]] = source
        elif node.op_type == "Pad" and _pad_value(node, constants) is not None:
            amax[node.output[0]] = max(source, abs(float(_pad_value(node, constants) or 0.0)))
        elif node.op_type in SCALING_OPS and len(node.input) == 2:
            factor = constants.get(node.input[1])
            if factor is not None and factor.size == 1 and float(abs(factor.item())) > 0:
                size = float(abs(factor.item()))
                amax[node.output[0]] = source * size if node.op_type == "Mul" else source / size
    return amax


def _bounded_resize(node: Any) -> bool:
    if node.op_type != "Resize":
        return False
    mode = next((a.s for a in node.attribute if a.name == "mode"), b"nearest")
    return mode in BOUNDED_RESIZE_MODES


def _pad_value(node: Any, constants: Mapping[str, Any]) -> Optional[float]:
    """The constant a constant-mode Pad fills with (0 when not given), else None."""
    mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
    if mode != b"constant":
        return None
    if len(node.input) < 3 or not node.input[2]:
        return 0.0
    value = constants.get(node.input[2])
    return None if value is None or value.size != 1 else float(value.item())


def variant_cache(
    variant: str,
    model: Any,
    input_dtype: str,
    measured: Mapping[str, float],
    head_nodes: Iterable[str],
    fp32_nodes: Set[str],
    preprocess: Mapping[str, Any],
    float_layers: Iterable[str] = (),
) -> VariantCache:
    """The cache of one variant's graph: ``measured`` is the amax calibration found per fp32
    tensor; the input side comes from the contract, the post-processing stays float, and so do
    the inputs and outputs of ``float_layers`` (kept in FP16 by the gate or --exclude): a tensor
    with a scale may be stored in INT8 by its producer, which would feed the FP16 layer the very
    rounding it is kept away from."""
    kept_nodes = postprocess_nodes(model, head_nodes, fp32_nodes)
    kept_tensors = {t for node in model.graph.node if node.name in set(kept_nodes)
                    for t in node.output}
    initializers = {init.name for init in model.graph.initializer}
    kept_tensors |= {t for node in model.graph.node if node.name in set(float_layers)
                     for t in [*node.input, *node.output] if t and t not in initializers}
    derived = contract_ranges(model, input_contract_amax(input_dtype, preprocess))
    entries: Dict[str, float] = {}
    from_contract: Dict[str, float] = {}
    uncached: List[str] = []
    graph_tensors = float_tensors(model)
    for name in graph_tensors:
        if name in kept_tensors:
            uncached.append(name)
        elif name in derived:
            entries[name] = from_contract[name] = derived[name]
        elif name in measured:
            entries[name] = measured[name]
        else:
            raise JetyoloError(
                f"variant {variant!r}: tensor {name!r} has no calibrated range and does not follow "
                "from the input contract; re-export the bundle with `jetyolo export` and calibrate "
                "again (please report this model if it persists)"
            )
    return VariantCache(variant, entries, uncached, kept_nodes, from_contract, graph_tensors)


def apply_input_contract(ranges: Any, input_name: str, amax: float) -> None:
    """Replace the measured range of the network input by the contract's ``[0, amax]`` in both
    the cache's values and ONNX Runtime's ``TensorsData`` (which the Q/DQ model reads), so the
    two INT8 forms keep one input scale and bright pixels do not saturate."""
    np = require("numpy", "calibrate")
    ranges.values[input_name] = (0.0, float(amax))
    data = ranges.tensors_data.data.get(input_name)
    if data is not None:
        data.lowest = np.array(0.0, dtype=np.float32)
        data.highest = np.array(amax, dtype=np.float32)


def cache_variant_names(variants: Mapping[str, Mapping[str, Any]]) -> List[str]:
    """Variants an implicit-INT8 (cache) engine is built from: float32 graphs without Q/DQ."""
    return [name for name, variant in variants.items()
            if "quantization" not in variant and variant.get("float_dtype", "float32") == "float32"]


def cache_file(trt_version: str, variant: str) -> str:
    """``calibration/trt-10.3.0.cache`` for fp32 (the name older devices look for), else
    ``calibration/trt-10.3.0-uint8.cache``."""
    suffix = "" if variant == "fp32" else f"-{variant}"
    return f"calibration/trt-{trt_version}{suffix}.cache"


# ---- what TensorRT's implicit INT8 builds, simulated on ONNX Runtime ---------------------------
SIM_SUFFIX = "__cache_int8"


def build_cache_simulation(qdq_model: Any, entries: Mapping[str, float]) -> Any:
    """The Q/DQ model with an int8 Q/DQ pair (scale ``amax / 127``, zero point 0) on every tensor
    the cache lists (``entries``), for all its consumers.

    This is what the cache asks of TensorRT's implicit INT8: any tensor with a scale whose
    producer is not pinned to FP16 may be stored in INT8 (TensorRT picks per layer by speed, so
    quantizing all of them is the worst case the cache allows). Weights keep the Q/DQ model's
    per-channel int8 pairs (TensorRT quantizes Conv weights per output channel the same way).
    A tensor the Q/DQ model already quantizes reuses its pair, so the scales are the same.
    """
    onnx = require("onnx", "calibrate")
    helper, numpy_helper = onnx.helper, require("onnx.numpy_helper", "calibrate")
    np = require("numpy", "calibrate")
    model = onnx.ModelProto()
    model.CopyFrom(qdq_model)
    graph = model.graph
    quantizer_of = {n.input[0]: n for n in graph.node if n.op_type == "QuantizeLinear"}
    dequantizer_of = {n.input[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    outputs = {o.name for o in graph.output}
    replaced: Dict[str, str] = {}
    added = []
    for name, amax in entries.items():
        if name in outputs:
            continue
        existing = quantizer_of.get(name)
        if existing is not None and existing.output[0] in dequantizer_of:
            replaced[name] = dequantizer_of[existing.output[0]].output[0]
            continue
        scale = max(float(amax), 1e-30) / 127.0  # a zero range: any positive scale maps 0 to 0
        graph.initializer.extend([
            numpy_helper.from_array(np.array(scale, dtype=np.float32), f"{name}{SIM_SUFFIX}_scale"),
            numpy_helper.from_array(np.array(0, dtype=np.int8), f"{name}{SIM_SUFFIX}_zero"),
        ])
        quantized, restored = f"{name}{SIM_SUFFIX}_q", f"{name}{SIM_SUFFIX}"
        added += [
            helper.make_node("QuantizeLinear", [name, f"{name}{SIM_SUFFIX}_scale",
                             f"{name}{SIM_SUFFIX}_zero"], [quantized], name=f"{quantized}_node"),
            helper.make_node("DequantizeLinear", [quantized, f"{name}{SIM_SUFFIX}_scale",
                             f"{name}{SIM_SUFFIX}_zero"], [restored], name=f"{restored}_node"),
        ]
        replaced[name] = restored
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            continue  # the existing pairs read the float tensor they quantize
        for index, tensor in enumerate(node.input):
            if tensor in replaced:
                node.input[index] = replaced[tensor]
    graph.node.extend(added)
    from host.surgeon import export_model, import_graph

    return export_model(import_graph(model))  # toposort: the new pairs follow their producers
