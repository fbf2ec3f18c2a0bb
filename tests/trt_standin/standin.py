"""A stand-in for the ``tensorrt`` and ``pycuda.driver`` modules, one profile per TensorRT version.

It offers exactly the names its profile cites (tests/trt_standin/profiles.py) and behaves as the
cited sources say where jetyolo depends on it: which flags and calibrators exist, how the ONNX
parser names its helper tensors, ``nptype``, the timing-cache return values, what INT8 from a
calibration cache does with a foreign or incomplete cache. It is a test double: the "engine" is
a JSON record of the build, and ``execute_async_v3`` runs the ONNX model on ONNX Runtime's CPU
FP32, so a result says that jetyolo's plumbing works, never how TensorRT computes.
"""

from __future__ import annotations

import functools
import importlib.machinery
import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .profiles import PROFILES, Profile

PLAN_MAGIC = "trt-standin-plan"
TIMING_MAGIC = b"trt-standin-timing:"
# ONNX element types -> TensorRT DataType member (onnx TensorProto enum values)
_ONNX_TYPES = {1: "FLOAT", 10: "HALF", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 2: "UINT8",
               16: "BF16"}
_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32,
          "INT64": np.int64, "BOOL": np.bool_, "UINT8": np.uint8}
# ONNX ops whose inputs TensorRT broadcasts to one rank ([parser] importerUtils.cpp
# broadcastTensors, called from elementwiseHelper)
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Equal", "Greater", "Less",
                "And", "Or", "Where", "PRelu"}
_LAYER_TYPES = {"Conv": "CONVOLUTION", "MatMul": "MATRIX_MULTIPLY", "Sigmoid": "ACTIVATION",
                "Relu": "ACTIVATION", "Softmax": "SOFTMAX", "Concat": "CONCATENATION",
                "MaxPool": "POOLING", "Resize": "RESIZE", "Slice": "SLICE", "Split": "SLICE",
                "Reshape": "SHUFFLE", "Transpose": "SHUFFLE", "Shape": "SHAPE",
                "Constant": "CONSTANT", "QuantizeLinear": "QUANTIZE",
                "DequantizeLinear": "DEQUANTIZE", "Cast": "CAST", "Gather": "GATHER",
                "TopK": "TOPK", "EfficientNMS_TRT": "PLUGIN_V2"}


@dataclass
class World:
    """The machine the stand-in pretends to be, and what tests may switch."""

    profile: Profile
    gpu_name: str = "Orin (stand-in)"
    compute_capability: Tuple[int, int] = (8, 7)
    dla_cores: int = 2
    free_bytes: int = 6 << 30
    total_bytes: int = 8 << 30
    timing_cache_mismatch: bool = False  # set_timing_cache returns False
    memory: Dict[int, np.ndarray] = field(default_factory=dict)
    next_address: int = 0x1000
    builds: List[Dict[str, Any]] = field(default_factory=list)  # one record per build
    log: List[str] = field(default_factory=list)  # what TensorRT would print


class _Member:
    """An enum member as pybind11 shows it: ``.name``, ``int()``, ``==`` by value."""

    def __init__(self, enum: str, name: str, value: int) -> None:
        self.enum, self.name, self.value = enum, name, value

    def __int__(self) -> int:
        return self.value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Member) and (other.enum, other.value) == (self.enum, self.value)

    def __hash__(self) -> int:
        return hash((self.enum, self.value))

    def __repr__(self) -> str:
        return f"{self.enum}.{self.name}"


def _enum(name: str, members: Sequence[str], values: Optional[Dict[str, int]] = None) -> type:
    table = {member: _Member(name, member, (values or {}).get(member, index))
             for index, member in enumerate(members)}
    return type(name, (), table)


# ---- the ONNX parser ----------------------------------------------------------------------------
@dataclass
class _Tensor:
    name: str
    dtype: Any
    shape: Tuple[int, ...]


class _Layer:
    def __init__(self, world: World, name: str, kind: Any, outputs: List[_Tensor]) -> None:
        self._world, self.name, self.type, self._outputs = world, name, kind, outputs
        self._precision: Any = None

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_output(self, index: int) -> _Tensor:
        return self._outputs[index]

    def _check_precision(self) -> None:
        if not self._world.profile.layer_precision:
            # [src v11.1] pyGraph.cpp binds no "precision" on ILayer
            raise AttributeError("'tensorrt.ILayer' object has no attribute 'precision'")

    @property
    def precision(self) -> Any:
        self._check_precision()
        return self._precision

    @precision.setter
    def precision(self, value: Any) -> None:
        self._check_precision()
        self._precision = value


