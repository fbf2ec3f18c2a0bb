"""TensorRT: engine build (ONNX parser + builder) and the runtime backend.

The only module that calls TensorRT and CUDA. Every decision (which flags, which cache, reuse or
rebuild) is made in ``device.engine`` and ``device.calibcache`` and tested there; this module
carries them out with the TensorRT 8.5-10.x Python API:

- build: ``trt.Builder`` -> ``create_network`` (EXPLICIT_BATCH on 8.x, STRONGLY_TYPED where the
  recipe says) -> ``OnnxParser.parse_from_file`` -> ``IBuilderConfig`` (workspace pool limit,
  precision flags, ``int8_calibrator``, layer precisions, timing cache, DLA) ->
  ``build_serialized_network``. INT8 from a cache uses a calibrator that only hands TensorRT the
  cache bytes: ``get_batch`` returns None, and if TensorRT asks for a batch at all (it rejected
  the cache) the engine is refused.
- run: ``Runtime.deserialize_cuda_engine`` -> one execution context, device buffers bound once
  with ``set_tensor_address``, page-locked host buffers, one stream, ``execute_async_v3`` between
  async H2D and D2H copies.

CUDA graphs are not used: pycuda documents no stream-capture API, and capturing through a second
binding (cuda-python) would mean two CUDA wrappers on the device for a gain that is the kernel
launch overhead only. Measure it first with ``trtexec --loadEngine=X.plan --useCudaGraph`` against
the same command without the flag (docs/tensorrt.md); add capture if it pays on a Jetson.

TensorRT and pycuda come from JetPack (apt ``python3-libnvinfer``; pycuda built on the device)
and are imported lazily, so this module imports on any machine.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from device.backends.base import Backend, TensorSpec
from device.engine import (
    BuildPlan,
    BuildRequest,
    DeviceFacts,
    LayerRecord,
    TensorRTOps,
    ensure_engine,
    parse_meminfo,
    read_l4t_release,
)
from device.errors import JetyoloError
from device.files import PRIVATE_FILE, atomic_write_bytes

LOG = logging.getLogger(__name__)
TENSORRT_HINT = (
    "TensorRT's Python bindings come with JetPack: `sudo apt install python3-libnvinfer` "
    "(part of `nvidia-jetpack`), used from a venv made with "
    "`python3 -m venv --system-site-packages`; `jetyolo doctor` checks the setup"
)
PYCUDA_HINT = (
    "build pycuda on the device: `export PATH=/usr/local/cuda/bin:$PATH "
    "CPATH=/usr/local/cuda/include; pip install pycuda` (needs python3-dev and nvcc from JetPack)"
)
# TensorRT DataType member name -> numpy dtype. ``trt.nptype`` is not used: TensorRT 8.5.2's
# (JetPack 5.1) builds its table with ``np.bool``, which numpy 1.24 removed, so every call raises
# AttributeError there (NVIDIA/TensorRT#2557, fixed in 8.5.3).
NUMPY_DTYPES = {
    "FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32,
    "INT64": np.int64, "BOOL": np.bool_, "UINT8": np.uint8,
}
HEARTBEAT_SECONDS = 30.0
PROGRESS_SECONDS = 5.0
_LOGGER: Any = None


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise JetyoloError(f"TensorRT is not installed ({exc}); {TENSORRT_HINT}") from exc
    return tensorrt


def import_pycuda() -> Any:
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise JetyoloError(f"pycuda is not importable ({exc}); {PYCUDA_HINT}") from exc
    return cuda


def trt_logger(trt: Any) -> Any:
    """One TensorRT logger per process (TensorRT prints its warnings and errors to stderr)."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(_LOGGER, "")  # EfficientNMS_TRT for the "nms" variant
    return _LOGGER


def _cuda_init(cuda: Any, index: int = 0) -> Any:
    try:
        cuda.init()
        return cuda.Device(index)
    except cuda.Error as exc:
        raise JetyoloError(
            f"CUDA cannot start ({exc}); check the driver and that this user may open the GPU "
            "(groups video and render on a Jetson); run `jetyolo doctor`"
        ) from exc


