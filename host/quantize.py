"""INT8 building blocks on the CPU with ``onnxruntime.quantization``: calibration images, ranges,
the Q/DQ model, its checks, and per-layer sensitivity.

One calibration pass (``collect_ranges``) feeds both INT8 forms: the TensorRT cache (``amax`` per
tensor) and the Q/DQ model (``quantize_static`` reads the same ranges back through its
``calibration_cache_path``), so the two never disagree. Images go through the device's
``Preprocessor``, so calibration sees exactly what the Jetson feeds the network.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import cv2
import numpy as np

from device.errors import JetyoloError
from device.files import sha256_file
from device.preprocess import Preprocessor
from host._env import require
from host.surgeon import load_onnx

log = logging.getLogger(__name__)

# --method -> the onnxruntime.quantization.CalibrationMethod member
ORT_METHODS = {"entropy": "Entropy", "minmax": "MinMax", "percentile": "Percentile"}
METHODS = tuple(ORT_METHODS)
TRT_ALGORITHMS = {
    "entropy": "EntropyCalibration2",
    "minmax": "MinMaxCalibration",
    # TensorRT has no percentile calibrator; percentile ranges are written as (and read back by
    # TensorRT like) any other amax, under the legacy entropy header it accepts for static caches.
    "percentile": "EntropyCalibration2",
}
QUANTIZED_OP_TYPES = ("Conv", "Gemm")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
CHUNK = 8  # images per collect_data() call: bounds the activations ONNX Runtime holds at once
LIST_SUFFIXES = (".txt", ".list")


# ---- calibration images ------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationImage:
    path: Path
    sha256: str


@dataclass
class CalibrationSet:
    """The images calibration uses (sorted, readable) and the files it skipped, with reasons."""

    images: List[CalibrationImage]
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def paths(self) -> List[Path]:
        return [image.path for image in self.images]


def candidate_files(source: Path) -> List[Path]:
    """Files named by ``source``: a directory (recursive, sorted) or a list file (one path a line,
    relative to the list's folder; blank lines and ``#`` comments ignored)."""
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
    if source.is_file() and source.suffix.lower() in LIST_SUFFIXES:
        lines = [line.strip() for line in source.read_text(errors="replace").splitlines()]
        return [
            (source.parent / line) if not Path(line).is_absolute() else Path(line)
            for line in lines
            if line and not line.startswith("#")
        ]
    raise JetyoloError(
        f"--images {source} is neither a directory nor a .txt list of image paths; "
        "pass a folder of calibration images (e.g. the dataset's train/images)"
    )


def select_images(source: Path, num: int, min_images: int) -> CalibrationSet:
    """The first ``num`` readable images of ``source`` in sorted order (deterministic).

    Unreadable and non-image files are skipped and counted; fewer than ``num`` readable images is
    a warning, fewer than ``min_images`` an error.
    """
    if num < 1:
        raise JetyoloError(f"--num must be >= 1, got {num}")
    files = candidate_files(source)
    if not files:
        raise JetyoloError(f"--images {source} holds no files; pass a folder of calibration images")
    chosen: List[CalibrationImage] = []
    skipped: List[Tuple[str, str]] = []
    for path in files:
        if len(chosen) == num:
            break
        reason = _unreadable_reason(path)
        if reason:
            skipped.append((str(path), reason))
        else:
            chosen.append(CalibrationImage(path, sha256_file(path)))
    if skipped:
        log.warning("calibrate: skipped %d unreadable or non-image file(s), e.g. %s (%s)",
                    len(skipped), skipped[0][0], skipped[0][1])
    if len(chosen) < min_images:
        raise JetyoloError(
            f"--images {source}: only {len(chosen)} readable image(s) ({len(skipped)} skipped), "
            f"calibration needs at least {min_images}; add images (a few hundred from the "
            "training set is typical) or lower min_images in the recipe"
        )
    if len(chosen) < num:
        log.warning("calibrate: --num %d asked, only %d readable image(s) in %s; using them all",
                    num, len(chosen), source)
    return CalibrationSet(chosen, skipped)


def _unreadable_reason(path: Path) -> Optional[str]:
    if not path.is_file():
        return "missing"
    try:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    except cv2.error as exc:  # OpenCV raises on some corrupt headers instead of returning None
        return f"OpenCV error {exc.code}"
    if image is None or image.size == 0:
        return "not an image OpenCV can read"
    return None


# ---- progress and the data reader --------------------------------------------------------------
class Progress:
    """Logs ``label: done/total, images/s, eta`` every ``every_s`` seconds and at the end."""

    def __init__(self, label: str, total: int, every_s: float = 2.0) -> None:
        self.label, self.total, self.every_s = label, total, every_s
        self.done = 0
        self.start = time.perf_counter()
        self._last = self.start

    def step(self, count: int = 1) -> None:
        self.done += count
        now = time.perf_counter()
        if now - self._last >= self.every_s or self.done >= self.total:
            self._last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else math.inf
            log.info("%s: %d/%d images, %.1f img/s, eta %.0f s",
                     self.label, self.done, self.total, rate, eta)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def preprocessed_inputs(
    paths: Sequence[Path], input_size: Tuple[int, int], input_dtype: str = "float32"
) -> Iterator[np.ndarray]:
    """Each image through the device ``Preprocessor``; yields a copy of its input tensor."""
    preprocessor = Preprocessor(input_size, input_dtype)
    for path in paths:
        frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if frame is None:
            raise JetyoloError(f"{path} became unreadable during calibration; re-run")
        preprocessor(frame)
        yield preprocessor.buffer.copy()


def _data_reader(
    input_name: str, inputs: Iterable[np.ndarray], progress: Optional[Progress]
) -> Any:
    quantization = require("onnxruntime.quantization", "calibrate")

    class Reader(quantization.CalibrationDataReader):  # type: ignore[name-defined]
        def __init__(self) -> None:
            self._inputs = iter(inputs)

        def get_next(self) -> Optional[Dict[str, np.ndarray]]:
            array = next(self._inputs, None)
            if array is None:
                return None
            if progress is not None:
                progress.step()
            return {input_name: array}

    return Reader()


def _chunks(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ---- ranges ------------------------------------------------------------------------------------
@dataclass
class Ranges:
    """Per-tensor (low, high) from one calibration, and ONNX Runtime's own object for reuse."""

    method: str
    values: Dict[str, Tuple[float, float]]
    tensors_data: Any  # onnxruntime.quantization.calibrate.TensorsData
    seconds: float
    images: int

    def amax(self, name: str) -> float:
        low, high = self.values[name]
        return max(abs(low), abs(high))


def calibrator_options(method: str, recipe: Mapping[str, Any]) -> Dict[str, Any]:
    if method == "entropy":
        return {"num_bins": int(recipe.get("num_bins", 2048)),
                "num_quantized_bins": int(recipe.get("num_quantized_bins", 128))}
    if method == "percentile":
        return {"num_bins": int(recipe.get("num_bins", 2048)),
                "percentile": float(recipe.get("percentile", 99.999)), "symmetric": True}
    return {}


def collect_ranges(
    model_path: Path,
    input_name: str,
    input_size: Tuple[int, int],
    paths: Sequence[Path],
    method: str,
    recipe: Mapping[str, Any],
) -> Ranges:
    """Calibrate every float tensor of ``model_path`` (input and all node outputs) on ``paths``."""
    quantization = require("onnxruntime.quantization", "calibrate")
    if method not in METHODS:
        raise JetyoloError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    progress = Progress(f"calibrate ({method})", len(paths))
    options = calibrator_options(method, recipe)
    with tempfile.TemporaryDirectory(prefix="jetyolo-calib-") as tmp:
        calibrator = quantization.create_calibrator(
            str(model_path),
            None,  # every float tensor: the TensorRT cache needs them all
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=getattr(quantization.CalibrationMethod, ORT_METHODS[method]),
            extra_options=options,
        )
        collector = _tolerant_collector(calibrator, method)
        with _quiet_ort_prints():
            for chunk in _chunks(list(paths), CHUNK):
                inputs = preprocessed_inputs(chunk, input_size)
                calibrator.collect_data(_data_reader(input_name, inputs, progress))
            tensors_data = calibrator.compute_data()
    _define_degenerate_ranges(tensors_data, collector.degenerate if collector else {}, method)
    values = {name: _range_of(data) for name, data in tensors_data.data.items()}
    log.info("calibrate: %d tensor ranges from %d images in %.1f s (%.1f img/s)",
             len(values), len(paths), progress.seconds, len(paths) / max(progress.seconds, 1e-9))
    return Ranges(method, values, tensors_data, progress.seconds, len(paths))


def _tolerant_collector(calibrator: Any, method: str) -> Any:
    """For the histogram methods, a collector that survives degenerate tensors; None for MinMax.

    ONNX Runtime's ``HistogramCollector`` raises ``Too many bins for data range`` for a whole
    calibration when one tensor spans fewer float32 steps than there are bins (an attention
    Softmax of an untrained YOLO12/YOLO26, a constant tensor). This one histograms tensor by
    tensor and keeps only the min/max of those that fail, for ``_define_degenerate_ranges``."""
    if method == "minmax":
        return None
    calibrate_module = require("onnxruntime.quantization.calibrate", "calibrate")

    class TolerantHistogramCollector(calibrate_module.HistogramCollector):  # type: ignore[name-defined]
        def __init__(self) -> None:
            super().__init__(method=method, symmetric=calibrator.symmetric,
                             num_bins=calibrator.num_bins,
                             num_quantized_bins=calibrator.num_quantized_bins,
                             percentile=calibrator.percentile, scenario=calibrator.scenario)
            self.degenerate: Dict[str, Tuple[float, ...]] = {}

        def collect(self, name_to_arr: Mapping[str, Any]) -> None:
            for name, array in name_to_arr.items():
                if name not in self.degenerate:
                    try:
                        super().collect({name: array})
                        continue
                    except ValueError as exc:  # numpy's "Too many bins for data range"
                        log.debug("calibrate: %s cannot be histogrammed (%s)", name, exc)
                        earlier = self.histogram_dict.pop(name, None)  # (hist, edges, min, max..)
                        self.degenerate[name] = _span(earlier[2:4] if earlier else ())
                seen = self.degenerate[name]
                self.degenerate[name] = _span((*seen, *_finite_span(array)))

        def compute_collection_result(self) -> Any:
            return super().compute_collection_result() if self.histogram_dict else {}

    collector = TolerantHistogramCollector()
    calibrator.collector = collector  # collect_data() creates its own only when this is unset
    return collector


def _finite_span(array: Any) -> Tuple[float, ...]:
    values = np.asarray(array, dtype=np.float32).reshape(-1)
    values = values[np.isfinite(values)]
    return (float(values.min()), float(values.max())) if values.size else ()


def _span(values: Sequence[Any]) -> Tuple[float, ...]:
    """(min, max) of ``values``, () for none."""
    floats = [float(v) for v in values]
    return (min(floats), max(floats)) if floats else ()


def _define_degenerate_ranges(
    tensors_data: Any, degenerate: Mapping[str, Tuple[float, ...]], method: str
) -> None:
    """Give each tensor the histogram could not take its observed symmetric min/max range (what
    MinMax calibration gives it), and every tensor whose ``amax / 127`` is no normal float32 (all
    zeros, subnormals; any method) the range +-1: ONNX Runtime's own quantizer uses scale 1 there,
    TensorRT would get a zero scale, and such values round to 0 within 1e-38. Warns by name."""
    calibrate_module = require("onnxruntime.quantization.calibrate", "calibrate")

    def symmetric(amax: float) -> Any:
        return calibrate_module.TensorData(
            lowest=np.array(-amax, dtype=np.float32), highest=np.array(amax, dtype=np.float32)
        )

    for name, span in sorted(degenerate.items()):
        low, high = span or (0.0, 0.0)  # () when every value was NaN or inf
        log.warning("calibrate: %s spans [%.9g, %.9g], too narrow for %s histogram bins; using "
                    "its min/max range instead", name, low, high, method)
        tensors_data.data[name] = symmetric(max(abs(low), abs(high)))
    unscalable = sorted(
        name for name, data in tensors_data.data.items()
        if max(abs(v) for v in _range_of(data)) / 127 < np.finfo(np.float32).tiny
    )
    for name in unscalable:
        tensors_data.data[name] = symmetric(1.0)
    if unscalable:
        log.warning("calibrate: %d tensor(s) are (almost) all zeros, too small for an int8 scale; "
                    "given the range +-1: %s", len(unscalable), ", ".join(unscalable[:8]))


def _range_of(data: Any) -> Tuple[float, float]:
    low, high = data.range_value if hasattr(data, "range_value") else data
    return float(np.asarray(low).reshape(-1)[0]), float(np.asarray(high).reshape(-1)[0])


def _quiet_ort_prints() -> contextlib.redirect_stdout:
    """ONNX Runtime's histogram collector print()s a few lines per call; keep the log readable."""
    return contextlib.redirect_stdout(io.StringIO())


# ---- the graph: head tensors, cache entries ----------------------------------------------------
def head_tensors(model: Any, postprocess_nodes: Iterable[str]) -> Set[str]:
    """Tensors the head's post-processing reads or writes (initializers excluded)."""
    names = set(postprocess_nodes)
    initializers = {init.name for init in model.graph.initializer}
    tensors: Set[str] = set()
    for node in model.graph.node:
        if node.name in names:
            tensors.update(t for t in node.input if t and t not in initializers)
            tensors.update(t for t in node.output if t)
    return tensors


def produced_by(model: Any, node_names: Iterable[str]) -> Set[str]:
    names = set(node_names)
    return {t for node in model.graph.node if node.name in names for t in node.output if t}


# ---- the Q/DQ model ----------------------------------------------------------------------------
QDQ_EXTRA_OPTIONS: Dict[str, Any] = {
    "ActivationSymmetric": True,  # zero point 0: the only INT8 TensorRT accepts
    "WeightSymmetric": True,
    "DedicatedQDQPair": False,  # one Q/DQ pair per tensor, shared by all its consumers
    "QDQKeepRemovableActivations": False,
    "ForceQuantizeNoInputCheck": False,
    "QuantizeBias": False,  # float bias: TensorRT folds it itself, no int32 bias DequantizeLinear
    # Conv/Gemm outputs stay float: TensorRT wants Q/DQ on a layer's inputs, not its outputs.
    "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OP_TYPES),
}


def build_qdq_model(
    model_path: Path, ranges: Ranges, out_path: Path, exclude_nodes: Iterable[str]
) -> Path:
    """Write the explicit-quantization model: symmetric int8, weights per channel (axis 0),
    activations per tensor, Q/DQ on the inputs of Conv/Gemm only, ``exclude_nodes`` untouched."""
    quantization = require("onnxruntime.quantization", "calibrate")
    calibrate_module = require("onnxruntime.quantization.calibrate", "calibrate")
    method = getattr(quantization.CalibrationMethod, ORT_METHODS[ranges.method])
    with tempfile.TemporaryDirectory(prefix="jetyolo-qdq-") as tmp:
        ranges_file = Path(tmp) / "ranges.json"
        calibrate_module.save_tensors_data(ranges.tensors_data, ranges_file)
        logging.getLogger().disabled, was = True, logging.getLogger().disabled  # pre-process nag
        try:
            quantization.quantize_static(
                str(model_path),
                str(out_path),
                calibration_data_reader=None,
                quant_format=quantization.QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OP_TYPES),
                per_channel=True,
                reduce_range=False,
                activation_type=quantization.QuantType.QInt8,
                weight_type=quantization.QuantType.QInt8,
                nodes_to_exclude=sorted(set(exclude_nodes)),
                calibrate_method=method,
                extra_options=dict(QDQ_EXTRA_OPTIONS),
                calibration_cache_path=str(ranges_file),
            )
        finally:
            logging.getLogger().disabled = was
    return out_path


def qdq_problems(model: Any, protected_tensors: Iterable[str]) -> List[str]:
    """What keeps a Q/DQ model from being TensorRT-ready: non-int8 or non-zero zero points,
    per-channel weight scales not on axis 0, Q/DQ touching a protected (head) tensor."""
    numpy_helper = require("onnx.numpy_helper", "calibrate")
    initializers = {init.name: init for init in model.graph.initializer}
    protected = set(protected_tensors)
    problems: List[str] = []
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        if len(node.input) < 3 or node.input[2] not in initializers:
            problems.append(f"{node.name}: no constant zero point")
            continue
        zero_point = numpy_helper.to_array(initializers[node.input[2]])
        if zero_point.dtype != np.int8 or np.any(zero_point != 0):
            problems.append(f"{node.name}: zero point {zero_point.dtype} {zero_point.ravel()[:4]}")
        scale = numpy_helper.to_array(initializers[node.input[1]])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.size > 1 and axis != 0:
            problems.append(f"{node.name}: per-channel scale on axis {axis}, TensorRT wants 0")
        touched = (set(node.input) | set(node.output)) & protected
        if touched:
            problems.append(
                f"{node.name}: quantizes head post-processing tensor {sorted(touched)[0]}"
            )
    return problems


def quantized_layers(model: Any) -> List[str]:
    """Names of the nodes whose activation input goes through a DequantizeLinear."""
    dequantized = {t for n in model.graph.node if n.op_type == "DequantizeLinear" for t in n.output}
    return [
        node.name for node in model.graph.node
        if node.op_type in QUANTIZED_OP_TYPES and node.input and node.input[0] in dequantized
    ]


# ---- per-layer sensitivity ---------------------------------------------------------------------
def layer_sensitivity(
    qdq_model: Path,
    input_name: str,
    input_size: Tuple[int, int],
    paths: Sequence[Path],
) -> List[Tuple[str, float]]:
    """Quantized layers, most sensitive first, with the SQNR (dB) of their quantized activation
    input vs that input in float, measured by ``onnxruntime.quantization.qdq_loss_debug`` on
    ``paths``. Low SQNR = INT8 loses most of that layer's input signal."""
    debug = require("onnxruntime.quantization.qdq_loss_debug", "calibrate")
    model = load_onnx(qdq_model, "calibrate")
    dequantized_input = _dequantized_input_of_layers(model)
    with tempfile.TemporaryDirectory(prefix="jetyolo-sens-") as tmp:
        augmented = Path(tmp) / "qdq_aug.onnx"
        debug.modify_model_output_intermediate_tensors(str(qdq_model), str(augmented))
        inputs = list(preprocessed_inputs(paths, input_size))
        with _quiet_ort_prints():
            activations = debug.collect_activations(
                str(augmented), _data_reader(input_name, iter(inputs), None)
            )
        matching = debug.create_activation_matching(activations)
    sqnr = debug.compute_signal_to_quantization_noice_ratio
    ranked = [
        (layer, float(sqnr(matching[tensor]["pre_qdq"], matching[tensor]["post_qdq"])))
        for layer, tensor in dequantized_input.items()
        if tensor in matching
    ]
    return sorted(ranked, key=lambda item: item[1])


def _dequantized_input_of_layers(model: Any) -> Dict[str, str]:
    """Quantized layer name -> the float tensor name its activation input was quantized from."""
    dq_source = {}
    q_source = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in q_source:
            dq_source[node.output[0]] = q_source[node.input[0]]
    return {
        node.name: dq_source[node.input[0]]
        for node in model.graph.node
        if node.op_type in QUANTIZED_OP_TYPES and node.input and node.input[0] in dq_source
    }