class _Network:
    def __init__(self, trt: Any, world: World, flags: int) -> None:
        profile = world.profile
        self._trt, self._world = trt, world
        strongly_bit = profile.creation_flags.get("STRONGLY_TYPED")
        self.strongly_typed = profile.strongly_typed_always or (
            strongly_bit is not None and bool(flags & (1 << strongly_bit)))
        explicit_bit = profile.creation_flags.get("EXPLICIT_BATCH")
        explicit = explicit_bit is not None and bool(flags & (1 << explicit_bit))
        self.implicit_batch = profile.implicit_batch_default and not explicit
        self.inputs: List[_Tensor] = []
        self.outputs: List[_Tensor] = []
        self.layers: List[_Layer] = []
        self.onnx_path: Optional[str] = None

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, index: int) -> _Tensor:
        return self.inputs[index]

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_output(self, index: int) -> _Tensor:
        return self.outputs[index]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, index: int) -> _Layer:
        return self.layers[index]


@functools.lru_cache(maxsize=8)
def _load_graph(path: str, mtime_ns: int) -> Any:
    """The shape-inferred graph (cached: shape inference of a 10 MB model takes seconds)."""
    import onnx
    from onnx import shape_inference

    return shape_inference.infer_shapes(onnx.load(path)).graph


class _Parser:
    """Turns ONNX nodes into layers the way the cited parser names them."""

    def __init__(self, trt: Any, world: World, network: _Network) -> None:
        self._trt, self._world, self._network = trt, world, network
        self._errors: List[str] = []
        self._names: set = set()
        self._suffix = 0

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> str:
        return self._errors[index]

    def parse_from_file(self, path: str) -> bool:
        network = self._network
        if network.implicit_batch:
            self._errors.append(  # [parser release/8.5-GA] ModelImporter.cpp:519
                "This version of the ONNX parser only supports TensorRT INetworkDefinitions with "
                "an explicit batch dimension. Please ensure the network was created using the "
                "EXPLICIT_BATCH NetworkDefinitionCreationFlag.")
            return False
        try:
            graph = _load_graph(path, Path(path).stat().st_mtime_ns)
        except Exception as exc:
            self._errors.append(f"failed to parse onnx file {path}: {exc}")
            return False
        network.onnx_path = path
        self._import(graph)
        return True

    def _dtype(self, name: str) -> Any:
        if name == "INT64" and not hasattr(self._trt.DataType, "INT64"):
            # [parser 8.5-GA] onnx2trt_utils.cpp:361 convertDtype: INT64 -> kINT32 (TensorRT 8
            # has no INT64; the parser warns "Attempting to cast down to INT32", :377)
            name = "INT32"
        return getattr(self._trt.DataType, name)

    def _unique(self, basename: str) -> str:
        """[parser release/10.0-GA] weightUtils.cpp generateUniqueName."""
        candidate = basename
        while candidate in self._names:
            candidate = f"{basename}_{self._suffix}"
            self._suffix += 1
        self._names.add(candidate)
        return candidate

    def _helper_layer(self, kind: str, dtype: Any, shape: Tuple[int, ...]) -> _Layer:
        index = len(self._network.layers)
        if self._world.profile.onnxtrt_helper_names:
            name = self._unique("ONNXTRT_Broadcast")
        else:  # TensorRT's own name for a layer nobody named ([poly], 8.x)
            name = f"(Unnamed Layer* {index}) [{kind.title()}]"
        layer = _Layer(self._world, name, getattr(self._trt.LayerType, kind),
                       [_Tensor(f"{name}_output", dtype, shape)])
        self._network.layers.append(layer)
        return layer

    def _import(self, graph: Any) -> None:
        info: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
        for value in (*graph.input, *graph.value_info, *graph.output):
            kind = value.type.tensor_type
            # [parser 8.5-GA] onnx_utils.hpp:57 convertOnnxDims: a dim_param (or no value) is -1,
            # a runtime dimension
            info[value.name] = (_ONNX_TYPES.get(kind.elem_type, "FLOAT"),
                                tuple(int(dim.dim_value) if dim.HasField("dim_value") else -1
                                      for dim in kind.shape.dim))
        constants = {init.name: (_ONNX_TYPES.get(init.data_type, "FLOAT"), tuple(init.dims))
                     for init in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant":
                constants[node.output[0]] = info.get(node.output[0], ("FLOAT", ()))
        initializers = {init.name for init in graph.initializer}
        for value in graph.input:
            if value.name not in initializers:
                dtype, shape = info[value.name]
                self._network.inputs.append(_Tensor(value.name, self._dtype(dtype), shape))
        for node in graph.node:
            self._import_node(node, info, constants)
        by_name = {out.name: out for layer in self._network.layers for out in layer._outputs}
        self._network.outputs = [by_name[value.name] for value in graph.output]

    def _import_node(self, node: Any, info: Dict[str, Any], constants: Dict[str, Any]) -> None:
        if node.op_type == "Constant":
            return  # [parser] "No layer will be added for Constant nodes in ONNX" (registerLayer)
        if node.op_type in _ELEMENTWISE:
            ranks = [len((info.get(name) or constants.get(name) or ("", ()))[1])
                     for name in node.input]
            for name, rank in zip(node.input, ranks):
                if rank < max(ranks):  # broadcastTensor: a Shuffle adds the leading 1s
                    dtype = (info.get(name) or constants.get(name))[0]
                    self._helper_layer("SHUFFLE", self._dtype(dtype), (1,) * max(ranks))
        kind = _LAYER_TYPES.get(node.op_type, "ELEMENTWISE" if node.op_type in _ELEMENTWISE
                                else "UNARY")
        outputs = []
        for name in node.output:
            dtype, shape = info.get(name, ("FLOAT", ()))
            outputs.append(_Tensor(name, self._dtype(dtype), shape))
        name = self._unique(node.name) if self._world.profile.onnxtrt_helper_names else node.name
        self._network.layers.append(
            _Layer(self._world, name, getattr(self._trt.LayerType, kind), outputs))


# ---- builder, config, timing cache ---------------------------------------------------------------
class _TimingCache:
    def __init__(self, world: World, entries: int) -> None:
        self._world, self.entries = world, entries

    def serialize(self) -> bytes:
        return TIMING_MAGIC + f"{self._world.profile.version}:{self.entries}".encode()

    def combine(self, other: _TimingCache, ignore_mismatch: bool) -> bool:
        self.entries += other.entries
        return True


class _OptimizationProfile:
    """[src 8.5.2] pyCore.cpp opt_profile_set_shape: setDimensions for MIN, OPT and MAX, each
    failure a RuntimeError "Shape provided for min|opt|max is inconsistent with other shapes."
    (NvInferRuntime.h setDimensions: ranks equal, 0 <= min <= opt <= max)."""

    def __init__(self) -> None:
        self.shapes: Dict[str, Tuple[Tuple[int, ...], ...]] = {}

    def set_shape(self, input: str, min: Sequence[int], opt: Sequence[int],
                  max: Sequence[int]) -> None:
        low, mid, high = (tuple(int(dim) for dim in shape) for shape in (min, opt, max))
        for label, shape in (("opt", mid), ("max", high)):
            if len(shape) != len(low) or any(a > b for a, b in zip(low if label == "opt" else mid,
                                                                   shape)):
                raise RuntimeError(f"Shape provided for {label} is inconsistent with other "
                                   "shapes.")
        if any(dim < 0 for dim in low):
            raise RuntimeError("Shape provided for min is inconsistent with other shapes.")
        self.shapes[input] = (low, mid, high)

    def get_shape(self, input: str) -> List[Tuple[int, ...]]:
        return list(self.shapes.get(input, ()))


class _Config:
    def __init__(self, trt: Any, world: World) -> None:
        self._trt, self._world = trt, world
        # [src NvInfer.h 8.5.2 / v10.3.0 / v11.1] kTF32: "Enabled by default."
        self._flags = {trt.BuilderFlag.TF32}
        self._timing: Optional[_TimingCache] = None
        self.pool_limits: Dict[Any, int] = {}
        self.profiles: List[_OptimizationProfile] = []
        self.calibration_profile: Optional[_OptimizationProfile] = None
        self.default_device_type = trt.DeviceType.GPU
        self.DLA_core = -1
        if world.profile.calibrators:
            self.int8_calibrator = None
        if world.profile.progress_monitor:
            self.progress_monitor = None

    def __setattr__(self, name: str, value: Any) -> None:
        profile = self._world.profile if name in ("int8_calibrator", "progress_monitor") else None
        if profile is not None and not (profile.calibrators if name == "int8_calibrator"
                                        else profile.progress_monitor):
            raise AttributeError(f"'tensorrt.IBuilderConfig' object has no attribute '{name}'")
        object.__setattr__(self, name, value)

    def add_optimization_profile(self, profile: _OptimizationProfile) -> int:
        """[src NvInferRuntime.h 8.5.2] addOptimizationProfile: the profile's index."""
        self.profiles.append(profile)
        return len(self.profiles) - 1

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.profiles)

    def set_calibration_profile(self, profile: _OptimizationProfile) -> bool:
        if not self._world.profile.calibration_profile:  # see Profile.calibration_profile
            raise AttributeError("'tensorrt.IBuilderConfig' object has no attribute "
                                 "'set_calibration_profile'")
        self.calibration_profile = profile
        return True

    def set_flag(self, flag: Any) -> None:
        self._flags.add(flag)

    def clear_flag(self, flag: Any) -> None:
        self._flags.discard(flag)

    def get_flag(self, flag: Any) -> bool:
        return flag in self._flags

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.pool_limits[pool] = int(size)

    def create_timing_cache(self, data: bytes) -> Optional[_TimingCache]:
        """[src pyCore.cpp] returns IBuilderConfig::createTimingCache's pointer as is: nullptr,
        i.e. None, for a blob it cannot read (samples/utils/timingCache.cpp v10.3.0 checks
        ``timingCache != nullptr``; polygraphy loader.py guards ``if timing_cache:``)."""
        data = bytes(data)
        if not data:
            return _TimingCache(self._world, 0)
        if not data.startswith(TIMING_MAGIC):
            self._world.log.append("[E] timing cache: invalid or corrupt blob")
            return None
        return _TimingCache(self._world, int(data.rsplit(b":", 1)[1]))

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        """[src v10.3.0 pyCoreDoc.h] "returns A BOOL indicating whether the operation is done
        successfully"; a cache from another device fails unless ignore_mismatch. The argument is
        an ``ITimingCache&``: pybind11 refuses None with TypeError."""
        if not isinstance(cache, _TimingCache):
            raise TypeError("set_timing_cache(): incompatible function arguments")
        if self._world.timing_cache_mismatch and not ignore_mismatch:
            return False
        self._timing = cache
        return True

    def get_timing_cache(self) -> Optional[_TimingCache]:
        """[src v10.3.0 pyCoreDoc.h] "or None if no timing cache is set"."""
        return self._timing


