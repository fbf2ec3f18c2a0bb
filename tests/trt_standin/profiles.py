"""What each supported TensorRT version's Python module offers, as read from its sources.

Sources (every fact below names one):
- [src X] NVIDIA/TensorRT at tag X: python/src/infer/pyCore.cpp (BuilderFlag,
  NetworkDefinitionCreationFlag, IBuilderConfig), pyFoundationalTypes.cpp (DataType), pyGraph.cpp
  (ILayer.precision), pyInt8.cpp (calibrators), python/packaging/.../tensorrt/__init__.py (nptype),
  include/NvInfer.h.
- [strings V] ``strings tensorrt_bindings/tensorrt.so`` of the PyPI wheel V
  (tensorrt-bindings 8.6.1, tensorrt-cu12-bindings 10.3.0 and 10.13.0.35,
  tensorrt-cu13-bindings 11.4.0.106), counts of whole-word hits.
- [parser X] onnx/onnx-tensorrt at branch X; [poly] tools/Polygraphy/tests/tools/test_inspect.py
  at NVIDIA/TensorRT v10.13.3, TACTIC_REPLAY_CASES.

8.6.2 (JetPack 6.0) has no tag of its own: its profile is read at v8.6.1 and the 8.6.1 wheel.
11.x is read at v11.1 and the 11.4.0.106 wheel. 8.5.2 has no PyPI wheel: sources only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

# [src 8.5.2] pyCore.cpp py::enum_<BuilderFlag>
_FLAGS_85 = (
    "FP16", "INT8", "DEBUG", "GPU_FALLBACK", "STRICT_TYPES", "REFIT", "DISABLE_TIMING_CACHE",
    "TF32", "SPARSE_WEIGHTS", "SAFETY_SCOPE", "OBEY_PRECISION_CONSTRAINTS",
    "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO", "REJECT_EMPTY_ALGORITHMS",
    "ENABLE_TACTIC_HEURISTIC",
)
# [src v8.6.1] adds VERSION_COMPATIBLE, EXCLUDE_LEAN_RUNTIME, FP8
_FLAGS_86 = (*_FLAGS_85, "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "FP8")
# [src v10.3.0] STRICT_TYPES and ENABLE_TACTIC_HEURISTIC are gone; BF16, INT4, ... added
_FLAGS_103 = (
    "FP16", "BF16", "INT8", "DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32",
    "SPARSE_WEIGHTS", "SAFETY_SCOPE", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS",
    "DIRECT_IO", "REJECT_EMPTY_ALGORITHMS", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "FP8",
    "ERROR_ON_TIMING_CACHE_MISS", "DISABLE_COMPILATION_CACHE", "WEIGHTLESS", "STRIP_PLAN",
    "REFIT_IDENTICAL", "WEIGHT_STREAMING", "INT4", "REFIT_INDIVIDUAL",
)
# [src v10.13.3] adds EDITABLE_TIMING_CACHE, STRICT_NANS, MONITOR_MEMORY, FP4, ...
_FLAGS_1013 = (*_FLAGS_103, "EDITABLE_TIMING_CACHE", "STRICT_NANS", "MONITOR_MEMORY", "FP4",
               "DISTRIBUTIVE_INDEPENDENCE")
# [src v11.1] no FP16, BF16, INT8, FP8, INT4, FP4, OBEY/PREFER_PRECISION_CONSTRAINTS; TF32 kept.
# [strings 11.4.0.106]: PREFER_PRECISION_CONSTRAINTS 0 hits, OBEY_PRECISION_CONSTRAINTS 0 hits.
_FLAGS_11 = (
    "DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "EDITABLE_TIMING_CACHE", "TF32",
    "SPARSE_WEIGHTS", "SAFETY_SCOPE", "DIRECT_IO", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME",
    "ERROR_ON_TIMING_CACHE_MISS", "DISABLE_COMPILATION_CACHE", "STRIP_PLAN", "REFIT_IDENTICAL",
    "WEIGHT_STREAMING", "REFIT_INDIVIDUAL", "STRICT_NANS", "MONITOR_MEMORY",
    "DISTRIBUTIVE_INDEPENDENCE",
)

# [src X] pyFoundationalTypes.cpp py::enum_<DataType>, member -> module-level alias
_TYPES_85 = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "INT32": "int32",
             "BOOL": "bool", "UINT8": "uint8"}
_TYPES_86 = {**_TYPES_85, "FP8": "fp8"}
_TYPES_10 = {**_TYPES_86, "BF16": "bfloat16", "INT64": "int64", "INT4": "int4"}
_TYPES_1013 = {**_TYPES_10, "FP4": "fp4", "E8M0": "e8m0"}

# [src X] pyInt8.cpp (8.5.2 .. v10.13.3); [src v11.1] has no pyInt8 calibrators and
# [strings 11.4.0.106] IInt8EntropyCalibrator2 / int8_calibrator: 0 hits.
_CALIBRATORS = ("IInt8EntropyCalibrator2", "IInt8EntropyCalibrator", "IInt8MinMaxCalibrator",
                "IInt8LegacyCalibrator")


@dataclass(frozen=True)
class Profile:
    version: str  # tensorrt.__version__ as the Jetson reports it
    jetpack: str
    builder_flags: Tuple[str, ...]
    # name -> int value. [src 8.5.2/v8.6.1] EXPLICIT_BATCH=0, EXPLICIT_PRECISION=1;
    # [src v10.3.0 NvInfer.h] kEXPLICIT_BATCH=0 (deprecated, ignored), kSTRONGLY_TYPED=1;
    # [src v11.1 NvInfer.h] kSTRONGLY_TYPED=0 "Deprecated in TensorRT 11.0. Strongly typed mode is
    # always enabled. This flag is retained for API compatibility but is ignored."
    creation_flags: Dict[str, int]
    data_types: Dict[str, str]
    calibrators: Tuple[str, ...]
    # [src 8.5.2] tensorrt/__init__.py nptype: mapping {..., bool: np.bool, ...} built on every
    # call (NVIDIA/TensorRT#2557, fixed in 8.5.3; later tags say np.bool_). JetPack 5.1 is Python
    # 3.8, whose newest numpy is 1.24.4, and numpy 1.24 removed np.bool: every nptype call raises
    # AttributeError there.
    nptype_raises: bool
    # [poly]: TensorRT < 8.7 names the parser's broadcast layer "(Unnamed Layer* 0) [Shuffle]",
    # >= 8.7 "ONNXTRT_Broadcast" ([parser 9.0-GA / release/10.0-GA] importerUtils.cpp
    # broadcastTensor: ctx->registerLayer(reshape, "ONNXTRT_Broadcast", nullptr); weightUtils.cpp
    # generateUniqueName: basename, then basename + "_" + shared counter on a clash).
    onnxtrt_helper_names: bool
    # [src 8.x] without EXPLICIT_BATCH the network is implicit-batch and [parser release/8.5-GA]
    # ModelImporter.cpp:519 refuses it ("only supports ... explicit batch dimension").
    implicit_batch_default: bool
    strongly_typed_always: bool  # [src v11.1 NvInfer.h], see creation_flags
    # [src v10.3.0] pyCore.cpp binds "progress_monitor" and IProgressMonitor;
    # [strings 8.6.1] IProgressMonitor: 0 hits, [strings 10.3.0]: 9 hits.
    progress_monitor: bool
    # [src X] pyGraph.cpp ILayer "precision" property; absent at [src v11.1].
    layer_precision: bool
    # [src 8.x/10.x] IBuilder.platform_has_fast_fp16; [strings 11.4.0.106]: 0 hits.
    platform_has_fast_fp16: bool

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def set_binding_shape(self) -> bool:
        """[src 8.5.2] pyCore.cpp:808 and [src v8.6.1] :840 bind IExecutionContext
        ``set_binding_shape`` (deprecated, pointing to ``set_input_shape``); [src v10.3.0],
        [src v10.13.3] and [src v11.1] pyCore.cpp do not. ``set_input_shape`` is bound at every
        tag (8.5.2:819, v8.6.1:851, v10.3.0:1050, v10.13.3:1332, v11.1:1309), as are
        ``create_optimization_profile``, ``IOptimizationProfile.set_shape``,
        ``add_optimization_profile`` and ``ICudaEngine.get_tensor_profile_shape``."""
        return self.major < 10

    @property
    def calibration_profile(self) -> bool:
        """[src 8.5.2] pyCore.cpp:1081, [src v8.6.1] :1200, [src v10.3.0] :1458 ("Deprecated in
        TensorRT 10.1. Superseded by explicit quantization.") and [src v10.13.3] :1796 bind
        IBuilderConfig ``set_calibration_profile``; [src v11.1] does not (no calibration)."""
        return bool(self.calibrators)

    @property
    def cache_version_int(self) -> int:
        """The calibration cache header number this version writes (NOTES.md; TRT-101303 for
        10.13.3)."""
        major, minor, patch = (int(part) for part in self.version.split(".")[:3])
        return major * (1000 if major < 10 else 10000) + minor * 100 + patch


PROFILES: Dict[str, Profile] = {
    "8.5.2": Profile("8.5.2.2", "5.1", _FLAGS_85, {"EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1},
                     _TYPES_85, _CALIBRATORS, True, False, True, False, False, True, True),
    "8.6.2": Profile("8.6.2.3", "6.0", _FLAGS_86, {"EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1},
                     _TYPES_86, _CALIBRATORS, False, False, True, False, False, True, True),
    "10.3": Profile("10.3.0.30", "6.1/6.2", _FLAGS_103, {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1},
                    _TYPES_10, _CALIBRATORS, False, True, False, False, True, True, True),
    "10.13": Profile("10.13.3.9", "7.0", _FLAGS_1013, {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1},
                     _TYPES_1013, _CALIBRATORS, False, True, False, False, True, True, True),
    "11": Profile("11.4.0.106", "(none yet)", _FLAGS_11, {"STRONGLY_TYPED": 0}, _TYPES_1013, (),
                  False, True, False, True, True, False, False),
}
