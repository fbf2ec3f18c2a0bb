"""TensorRT engine build: ONNX parser + builder (the loader half, as polygraphy's trt/loader.py).

Every decision (which flags, which cache, reuse or rebuild) is made in ``device.build_plan`` and
``device.engine`` and tested there; this module carries them out with the TensorRT 8.5-11 Python
API: ``trt.Builder`` -> ``create_network`` (EXPLICIT_BATCH on 8.x, STRONGLY_TYPED where the
recipe says) -> ``OnnxParser.parse_from_file`` -> ``IBuilderConfig`` (workspace pool limit,
precision flags set and cleared, ``int8_calibrator``, the optimisation profile of an input with
runtime dims (and its calibration profile), layer precisions, timing cache, DLA) ->
``build_serialized_network``. INT8 from a cache uses a calibrator that only hands TensorRT the
cache bytes: ``get_batch`` returns None, and if TensorRT asks for a batch at all (it rejected the
cache) the engine is refused.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from device.backends.tensorrt_util import cuda_init, import_pycuda, import_tensorrt, trt_logger
from device.build_plan import BuildPlan, InputProfile, LayerRecord
from device.engine import DeviceFacts, TensorRTOps
from device.errors import JetyoloError
from device.files import PRIVATE_FILE, atomic_write_bytes
from device.l4t import parse_meminfo, read_l4t_release

HEARTBEAT_SECONDS = 30.0
PROGRESS_SECONDS = 5.0


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
    device = cuda_init(cuda)
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


def _network_shape(network: Any, name: str) -> Tuple[int, ...]:
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        if tensor.name == name:
            return tuple(int(dim) for dim in tensor.shape)
    raise JetyoloError(f"the parsed network has no input {name!r}; re-export the bundle")


def _add_profile(
    builder: Any, network: Any, config: Any, profile: Optional[InputProfile], calibrated: bool
) -> None:
    """Optimisation profile 0 for the input with runtime dims (-1: onnx-tensorrt reads a
    ``dim_param`` as -1, onnx_utils.hpp); the calibration profile too when a calibrator is set
    (NvInfer.h setCalibrationProfile, 8.5.2-10.x: "must be set if int8 calibration is used to
    set scales for a network with runtime dimensions"; the API is gone in 11, as calibration)."""
    if profile is None:
        return
    shape = _network_shape(network, profile.name)
    fixed = [index for index, dim in enumerate(shape) if dim >= 0
             and not profile.min[index] == profile.max[index] == dim]
    if len(shape) != len(profile.max) or fixed:
        raise JetyoloError(
            f"input {profile.name} is {list(shape)} in the ONNX graph, but the bundle asks for "
            f"{profile.describe()}: a dimension TensorRT sees as static cannot vary; re-export "
            "the bundle with this jetyolo (`jetyolo export --batch N` makes only dim 0 symbolic)"
        )
    optimization = builder.create_optimization_profile()
    optimization.set_shape(profile.name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(optimization)
    if calibrated and any(dim < 0 for dim in shape):
        one = profile.calibration_shape
        calibration = builder.create_optimization_profile()
        calibration.set_shape(profile.name, one, one, one)
        config.set_calibration_profile(calibration)


def build_engine(
    onnx_path: Path,
    build: BuildPlan,
    calib_cache: Optional[bytes] = None,
    head_fp16_layers: Sequence[str] = (),
    workspace_bytes: int = 1 << 30,
    timing_cache_path: Optional[Path] = None,
    dla_core: Optional[int] = None,
    log_progress: Callable[[str], None] = print,
    input_profile: Optional[InputProfile] = None,
) -> bytes:
    """Serialized engine for ``onnx_path`` following ``build`` (``device.build_plan.plan_build``).
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
    _add_profile(builder, network, config, input_profile, calibrator is not None)
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