class _Builder:
    def __init__(self, trt: Any, world: World, logger: Any) -> None:
        self._trt, self._world = trt, world
        if world.profile.platform_has_fast_fp16:
            self.platform_has_fast_fp16 = True
        self.num_DLA_cores = world.dla_cores

    def create_network(self, flags: int = 0) -> _Network:
        return _Network(self._trt, self._world, int(flags))

    def create_builder_config(self) -> _Config:
        return _Config(self._trt, self._world)

    def create_optimization_profile(self) -> _OptimizationProfile:
        return _OptimizationProfile()

    def build_serialized_network(self, network: _Network, config: _Config) -> Optional[bytes]:
        return _build(self._trt, self._world, network, config)


def _flag_names(trt: Any, config: _Config) -> List[str]:
    return sorted(name for name in trt.BuilderFlag.__dict__
                  if not name.startswith("_") and config.get_flag(getattr(trt.BuilderFlag, name)))


def _calibrated_tensors(trt: Any, world: World, network: _Network, config: _Config
                        ) -> Optional[Dict[str, Any]]:
    """What TensorRT 8.5-10.x does with ``int8_calibrator`` (NOTES.md, TensorRT calibration
    cache): a cache whose header is not this version's and the calibrator's algorithm is
    ignored and calibration asks ``get_batch`` for data; a tensor missing from a valid cache
    falls back to non-INT8 with a warning."""
    calibrator = config.int8_calibrator
    data = calibrator.read_calibration_cache()
    text = bytes(data).decode("utf-8", "replace") if data else ""
    lines = text.splitlines()
    algorithm = {"IInt8EntropyCalibrator2": "EntropyCalibration2",
                 "IInt8EntropyCalibrator": "EntropyCalibration",
                 "IInt8MinMaxCalibrator": "MinMaxCalibration"}[calibrator._standin_kind]
    header = f"TRT-{world.profile.cache_version_int}-{algorithm}"
    if not lines or lines[0].strip() != header:
        calibrator.get_batch_size()
        if calibrator.get_batch(["images"]) is None:
            world.log.append("[E] Calibration failure occurred with no scaling factors detected")
            return None
    scales = {line.rpartition(": ")[0] for line in lines[1:] if ": " in line}
    float_types = {trt.DataType.FLOAT, trt.DataType.HALF}
    activations = [tensor.name for tensor in network.inputs if tensor.dtype in float_types]
    activations += [out.name for layer in network.layers if layer.type.name != "CONSTANT"
                    for out in layer._outputs if out.dtype in float_types]
    fallback = [name for name in activations if name not in scales]
    for name in fallback:
        world.log.append(f"[W] Missing scale and zero-point for tensor {name}, expect fall back "
                         "to non-int8 implementation for any layer consuming or producing given "
                         "tensor")
    return {"int8": [name for name in activations if name in scales], "fallback": fallback}