# ---- build -------------------------------------------------------------------------------------
class TensorRTBuildOps(TensorRTOps):
    """``device.engine.TensorRTOps`` carried out with TensorRT and pycuda."""

    def device_facts(self) -> DeviceFacts:
        return device_facts()

    def network_layers(
        self, onnx_path: Path, strongly_typed: bool
    ) -> Tuple[List[Tuple[str, str]], List[LayerRecord]]:
        trt = import_tensorrt()
        major = int(trt.__version__.split(".")[0])
        builder, network, parser = parse_onnx(trt, onnx_path, major < 10, strongly_typed)
        records = layer_records(network)
        del network, parser, builder  # the network first: the builder made it
        return records

    def build_engine(self, onnx_path: Path, build: BuildPlan, **options: Any) -> bytes:
        return build_engine(onnx_path, build, **options)


def device_facts() -> DeviceFacts:
    """TensorRT version, GPU, L4T release and the memory the builder may use. On a Jetson the
    GPU allocates from system RAM, so free memory is /proc/meminfo's MemAvailable (page cache
    included, which the kernel gives back); elsewhere it is CUDA's free device memory."""
    trt = import_tensorrt()
    cuda = import_pycuda()
    device = _cuda_init(cuda)
    major, minor = device.compute_capability()
    l4t = read_l4t_release()
    if l4t is not None:
        free, total = parse_meminfo(Path("/proc/meminfo").read_text())
    else:
        context = device.retain_primary_context()
        context.push()
        try:
            free, total = cuda.mem_get_info()
        finally:
            context.pop()
            context.detach()
    return DeviceFacts(trt.__version__, device.name(), f"{major}.{minor}", l4t, free, total)


def parse_onnx(
    trt: Any, onnx_path: Path, explicit_batch: bool, strongly_typed: bool
) -> Tuple[Any, Any, Any]:
    """(builder, network, parser); the parser must outlive the build (it owns the weights)."""
    builder = trt.Builder(trt_logger(trt))
    flags = 0
    if explicit_batch:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger(trt))
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(index)) for index in range(parser.num_errors)]
        raise JetyoloError(
            f"TensorRT's ONNX parser rejects {onnx_path}: {errors[0] if errors else 'no detail'}"
            + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
            + "; re-export the bundle with `jetyolo export` (opset 17+) or update JetPack"
        )
    return builder, network, parser


def layer_records(network: Any) -> Tuple[List[Tuple[str, str]], List[LayerRecord]]:
    inputs = []
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        inputs.append((tensor.name, tensor.dtype.name))
    layers = []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        outputs = tuple(
            (layer.get_output(i).name, layer.get_output(i).dtype.name)
            for i in range(layer.num_outputs)
        )
        layers.append(LayerRecord(layer.name, layer.type.name, outputs))
    return inputs, layers


def make_cache_calibrator(trt: Any, cache: bytes) -> Any:
    """A calibrator of the cache's own algorithm that returns the cache and never calibrates."""
    from device.calibcache import parse_cache

    algorithm = parse_cache(cache.decode("utf-8"), "calibration cache").algorithm
    bases = {
        "EntropyCalibration2": trt.IInt8EntropyCalibrator2,
        "EntropyCalibration": trt.IInt8EntropyCalibrator,
        "MinMaxCalibration": trt.IInt8MinMaxCalibrator,
    }
    base = bases[algorithm]

    class CacheOnlyCalibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)  # pybind11 trampolines crash without this
            self.batches_requested = 0

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: Sequence[str]) -> None:
            self.batches_requested += 1  # TensorRT rejected the cache; refuse the engine
            return None

        def read_calibration_cache(self) -> bytes:
            return cache

        def write_calibration_cache(self, data: Any) -> None:
            return None

    return CacheOnlyCalibrator()


