"""What reduced-scale MJPEG decoding (``decode_scale``) buys and costs, on a bench video:

    python -m host.bench.decode BUNDLE --source v1080.mp4 [--frames 60] [--rounds 5]

The video's frames are JPEG-encoded as the ``--live`` camera serves them (quality 90). Per
reduction (1, 2, 4, 8): ``cv2.imdecode`` ms per frame and decode + letterbox ms per frame, as
thread CPU time (one thread does both; a busy machine stretches wall time, much less CPU time),
medians of ``--rounds`` rounds, the reductions alternating within each round; then the
detection agreement of each reduction with the full decode through the bundle's CPU graph
(same class at IoU >= 0.5, one to one; matched / max(count)) and the largest box-corner
difference in source pixels of the matched pairs. Last, the CPU time of one read from OpenCV's
FFmpeg capture of the served stream, raw packets (what the reduced path reads) vs decoded frames.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from device.backends import open_backend
from device.bundle import Bundle
from device.decode_scale import Reduction
from device.detections import Detections
from device.matching import match_pairs
from device.postprocess import PostprocessConfig, postprocess
from device.preprocess import Preprocessor
from device.sources import RAW_PACKETS, REDUCED_FLAGS
from host.bench.live import PacedMjpegServer, encode_video

FACTORS = (1, 2, 4, 8)


def agreement(
    full: Sequence[Detections], reduced: Sequence[Detections]
) -> Tuple[float, List[float]]:
    """(matched / max(count) over the frames, the largest box-corner difference in px of each
    matched pair): same class at IoU >= 0.5, one to one, frame by frame."""
    matched = compared = 0
    corner_px: List[float] = []
    for a, b in zip(full, reduced):
        pairs = [(i, j) for i, j, _ in match_pairs(a, b, 0.5) if a.class_id[i] == b.class_id[j]]
        matched += len(pairs)
        compared += max(len(a), len(b))
        corner_px += [float(np.abs(a.xyxy[i] - b.xyxy[j]).max()) for i, j in pairs]
    return (matched / compared if compared else 1.0), corner_px


def decode(jpeg: np.ndarray, factor: int) -> np.ndarray:
    image = cv2.imdecode(jpeg, cv2.IMREAD_COLOR if factor == 1 else REDUCED_FLAGS[factor])
    if image is None:
        raise RuntimeError("a bench JPEG does not decode")
    return image


def timings(jpegs: List[np.ndarray], input_size: Tuple[int, int], rounds: int) -> Dict[str, Any]:
    """Thread CPU ms per frame: imdecode alone, and imdecode + letterbox into the uint8 input."""
    decode_ms: Dict[int, List[float]] = {factor: [] for factor in FACTORS}
    with_letterbox_ms: Dict[int, List[float]] = {factor: [] for factor in FACTORS}
    preprocess = Preprocessor(input_size, "uint8")
    for round_index in range(rounds):
        order = FACTORS if round_index % 2 == 0 else tuple(reversed(FACTORS))
        for factor in order:
            started = time.thread_time()
            images = [decode(jpeg, factor) for jpeg in jpegs]
            middle = time.thread_time()
            for image in images:
                preprocess(image)
            done = time.thread_time()
            decode_ms[factor].append((middle - started) * 1000.0 / len(jpegs))
            with_letterbox_ms[factor].append((done - started) * 1000.0 / len(jpegs))
    return {f"1/{factor}": {"decode_ms": round(statistics.median(decode_ms[factor]), 2),
                            "decode_and_letterbox_ms":
                                round(statistics.median(with_letterbox_ms[factor]), 2),
                            "decode_ms_per_round": [round(v, 2) for v in decode_ms[factor]]}
            for factor in FACTORS}


def detections_per_factor(bundle: Bundle, jpegs: List[np.ndarray]) -> Dict[int, List[Detections]]:
    config = PostprocessConfig(**{key: bundle.manifest.get("postprocess", {}).get(key, default)
                                  for key, default in (("conf", 0.25), ("iou", 0.45),
                                                       ("max_det", 300))})
    found: Dict[int, List[Detections]] = {factor: [] for factor in FACTORS}
    with open_backend("onnxruntime", bundle, threads=1) as backend:
        spec = backend.input_spec
        preprocess = Preprocessor(bundle.input_size, spec.dtype.name, buffer=backend.input_buffer)
        outputs = backend.allocate_outputs()
        for jpeg in jpegs:
            source_size = _jpeg_size(jpeg)
            for factor in FACTORS:
                image = decode(jpeg, factor)
                reduction = Reduction(factor, source_size) if factor > 1 else None
                geometry = preprocess(image, reduction)
                backend.infer({spec.name: backend.input_buffer}, out=outputs)
                found[factor].append(postprocess(outputs, geometry, config))
    return found


def _jpeg_size(jpeg: np.ndarray) -> Tuple[int, int]:
    image = decode(jpeg, 1)
    return (int(image.shape[1]), int(image.shape[0]))


def read_cpu_ms(video: Path, frames: int) -> Dict[str, float]:
    """Thread CPU ms per ``read()`` from the served stream: raw packets vs decoded frames."""
    figures = {}
    with PacedMjpegServer(video, 1000.0, frames) as camera:
        for label, raw in (("raw_packet_read_cpu_ms", True), ("decoded_read_cpu_ms", False)):
            capture = cv2.VideoCapture(camera.url, cv2.CAP_FFMPEG)
            if raw:
                capture.set(cv2.CAP_PROP_FORMAT, RAW_PACKETS)
            capture.read()  # the first read also opens the stream
            started = time.thread_time()
            for _ in range(frames):
                capture.read()
            figures[label] = round((time.thread_time() - started) * 1000.0 / frames, 3)
            capture.release()
    return figures


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m host.bench.decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--source", type=Path, required=True, help="bench video")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    bundle = Bundle.load(args.bundle)
    jpegs = [np.frombuffer(data, np.uint8) for data in encode_video(args.source, args.frames)]
    load = [round(v, 2) for v in os.getloadavg()]
    report: Dict[str, Any] = {"frames": len(jpegs), "frame_size": list(_jpeg_size(jpegs[0])),
                              "input_size": list(bundle.input_size), "load_start": load}
    report["ms_per_frame"] = timings(jpegs, bundle.input_size, args.rounds)
    found = detections_per_factor(bundle, jpegs)
    report["detections_full"] = sum(len(d) for d in found[1])
    report["agreement_with_full"] = {}
    for factor in FACTORS[1:]:
        score, corner_px = agreement(found[1], found[factor])
        report["agreement_with_full"][f"1/{factor}"] = {
            "agreement": round(score, 4), "max_box_px": round(max(corner_px, default=0.0), 2),
            "median_box_px": round(statistics.median(corner_px), 2) if corner_px else 0.0}
    report.update(read_cpu_ms(args.source, min(len(jpegs), 60)))
    report["load_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