def _checked_profiles(trt: Any, world: World, network: _Network, config: _Config
                      ) -> Optional[Dict[str, List[List[int]]]]:
    """Profile 0 of the network's inputs, or None (build refused) as TensorRT refuses:
    - a runtime dimension (-1) and no profile: "Network has dynamic or shape inputs, but no
      optimization profile has been defined." then "Network validation failed."
      (TensorRT's log as quoted in NVIDIA/TensorRT#768, #1116, onnx/onnx-tensorrt#518);
    - a profile breaking NvInferRuntime.h setDimensions (3): "if networkDims.d[i] != -1, then
      minDims.d[i] == optDims.d[i] == maxDims.d[i] == networkDims.d[i]" (the stand-in's words);
    - a runtime dimension the profile does not cover (the stand-in's words);
    - INT8 calibration of a network with runtime dims and no calibration profile: NvInfer.h
      setCalibrationProfile (8.5.2, v10.3.0) "must be set if int8 calibration is used to set
      scales for a network with runtime dimensions". What TensorRT does when it is missing is
      not written down; the stand-in refuses (the stricter reading)."""
    dynamic = [tensor for tensor in network.inputs if any(dim < 0 for dim in tensor.shape)]
    if dynamic and not config.profiles:
        world.log += ["[E] Network has dynamic or shape inputs, but no optimization profile has "
                      "been defined.", "[E] Network validation failed."]
        return None
    shapes = config.profiles[0].shapes if config.profiles else {}
    for tensor in network.inputs:
        limits = shapes.get(tensor.name)
        if limits is None:
            if tensor in dynamic:
                world.log.append(f"[E] (stand-in) profile 0 has no shape for {tensor.name}")
                return None
            continue
        if any(len(limit) != len(tensor.shape) for limit in limits) or any(
                dim >= 0 and not limits[0][i] == limits[2][i] == dim
                for i, dim in enumerate(tensor.shape)):
            world.log.append(f"[E] (stand-in) profile 0 for {tensor.name} {list(limits)} does "
                             f"not match network definition {list(tensor.shape)}")
            return None
    calibrating = config.get_flag(getattr(trt.BuilderFlag, "INT8", None)) and getattr(
        config, "int8_calibrator", None) is not None
    if dynamic and calibrating and config.calibration_profile is None:
        world.log.append("[E] (stand-in) calibration profile not set for a network with runtime "
                         "dimensions (NvInfer.h setCalibrationProfile)")
        return None
    return {name: [list(limit) for limit in limits] for name, limits in shapes.items()}