def make_progress_monitor(trt: Any, log: Callable[[str], None]) -> Any:
    """TensorRT >= 10's build progress as log lines: top-level phases, and at most one progress
    line per PROGRESS_SECONDS. TensorRT calls it from several threads."""

    class BuildProgress(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._steps: Dict[str, int] = {}
            self._last = 0.0

        def phase_start(self, phase_name: str, parent_phase: Optional[str], num_steps: int) -> None:
            with self._lock:
                self._steps[phase_name] = num_steps
            if parent_phase is None:
                log(f"engine: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            now = time.monotonic()
            with self._lock:
                total = self._steps.get(phase_name, 0)
                due = now - self._last >= PROGRESS_SECONDS and total >= 10
                if due:
                    self._last = now
            if due:
                log(f"engine: {phase_name} {step + 1}/{total}")
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                self._steps.pop(phase_name, None)

    return BuildProgress()


class Heartbeat:
    """For TensorRT without IProgressMonitor: an elapsed-time line every HEARTBEAT_SECONDS."""

    def __init__(self, log: Callable[[str], None], every: float = HEARTBEAT_SECONDS) -> None:
        self._log, self._every = log, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trt-build-heartbeat", daemon=True)
        self._started = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            elapsed = int(time.monotonic() - self._started)
            self._log(f"engine: still building ({elapsed // 60} min {elapsed % 60:02d} s)")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _set_layer_precisions(trt: Any, network: Any, fp16_layers: Sequence[str]) -> int:
    wanted, done = set(fp16_layers), 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.name in wanted:
            layer.precision = trt.float16
            done += 1
    return done


def _load_timing_cache(config: Any, path: Optional[Path], log: Callable[[str], None]) -> None:
    """Attach the timing cache at ``path`` (or an empty one). TensorRT answers a blob it cannot
    read with None (``createTimingCache`` returns nullptr; NVIDIA's samples/utils/timingCache.cpp
    checks for it) and a cache from another device with ``set_timing_cache`` -> False: both cost
    only build time, so the build goes on with an empty cache, or with none."""
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data) if data else None
    if data and (cache is None or not config.set_timing_cache(cache, ignore_mismatch=False)):
        log(f"engine: timing cache {path} unusable (corrupt, or from another device); "
            "starting an empty one")
        cache = None
    if cache is None:
        cache = config.create_timing_cache(b"")
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            log("engine: TensorRT made no timing cache; building without one")


def _configure_dla(trt: Any, builder: Any, config: Any, dla_core: int) -> None:
    cores = int(getattr(builder, "num_DLA_cores", 0))
    if dla_core >= cores:
        raise JetyoloError(
            f"--dla {dla_core}: this device has {cores} DLA core(s); DLA exists on Xavier and "
            "Orin AGX/NX, not on Orin Nano or Jetson Nano"
        )
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = dla_core
    config.set_flag(trt.BuilderFlag.GPU_FALLBACK)


def build_engine(
    onnx_path: Path,
    build: BuildPlan,
    calib_cache: Optional[bytes] = None,
    head_fp16_layers: Sequence[str] = (),
    workspace_bytes: int = 1 << 30,
    timing_cache_path: Optional[Path] = None,
    dla_core: Optional[int] = None,
    log_progress: Callable[[str], None] = print,
) -> bytes:
    """Serialized engine for ``onnx_path`` following ``build`` (see ``device.engine.plan_build``).
    Writes the updated timing cache back atomically."""
    trt = import_tensorrt()
    log_progress(f"engine: parsing {onnx_path.name}")
    builder, network, parser = parse_onnx(
        trt, onnx_path, build.explicit_batch_flag, build.strongly_typed
    )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    for flag in build.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in build.cleared_flags:
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    calibrator = None
    if build.calibrator_from_cache:
        if not calib_cache:
            raise JetyoloError("INT8 from a calibration cache needs the cache; none was given")
        calibrator = make_cache_calibrator(trt, calib_cache)
        config.int8_calibrator = calibrator
    if build.keep_fp16_layers and head_fp16_layers:
        count = _set_layer_precisions(trt, network, head_fp16_layers)
        log_progress(f"engine: {count} head layer(s) constrained to FP16")
    if dla_core is not None:
        _configure_dla(trt, builder, config, dla_core)
    _load_timing_cache(config, timing_cache_path, log_progress)
    monitor = None
    if hasattr(trt, "IProgressMonitor"):
        monitor = make_progress_monitor(trt, log_progress)
        config.progress_monitor = monitor
    log_progress("engine: building (minutes on a Jetson; the timing cache shortens rebuilds)")
    with Heartbeat(log_progress, HEARTBEAT_SECONDS if monitor is None else 4 * HEARTBEAT_SECONDS):
        serialized = builder.build_serialized_network(network, config)
    _check_build(trt, serialized, calibrator)
    if timing_cache_path is not None:  # the builder added this build's tactic timings
        _save_timing_cache(config, timing_cache_path, log_progress)
    plan = bytes(serialized)
    # The parser owns the weights the builder read; release network, parser, builder in order.
    del serialized, config, network, parser, builder
    return plan


def _check_build(trt: Any, serialized: Any, calibrator: Any) -> None:
    if calibrator is not None and calibrator.batches_requested:
        raise JetyoloError(
            "TensorRT did not accept the calibration cache and asked for calibration images; "
            "refusing the engine (it would be calibrated on nothing): regenerate the cache with "
            "`jetyolo calibrate BUNDLE --trt-version " + trt.__version__ + "`"
        )
    if serialized is None:
        raise JetyoloError(
            "TensorRT could not build the engine (see its log above); try --workspace with more "
            "MiB, free memory, or --precision fp16"
        )


def _save_timing_cache(config: Any, path: Path, log: Callable[[str], None]) -> None:
    """A timing cache that cannot be written costs the next build time, not this engine."""
    cache = config.get_timing_cache()  # None when none could be attached (see _load_timing_cache)
    if cache is None:
        return
    try:
        atomic_write_bytes(path, bytes(cache.serialize()), PRIVATE_FILE)
    except OSError as exc:
        log(f"engine: timing cache {path} not saved ({exc.strerror or exc}); the engine is kept")


# ---- runtime -----------------------------------------------------------------------------------
def numpy_dtype(trt_dtype: Any, tensor: str) -> np.dtype:
    """The numpy dtype of a TensorRT ``DataType`` (see NUMPY_DTYPES)."""
    name = str(getattr(trt_dtype, "name", trt_dtype))
    if name not in NUMPY_DTYPES:
        raise JetyoloError(
            f"engine tensor {tensor!r} has TensorRT type {name}, which jetyolo cannot feed or "
            f"read (it handles {', '.join(NUMPY_DTYPES)}); re-export the bundle"
        )
    return np.dtype(NUMPY_DTYPES[name])


class TensorRTBackend(Backend):
    """Runs a serialized plan. Activate, infer and deactivate on one thread (the pipeline's
    inference thread): the CUDA context is pushed there in ``activate`` and popped in
    ``deactivate``."""

    kind = "tensorrt"

    def __init__(self, plan_path: Path, device: int = 0) -> None:
        super().__init__(f"tensorrt:{Path(plan_path).name}")
        self.plan_path = Path(plan_path)
        self.device = device
        self._cuda: Any = None
        self._context_stack: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._specs: Dict[str, TensorSpec] = {}
        self._inputs: List[str] = []
        self._device_buffers: Dict[str, Any] = {}
        self._pinned: Dict[int, np.ndarray] = {}  # data pointer -> page-locked array we made
        self._staging: Dict[str, np.ndarray] = {}

    def activate_impl(self) -> None:
        trt = import_tensorrt()
        self._cuda = cuda = import_pycuda()
        if not self.plan_path.is_file():
            raise JetyoloError(f"engine {self.plan_path} does not exist; run `jetyolo build`")
        device = _cuda_init(cuda, self.device)
        self._context_stack = device.retain_primary_context()
        self._context_stack.push()
        try:
            self._load(trt, cuda)
        except BaseException as exc:
            self.deactivate_impl()
            if isinstance(exc, (OSError, cuda.Error)):  # unreadable plan, no GPU memory left
                raise JetyoloError(
                    f"TensorRT engine {self.plan_path} cannot be loaded ({exc}); check that this "
                    "user may read it and that other processes leave GPU memory free"
                ) from exc
            raise

    def _load(self, trt: Any, cuda: Any) -> None:
        self._runtime = trt.Runtime(trt_logger(trt))
        self._engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self._engine is None:
            raise JetyoloError(
                f"TensorRT cannot load {self.plan_path} (built by another TensorRT version or "
                "GPU, or damaged); rebuild it with `jetyolo build BUNDLE --force`"
            )
        self._context = self._engine.create_execution_context()
        if self._context is None:  # TensorRT returns None when it cannot allocate its memory
            raise JetyoloError(
                f"TensorRT cannot create an execution context for {self.plan_path.name} (see "
                "its log above; usually too little free GPU memory): stop other GPU processes"
            )
        self._stream = cuda.Stream()
        for index in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(index)
            spec = self._tensor_spec(trt, name)
            self._specs[name] = spec
            if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self._inputs.append(name)
            nbytes = max(int(np.prod(spec.shape)) * spec.dtype.itemsize, 1)
            self._device_buffers[name] = cuda.mem_alloc(nbytes)
            self._context.set_tensor_address(name, int(self._device_buffers[name]))
        for name, spec in self._specs.items():
            self._staging[name] = self.allocate_impl(spec)

    def _tensor_spec(self, trt: Any, name: str) -> TensorSpec:
        shape = tuple(int(dim) for dim in self._engine.get_tensor_shape(name))
        if any(dim < 0 for dim in shape):
            raise JetyoloError(
                f"engine tensor {name!r} has dynamic shape {list(shape)}; jetyolo bundles are "
                "static (`jetyolo export` without --dynamic)"
            )
        return TensorSpec(name, shape, numpy_dtype(self._engine.get_tensor_dtype(name), name))

    def input_specs_impl(self) -> Dict[str, TensorSpec]:
        return {name: self._specs[name] for name in self._inputs}

    def output_specs_impl(self) -> Dict[str, TensorSpec]:
        return {name: spec for name, spec in self._specs.items() if name not in self._inputs}

    def allocate_impl(self, spec: TensorSpec) -> np.ndarray:
        array: np.ndarray = self._cuda.pagelocked_empty(spec.shape, spec.dtype)
        self._pinned[array.ctypes.data] = array
        return array

    def _pinned_or_staging(self, name: str, array: np.ndarray) -> np.ndarray:
        """``array`` when it is page-locked memory we allocated, else the staging buffer (async
        copies need page-locked memory; feeds from ``allocate_inputs`` never need staging)."""
        return array if array.ctypes.data in self._pinned else self._staging[name]

    def infer_impl(
        self, feed: Mapping[str, np.ndarray], out: Optional[Dict[str, np.ndarray]]
    ) -> Dict[str, np.ndarray]:
        cuda, stream = self._cuda, self._stream
        for name in self._inputs:
            source = self._pinned_or_staging(name, feed[name])
            if source is not feed[name]:
                np.copyto(source, feed[name])
            cuda.memcpy_htod_async(self._device_buffers[name], source, stream)
        if not self._context.execute_async_v3(stream.handle):
            raise JetyoloError(f"TensorRT execution of {self.plan_path.name} failed; see its log")
        targets = {name: self._staging[name] for name in self.output_specs_impl()}
        if out is not None:
            targets = {name: out[name] for name in targets}
        pinned_targets = {name: self._pinned_or_staging(name, array)
                          for name, array in targets.items()}
        for name, target in pinned_targets.items():
            cuda.memcpy_dtoh_async(target, self._device_buffers[name], stream)
        stream.synchronize()
        for name, target in targets.items():
            if pinned_targets[name] is not target:
                np.copyto(target, pinned_targets[name])
        return targets

    def deactivate_impl(self) -> None:
        for buffer in self._device_buffers.values():
            buffer.free()
        self._device_buffers, self._staging, self._pinned = {}, {}, {}
        self._specs, self._inputs = {}, []
        self._context = self._engine = self._runtime = self._stream = None
        if self._context_stack is not None:
            self._context_stack.pop()
            self._context_stack.detach()
            self._context_stack = None


def open_tensorrt(
    bundle: Any,
    precision: Optional[str] = None,
    variant: Optional[str] = None,
    engine_cache_dir: Optional[Path] = None,
    int8_from: Optional[str] = None,
    log: Callable[[str], None] = LOG.info,
) -> Backend:
    """The TensorRT backend for ``bundle``: the cached engine, built first when needed."""
    if variant == "int8-qdq":
        precision, int8_from, variant = "int8", "qdq", None
    request = BuildRequest(
        precision=precision, int8_from=int8_from, variant=variant or "fp32",
        cache_dir=engine_cache_dir,
    )
    result = ensure_engine(bundle, request, TensorRTBuildOps(), log)
    return TensorRTBackend(result.plan)
