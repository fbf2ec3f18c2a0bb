"""Parity of the exported ONNX with the ultralytics PyTorch model it came from.

Both run on the same letterboxed images (``device.preprocess.Preprocessor``, the device's own
preprocessing) through polygraphy's ``Comparator``: the PyTorch model behind a small runner that
splits YOLO's single output like ``surgeon.split_head`` does (one-to-many [1,4+nc,N] into
``boxes``/``scores``; end-to-end [1,K,6] into ``det_boxes``/``det_scores``/``det_classes``), the
ONNX model in ONNX Runtime on the CPU. Per image, detections after the device's ``postprocess``
are matched by class and IoU >= 0.5. One-to-many: boxes and scores are compared tensor by tensor
(max abs and max rel difference, polygraphy's statistics, rel = |onnx - torch| / |torch|).
End-to-end: the rows come out of a TopK whose near-ties may order differently on two kernel
libraries, so boxes and scores are compared on the matched detections instead. Over tolerance,
``check`` raises.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from device.detections import Detections
from device.errors import JetyoloError
from device.matching import match_pairs
from device.postprocess import CONTRACTS, PostprocessConfig, postprocess
from device.preprocess import Letterbox, Preprocessor
from host._env import require

log = logging.getLogger(__name__)
# Synthetic parity frames: square, landscape and portrait, so letterbox padding is exercised.
FRAME_SIZES = ((320, 320), (640, 360), (480, 640), (960, 540))


@dataclass(frozen=True)
class Tolerance:
    """Limits the export must meet. Measured on the fixture model (docs/export.md): boxes differ
    by <= 1.8e-4 px at 320 and 5.5e-4 px at 640, scores by <= 2.8e-6; the limits leave 9x and 35x
    headroom, while a 0.1% change of one Conv weight already moves scores by 1.9e-3."""

    boxes_atol: float = 5e-3  # input pixels
    scores_atol: float = 1e-4
    min_agreement: float = 0.99


@dataclass
class ParityReport:
    images: int
    source: str
    boxes: Dict[str, float]
    scores: Dict[str, float]
    detections: Dict[str, Any]
    tolerance: Dict[str, float]
    problems: List[str]
    compared: str = "tensors"  # or "matched detections" (end-to-end head: TopK order may differ)

    def as_manifest(self) -> Dict[str, Any]:
        record = asdict(self)
        record.pop("problems")
        return record

    def lines(self) -> List[str]:
        return report_lines(self.as_manifest())


def report_lines(record: Dict[str, Any]) -> List[str]:
    """Human-readable parity figures from a report (or the manifest's ``parity`` record)."""
    boxes, scores, dets, limit = (record[k] for k in ("boxes", "scores", "detections", "tolerance"))
    compared = record.get("compared", "tensors")
    lines = [
        f"parity ({record['images']} images, {record['source']}; PyTorch vs ONNX Runtime FP32; "
        f"boxes and scores compared as {compared}):",
        f"  boxes   max abs {boxes['max_abs']:.3g} px  max rel {boxes['max_rel']:.3g}"
        f"  (limit {limit['boxes_atol']:g} px)",
        f"  scores  max abs {scores['max_abs']:.3g}  max rel {scores['max_rel']:.3g}"
        f"  (limit {limit['scores_atol']:g})",
        f"  detections: torch {dets['reference']}, onnx {dets['onnx']}, matched {dets['matched']}"
        f" -> agreement {dets['agreement']:.4f} (limit {limit['min_agreement']:g})",
    ]
    if "uint8_vs_fp32" in record:
        worst = ", ".join(f"{k} max abs {v:.3g}" for k, v in record["uint8_vs_fp32"].items())
        lines.append(f"  uint8-input variant vs fp32: {worst}")
    if "frame_vs_cpu_letterbox" in record:
        frame = record["frame_vs_cpu_letterbox"]
        lines.append(
            f"  frame-input variant (letterbox in the graph) vs CPU letterbox: agreement "
            f"{frame['agreement']:.4f} ({frame['matched']}/{max(frame['cpu'], frame['graph'])}), "
            f"boxes max {frame['max_box_px']:.2f} frame px"
        )
    if "fp16_vs_fp32" in record:
        half, limits = record["fp16_vs_fp32"], record["fp16_vs_fp32"]["tolerance"]
        lines.append(
            f"  fp16 variant vs fp32 (ONNX Runtime): boxes max abs {half['boxes']:.3g} px, "
            f"scores max abs {half['scores']:.3g}, agreement {half['detections']['agreement']:.4f}"
            f" (limits {limits['boxes_atol']:g} px, {limits['scores_atol']:g})"
        )
    return lines


def synthetic_frames(classes: int, count: int, seed: int = 0) -> List[np.ndarray]:
    """BGR frames of the synthetic objects (host.synth), in several aspect ratios."""
    from host.synth import MAX_CLASSES, render

    rng = np.random.default_rng(seed)
    sizes = [FRAME_SIZES[i % len(FRAME_SIZES)] for i in range(count)]
    return [render(rng, max(1, min(classes, MAX_CLASSES)), w, h)[0] for w, h in sizes]


def dataset_frames(data_yaml: Path, count: int) -> List[np.ndarray]:
    """The first ``count`` images of the dataset's val split (train when val has none), with the
    split paths resolved the way ``jetyolo data check`` (and ultralytics) resolve them."""
    from host.dataset import split_images

    report, images = split_images(data_yaml, ("val", "train"))
    for split in ("val", "train"):
        read = (cv2.imread(str(path)) for path in images.get(split, [])[:count])
        frames = [frame for frame in read if frame is not None]
        if frames:
            return frames
    raise JetyoloError(
        f"--data {data_yaml}: no readable val/train images under {report.root}; "
        "run `jetyolo data check` on it"
    )


def split_raw(raw: np.ndarray, contract: str) -> Dict[str, np.ndarray]:
    """YOLO's single output split like ``surgeon.split_head`` splits the ONNX one."""
    if contract == "end2end":
        return OrderedDict(det_boxes=raw[..., :4], det_scores=raw[..., 4], det_classes=raw[..., 5])
    return OrderedDict(boxes=raw[:, :4], scores=raw[:, 4:])


def torch_runner(model: Any, input_shape: Sequence[int], contract: str = "split_head") -> Any:
    """A polygraphy runner for an ultralytics detection model (eval mode, no grad) whose outputs
    are YOLO's single output split like the ONNX head (``split_raw``)."""
    base = require("polygraphy.backend.base", "export")
    common = require("polygraphy.common", "export")
    torch = require("torch", "export")

    class TorchYoloRunner(base.BaseRunner):  # type: ignore[name-defined]
        def __init__(self) -> None:
            super().__init__(name="pytorch")

        def activate_impl(self) -> None:
            model.eval()

        def get_input_metadata_impl(self) -> Any:
            return common.TensorMetadata().add("images", np.float32, list(input_shape))

        def infer_impl(self, feed_dict: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
            start = time.perf_counter()
            with torch.no_grad():
                raw = model(torch.from_numpy(feed_dict["images"]))
            self.inference_time = time.perf_counter() - start
            raw = (raw[0] if isinstance(raw, (list, tuple)) else raw).numpy()
            return split_raw(raw, contract)

        def deactivate_impl(self) -> None:
            pass

    return TorchYoloRunner()


def compare(
    torch_model: Any,
    onnx_path: Path,
    frames: Sequence[np.ndarray],
    input_size: Tuple[int, int],
    source: str,
    tolerance: Optional[Tolerance] = None,
    config: Optional[PostprocessConfig] = None,
    batch: int = 1,
    contract: str = "split_head",
) -> ParityReport:
    """Run both models on ``frames`` (letterboxed by the device's Preprocessor) and measure."""
    tolerance = tolerance or Tolerance()
    config = config or PostprocessConfig()
    comparator = require("polygraphy.comparator", "export")
    onnxrt = require("polygraphy.backend.onnxrt", "export")
    logger = require("polygraphy.logger", "export").G_LOGGER
    feeds = list(_feeds(frames, input_size, batch))
    reference = torch_runner(torch_model, feeds[0]["images"].shape, contract)
    onnx_runner = onnxrt.OnnxrtRunner(
        onnxrt.SessionFromOnnx(str(onnx_path), providers=["cpu"]), name="onnxruntime"
    )
    names = CONTRACTS[contract]
    severity = logger.module_severity
    logger.module_severity = logger.ERROR
    try:
        results = comparator.Comparator.run([reference, onnx_runner], data_loader=feeds)
        problems = shape_problems(results, names)
        if contract == "split_head" and not problems:
            accuracy = comparator.Comparator.compare_accuracy(
                results,
                compare_func=comparator.CompareFunc.simple(
                    atol={"boxes": tolerance.boxes_atol, "scores": tolerance.scores_atol},
                    rtol=0.0,
                    check_error_stat="max",
                ),
            )
    finally:
        logger.module_severity = severity
    detections, deltas = _agreement(results["pytorch"], results["onnxruntime"], config, input_size)
    if contract == "split_head" and not problems:
        per_iteration = accuracy[0][("pytorch", "onnxruntime")]
        stats = {name: _max_stats(per_iteration, name) for name in names}
    else:  # end-to-end rows (and mismatched shapes) are compared on matched detections
        stats = deltas
    compared = "matched detections" if contract == "end2end" else "tensors"
    report = ParityReport(len(feeds), source, stats["boxes"], stats["scores"], detections,
                          asdict(tolerance), [], compared)
    report.problems = problems or problems_of(report, tolerance)
    return report


def shape_problems(results: Any, names: Sequence[str]) -> List[str]:
    """One line per output whose shape (or presence) differs between the two runners: polygraphy
    reports those as a bare ``False`` instead of statistics."""
    problems = []
    torch_first, onnx_first = results["pytorch"][0], results["onnxruntime"][0]
    for name in names:
        want = np.shape(torch_first[name]) if name in torch_first else None
        got = np.shape(onnx_first[name]) if name in onnx_first else None
        if want != got:
            problems.append(f"output {name} is {got} in the ONNX, {want} in PyTorch")
    extra = sorted(set(onnx_first.keys()) - set(names))
    if extra:
        problems.append(f"the ONNX has outputs {extra} PyTorch's split head has not")
    return problems


def check(report: ParityReport) -> None:
    """Raise when the report is over tolerance (one line listing what failed)."""
    if report.problems:
        raise JetyoloError(
            f"ONNX/PyTorch parity failed: {'; '.join(report.problems)}; the ONNX "
            "does not compute what the .pt does, nothing was written"
        )


def _feeds(
    frames: Iterable[np.ndarray], input_size: Tuple[int, int], batch: int = 1
) -> Iterable[Dict[str, Any]]:
    """One feed per frame, preprocessed by the device's code; a static batch > 1 repeats it."""
    preprocess = Preprocessor(input_size, "float32")
    for frame in frames:
        preprocess(frame)
        yield {"images": np.repeat(preprocess.buffer, batch, axis=0)}


def _max_stats(per_iteration: Sequence[Any], name: str) -> Dict[str, float]:
    """Worst statistics over the iterations; inf where polygraphy has none (a shape mismatch)."""
    results: List[Any] = [iteration.get(name, None) for iteration in per_iteration]
    if not all(hasattr(result, "max_absdiff") for result in results):
        return {"max_abs": float("inf"), "max_rel": float("inf")}
    return {
        "max_abs": max(float(result.max_absdiff) for result in results),
        "max_rel": max(float(result.max_reldiff) for result in results),
    }


def _agreement(
    reference: Sequence[Any], candidate: Sequence[Any], config: PostprocessConfig,
    input_size: Tuple[int, int],
) -> Tuple[Dict[str, Any], Dict[str, Dict[str, float]]]:
    """Detection agreement, and the max abs box/score differences of the matched detections."""
    totals = {"reference": 0, "onnx": 0, "matched": 0}
    worst = {"boxes": [0.0, 0.0], "scores": [0.0, 0.0]}  # [max abs, max rel]
    height, width = input_size
    identity = Letterbox.fit((width, height), input_size)  # input pixels in and out
    for ref_out, onnx_out in zip(reference, candidate):
        if set(ref_out.keys()) != set(onnx_out.keys()):
            continue  # reported by shape_problems
        ref = postprocess(_as_arrays(ref_out), identity, config)
        got = postprocess(_as_arrays(onnx_out), identity, config)
        totals["reference"] += len(ref)
        totals["onnx"] += len(got)
        pairs = [(r, d) for r, d, _ in match_pairs(ref, got, 0.5)
                 if ref.class_id[r] == got.class_id[d]]
        totals["matched"] += len(pairs)
        for r, d in pairs:
            box_abs = np.abs(ref.xyxy[r] - got.xyxy[d])
            score_abs = abs(float(ref.confidence[r]) - float(got.confidence[d]))
            box_rel = float((box_abs / np.maximum(np.abs(ref.xyxy[r]), 1e-6)).max())
            score_rel = score_abs / max(abs(float(ref.confidence[r])), 1e-6)
            for key, (a, rel) in (("boxes", (float(box_abs.max()), box_rel)),
                                  ("scores", (score_abs, score_rel))):
                worst[key] = [max(worst[key][0], a), max(worst[key][1], rel)]
    compared = max(totals["reference"], totals["onnx"])
    agreement = dict(totals, agreement=totals["matched"] / compared if compared else 1.0)
    deltas = {key: {"max_abs": v[0], "max_rel": v[1]} for key, v in worst.items()}
    return agreement, deltas


def _as_arrays(outputs: Any) -> Dict[str, np.ndarray]:
    return {name: np.asarray(array) for name, array in outputs.items()}


def match_detections(reference: Detections, candidate: Detections, min_iou: float = 0.5) -> int:
    """Greedy one-to-one matches: same class, IoU >= ``min_iou``, highest IoU first (the device's
    ``match_pairs`` takes same-class pairs first; cross-class pairs do not count here)."""
    pairs = match_pairs(reference, candidate, min_iou)
    return sum(1 for r, d, _ in pairs if reference.class_id[r] == candidate.class_id[d])


def problems_of(report: ParityReport, tolerance: Tolerance) -> List[str]:
    problems = []
    if not report.boxes["max_abs"] <= tolerance.boxes_atol:
        problems.append(
            f"boxes differ by {report.boxes['max_abs']:.3g} px > {tolerance.boxes_atol:g}"
        )
    if not report.scores["max_abs"] <= tolerance.scores_atol:
        problems.append(
            f"scores differ by {report.scores['max_abs']:.3g} > {tolerance.scores_atol:g}"
        )
    if report.detections["agreement"] < tolerance.min_agreement:
        problems.append(
            f"detection agreement {report.detections['agreement']:.3f} < "
            f"{tolerance.min_agreement:g}"
        )
    return problems


def batch_rows(
    onnx_path: Path, frames: Sequence[np.ndarray], input_size: Tuple[int, int], batch: int
) -> float:
    """Worst abs difference, over k = 1..``batch`` rows of distinct frames (cycled), between
    row i of a k-row call and frame i run alone: what a graph whose dim 0 is symbolic must
    give (0 up to kernel choice) if nothing in it depends on the batch."""
    ort = require("onnxruntime", "export")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    preprocess = Preprocessor(input_size, "float32")
    rows = []
    for index in range(batch):
        preprocess(frames[index % len(frames)])
        rows.append(preprocess.buffer.copy())
    alone = [session.run(None, {name: row}) for row in rows]
    worst = 0.0
    for count in range(1, batch + 1):
        together = session.run(None, {name: np.concatenate(rows[:count])})
        for index in range(count):
            for got, want in zip(together, alone[index]):
                worst = max(worst, float(np.max(np.abs(got[index] - want[0]))))
    return worst


def uint8_difference(
    fp32_path: Path,
    uint8_path: Path,
    frames: Sequence[np.ndarray],
    input_size: Tuple[int, int],
    batch: int = 1,
) -> Dict[str, float]:
    """Max abs difference per output between the uint8-input variant fed the device's uint8 NHWC
    buffer and the fp32 model fed its float NCHW buffer, for the same frames (expected 0)."""
    ort = require("onnxruntime", "export")
    fp32 = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
    uint8 = ort.InferenceSession(str(uint8_path), providers=["CPUExecutionProvider"])
    as_float, as_uint8 = Preprocessor(input_size, "float32"), Preprocessor(input_size, "uint8")
    names = [output.name for output in fp32.get_outputs()]
    worst = dict.fromkeys(names, 0.0)
    for frame in frames:
        as_float(frame)
        as_uint8(frame)
        expected = fp32.run(names, {"images": np.repeat(as_float.buffer, batch, axis=0)})
        got = uint8.run(names, {"images": np.repeat(as_uint8.buffer, batch, axis=0)})
        for name, want, have in zip(names, expected, got):
            worst[name] = max(worst[name], float(np.abs(want - have).max()))
    return worst


def variant_difference(
    fp32_path: Path,
    variant_path: Path,
    frames: Sequence[np.ndarray],
    input_size: Tuple[int, int],
    batch: int = 1,
    variant_dtype: str = "float32",
    config: Optional[PostprocessConfig] = None,
) -> Dict[str, Any]:
    """A bundle variant against the fp32 model on ONNX Runtime, each fed the device's buffer of
    its input dtype for the same frames: max abs difference per output and detection agreement."""
    ort = require("onnxruntime", "export")
    fp32 = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
    variant = ort.InferenceSession(str(variant_path), providers=["CPUExecutionProvider"])
    as_float = Preprocessor(input_size, "float32")
    as_variant = Preprocessor(input_size, variant_dtype)
    names = [output.name for output in fp32.get_outputs()]
    worst: Dict[str, Any] = dict.fromkeys(names, 0.0)
    expected_all, got_all = [], []
    for frame in frames:
        as_float(frame)
        as_variant(frame)
        expected = fp32.run(names, {"images": np.repeat(as_float.buffer, batch, axis=0)})
        got = variant.run(names, {"images": np.repeat(as_variant.buffer, batch, axis=0)})
        for name, want, have in zip(names, expected, got):
            worst[name] = max(worst[name], float(np.abs(want - have.astype(np.float32)).max()))
        expected_all.append(dict(zip(names, expected)))
        got_all.append(dict(zip(names, got)))
    worst["detections"] = _agreement(expected_all, got_all, config or PostprocessConfig(),
                                     input_size)[0]
    return worst


CAMERA_SIZES = ((1920, 1080), (1280, 720), (640, 480), (517, 333))  # (w, h) frame_difference uses


def frame_difference(
    fp32_path: Path,
    frame_path: Path,
    frames: Sequence[np.ndarray],
    input_size: Tuple[int, int],
    config: PostprocessConfig,
) -> Dict[str, Any]:
    """The frame-input variant (letterbox in the graph) against the fp32 model fed the device's
    CPU letterbox, on ``frames`` resized to each of ``CAMERA_SIZES``: detection agreement and the
    largest box-corner difference, in frame pixels, over images whose detections pair up."""
    ort = require("onnxruntime", "export")
    fp32 = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
    in_graph = ort.InferenceSession(str(frame_path), providers=["CPUExecutionProvider"])
    preprocess = Preprocessor(input_size, "float32")
    totals = {"cpu": 0, "graph": 0, "matched": 0}
    worst_px = 0.0
    for size in CAMERA_SIZES:
        for frame in (cv2.resize(image, size, interpolation=cv2.INTER_LINEAR) for image in frames):
            geometry = preprocess(frame)
            cpu = postprocess(_named(fp32, {"images": preprocess.buffer}), geometry, config)
            graph = postprocess(_named(in_graph, {"frame": frame[None]}), geometry, config)
            matched = match_detections(cpu, graph)
            totals = {"cpu": totals["cpu"] + len(cpu), "graph": totals["graph"] + len(graph),
                      "matched": totals["matched"] + matched}
            if matched == len(cpu) == len(graph) and matched:
                worst_px = max(worst_px, _corner_difference(cpu, graph))
    compared = max(totals["cpu"], totals["graph"])
    return dict(totals, agreement=totals["matched"] / compared if compared else 1.0,
                max_box_px=round(worst_px, 3), frame_sizes=[list(size) for size in CAMERA_SIZES])


def _named(session: Any, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))


def _corner_difference(a: Detections, b: Detections) -> float:
    """Largest corner difference between greedily paired boxes (same class, best IoU)."""
    pairs = match_pairs(a, b, 0.5)
    return max(float(np.abs(a.xyxy[r] - b.xyxy[d]).max()) for r, d, _ in pairs) if pairs else 0.0


def frames_for(data: Optional[Path], classes: int, count: int) -> Tuple[List[np.ndarray], str]:
    if data is not None:
        return dataset_frames(data, count), f"val images of {data}"
    return synthetic_frames(classes, count), "synthetic frames (host.synth)"