def _build(trt: Any, world: World, network: _Network, config: _Config) -> Optional[bytes]:
    if network.onnx_path is None:
        world.log.append("[E] network has no layers")
        return None
    profiles = _checked_profiles(trt, world, network, config)
    if profiles is None:
        return None
    int8 = None
    if world.profile.calibrators and config.int8_calibrator is not None and \
            config.get_flag(trt.BuilderFlag.INT8):
        int8 = _calibrated_tensors(trt, world, network, config)
        if int8 is None:
            return None
    layer_precisions = {layer.name: layer._precision.name for layer in network.layers
                        if layer._precision is not None}
    record = {
        "magic": PLAN_MAGIC, "version": world.profile.version, "onnx": network.onnx_path,
        "flags": _flag_names(trt, config), "strongly_typed": network.strongly_typed,
        "int8": int8, "layer_precisions": layer_precisions,
        "device_type": config.default_device_type.name, "dla_core": config.DLA_core,
        "profiles": profiles,
        "calibration_profile": config.calibration_profile.shapes
        if config.calibration_profile is not None else None,
        "io": [[tensor.name, "INPUT", tensor.dtype.name, list(tensor.shape)]
               for tensor in network.inputs]
        + [[tensor.name, "OUTPUT", tensor.dtype.name, list(tensor.shape)]
           for tensor in network.outputs],
    }
    timing = config.get_timing_cache()
    if timing is not None:
        timing.entries += len(network.layers)
    world.builds.append(record)
    return json.dumps(record).encode()


# ---- runtime -------------------------------------------------------------------------------------
class _Engine:
    def __init__(self, trt: Any, world: World, record: Dict[str, Any]) -> None:
        self._trt, self._world, self.record = trt, world, record
        self._io = {name: (mode, dtype, tuple(shape)) for name, mode, dtype, shape in record["io"]}
        self._names = [name for name, *_ in record["io"]]

    @property
    def num_io_tensors(self) -> int:
        return len(self._names)

    def get_tensor_name(self, index: int) -> str:
        return self._names[index]

    def get_tensor_mode(self, name: str) -> Any:
        return getattr(self._trt.TensorIOMode, self._io[name][0])

    def get_tensor_dtype(self, name: str) -> Any:
        return getattr(self._trt.DataType, self._io[name][1])

    def get_tensor_shape(self, name: str) -> Tuple[int, ...]:
        """[src NvInferRuntime.h] getTensorShape: runtime dimensions are -1 in the engine."""
        return self._io[name][2]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> List[Tuple[int, ...]]:
        """[src 8.5.2] pyCore.cpp get_tensor_profile_shape: [min, opt, max] of profile N."""
        limits = self.record.get("profiles", {}).get(name) if profile_index == 0 else None
        if limits is None:
            raise RuntimeError(f"no profile {profile_index} shape for {name}")
        return [tuple(limit) for limit in limits]

    def create_execution_context(self) -> _Context:
        return _Context(self)


class _Context:
    def __init__(self, engine: _Engine) -> None:
        self._engine = engine
        self._addresses: Dict[str, int] = {}
        self._session: Any = None
        self._shapes = {name: shape for name, (mode, _, shape) in engine._io.items()
                        if mode == "INPUT"}
        if engine._world.profile.set_binding_shape:  # see Profile.set_binding_shape
            self.set_binding_shape = self._set_binding_shape

    def set_tensor_address(self, name: str, address: int) -> bool:
        self._addresses[name] = int(address)
        return True

    def set_input_shape(self, name: str, shape: Sequence[int]) -> bool:
        """[src v10.3.0 NvInferRuntime.h] setInputShape: "false if the provided name does not
        map to an input tensor, or if some other error occurred"; "Each dimension must agree
        with the network dimension unless the latter was -1"; a shape outside profile 0 is an
        error (TensorRT logs it; the stand-in's words)."""
        network = self._shapes.get(name) and self._engine._io[name][2]
        wanted = tuple(int(dim) for dim in shape)
        if not network or len(wanted) != len(network):
            return False
        limits = self._engine.record.get("profiles", {}).get(name)
        for index, dim in enumerate(wanted):
            if network[index] >= 0 and dim != network[index]:
                return False
            if network[index] < 0 and not limits[0][index] <= dim <= limits[2][index]:
                self._engine._world.log.append(
                    f"[E] (stand-in) {name} {list(wanted)} is outside profile 0 {limits}")
                return False
        self._shapes[name] = wanted
        return True

    def _set_binding_shape(self, binding: int, shape: Sequence[int]) -> bool:
        return self.set_input_shape(self._engine._names[binding], shape)

    def get_tensor_shape(self, name: str) -> Tuple[int, ...]:
        """Inputs: as set (-1 until set_input_shape). Outputs: the engine's, a -1 in dim 0 taken
        from the inputs' dim 0 (the batch; jetyolo's graphs have no other runtime output dim)."""
        if name in self._shapes:
            return self._shapes[name]
        shape = self._engine._io[name][2]
        rows = {value[0] for value in self._shapes.values() if value}
        if shape and shape[0] < 0 and len(rows) == 1:
            shape = (next(iter(rows)), *shape[1:])
        return tuple(shape)

    def execute_async_v3(self, stream_handle: int) -> bool:
        """Runs the ONNX model on ONNX Runtime (CPU, FP32) with the bound device buffers."""
        import onnxruntime as ort

        engine, memory = self._engine, self._engine._world.memory
        unset = [name for name, shape in self._shapes.items() if any(dim < 0 for dim in shape)]
        if unset:  # [src NvInferRuntime.h] getTensorShape: -1 "if setInputShape() has not yet
            # been called"; enqueueV3 returns false ("True if the kernels were enqueued")
            engine._world.log.append(f"[E] (stand-in) enqueueV3: input shape of {unset} not set")
            return False
        if self._session is None:
            self._session = ort.InferenceSession(engine.record["onnx"],
                                                 providers=["CPUExecutionProvider"])
        feed = {}
        for name, (mode, dtype, _) in engine._io.items():
            if mode == "INPUT":
                shape = self._shapes[name]
                raw = memory[self._addresses[name]]
                feed[name] = raw[: int(np.prod(shape)) * np.dtype(_NUMPY[dtype]).itemsize] \
                    .view(_NUMPY[dtype]).reshape(shape)
        outputs = self._session.run(None, feed)
        for meta, value in zip(self._session.get_outputs(), outputs):
            flat = np.ascontiguousarray(value).view(np.uint8).reshape(-1)
            memory[self._addresses[meta.name]][: flat.size] = flat
        return True


class _Runtime:
    def __init__(self, trt: Any, world: World, logger: Any) -> None:
        self._trt, self._world = trt, world

    def deserialize_cuda_engine(self, data: bytes) -> Optional[_Engine]:
        """None for bytes it cannot read or a plan of another version (TensorRT logs a
        serialization error and returns nullptr)."""
        try:
            record = json.loads(bytes(data).decode())
        except (UnicodeDecodeError, ValueError):
            self._world.log.append("[E] deserializeCudaEngine: invalid plan")
            return None
        expected = (PLAN_MAGIC, self._world.profile.version)
        if (record.get("magic"), record.get("version")) != expected:
            self._world.log.append("[E] plan was built by another TensorRT version")
            return None
        return _Engine(self._trt, self._world, record)


# ---- the modules ---------------------------------------------------------------------------------
def make_tensorrt(world: World) -> types.ModuleType:
    profile = world.profile
    trt = types.ModuleType("tensorrt")
    trt.__version__ = profile.version  # type: ignore[attr-defined]
    trt.__file__ = str(Path(__file__))
    trt.BuilderFlag = _enum("BuilderFlag", profile.builder_flags)  # type: ignore[attr-defined]
    trt.NetworkDefinitionCreationFlag = _enum(  # type: ignore[attr-defined]
        "NetworkDefinitionCreationFlag", list(profile.creation_flags), profile.creation_flags)
    trt.DataType = _enum("DataType", list(profile.data_types))  # type: ignore[attr-defined]
    for member, alias in profile.data_types.items():
        setattr(trt, alias, getattr(trt.DataType, member))  # type: ignore[attr-defined]
    trt.LayerType = _enum("LayerType", sorted({*_LAYER_TYPES.values(), "ELEMENTWISE", "UNARY"}))
    trt.TensorIOMode = _enum("TensorIOMode", ("NONE", "INPUT", "OUTPUT"))
    trt.MemoryPoolType = _enum("MemoryPoolType", ("WORKSPACE", "DLA_MANAGED_SRAM"))
    trt.DeviceType = _enum("DeviceType", ("GPU", "DLA"))

    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, severity: int = 2) -> None:
            self.severity = severity

    trt.Logger = Logger  # type: ignore[attr-defined]
    trt.init_libnvinfer_plugins = lambda logger, namespace: True  # type: ignore[attr-defined]
    trt.Builder = lambda logger: _Builder(trt, world, logger)  # type: ignore[attr-defined]
    trt.OnnxParser = lambda network, logger: _Parser(trt, world, network)  # type: ignore
    trt.Runtime = lambda logger: _Runtime(trt, world, logger)  # type: ignore[attr-defined]
    for name in profile.calibrators:
        setattr(trt, name, type(name, (), {"__init__": lambda self: None, "_standin_kind": name}))
    if profile.progress_monitor:
        trt.IProgressMonitor = type(  # type: ignore[attr-defined]
            "IProgressMonitor", (), {"__init__": lambda self: None})

    def nptype(trt_type: Any) -> Any:
        if profile.nptype_raises:  # see Profile.nptype_raises
            raise AttributeError("module 'numpy' has no attribute 'bool'.")
        mapping = {trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16,  # type: ignore
                   trt.DataType.INT8: np.int8, trt.DataType.INT32: np.int32,  # type: ignore
                   trt.DataType.BOOL: np.bool_, trt.DataType.UINT8: np.uint8}  # type: ignore
        if trt_type in mapping:
            return mapping[trt_type]
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")

    trt.nptype = nptype  # type: ignore[attr-defined]
    return trt


def make_pycuda(world: World) -> Tuple[types.ModuleType, types.ModuleType]:
    cuda = types.ModuleType("pycuda.driver")

    class Error(Exception):
        pass

    class Allocation:
        def __init__(self, size: int) -> None:
            self.address = world.next_address
            world.next_address += max(size, 1) + 256
            world.memory[self.address] = np.zeros(max(size, 1), np.uint8)

        def __int__(self) -> int:
            return self.address

        def free(self) -> None:
            world.memory.pop(self.address, None)

    class Context:
        def push(self) -> None: ...
        def pop(self) -> None: ...
        def detach(self) -> None: ...

    class Device:
        def __init__(self, index: int) -> None:
            if index != 0:
                raise Error(f"cuDeviceGet failed: invalid device ordinal {index}")

        def name(self) -> str:
            return world.gpu_name

        def compute_capability(self) -> Tuple[int, int]:
            return world.compute_capability

        def retain_primary_context(self) -> Context:
            return Context()

    class Stream:
        handle = 1

        def synchronize(self) -> None: ...

    def htod(device: Allocation, host: np.ndarray, stream: Any = None) -> None:
        flat = np.ascontiguousarray(host).view(np.uint8).reshape(-1)
        world.memory[int(device)][: flat.size] = flat

    def dtoh(host: np.ndarray, device: Allocation, stream: Any = None) -> None:
        flat = host.reshape(-1).view(np.uint8)
        flat[:] = world.memory[int(device)][: flat.size]

    cuda.Error = Error  # type: ignore[attr-defined]
    cuda.init = lambda: None  # type: ignore[attr-defined]
    cuda.Device = Device  # type: ignore[attr-defined]
    cuda.Stream = Stream  # type: ignore[attr-defined]
    cuda.mem_alloc = Allocation  # type: ignore[attr-defined]
    cuda.mem_get_info = lambda: (world.free_bytes, world.total_bytes)  # type: ignore
    cuda.memcpy_htod_async = htod  # type: ignore[attr-defined]
    cuda.memcpy_dtoh_async = dtoh  # type: ignore[attr-defined]
    cuda.pagelocked_empty = lambda shape, dtype: np.empty(shape, dtype)  # type: ignore
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = cuda  # type: ignore[attr-defined]
    return pycuda, cuda


def install(monkeypatch: Any, version: str, **world_options: Any) -> World:
    """Put the stand-in for TensorRT ``version`` (a PROFILES key) into ``sys.modules``."""
    world = World(PROFILES[version], **world_options)
    pycuda, cuda = make_pycuda(world)
    trt = make_tensorrt(world)
    for module in (trt, pycuda, cuda):  # importlib.util.find_spec reads it
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", cuda)
    monkeypatch.setattr("device.backends.tensorrt_util._LOGGER", None)
    return world
