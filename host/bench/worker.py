"""The ultralytics child of ``jetyolo bench``: what users run instead of jetyolo.

::

    python -m host.bench.worker --model M.onnx --source V --frames N --imgsz 640 --result R.json

Runs ``YOLO(M).predict(source=V, stream=True)`` on the CPU with the same thresholds, image size
and thread count as the jetyolo contenders, in a fresh process so peak RSS and cold start
(process start -> first result, torch and ultralytics imports included) are its own.

Threads: ultralytics opens its ONNX Runtime session without session options, so the session
class is wrapped to set ``intra_op_num_threads`` (and sequential execution, as jetyolo's backend
does). Torch (ultralytics' pre/post-processing and NMS) and OpenCV keep the thread counts
ultralytics itself sets on a CPU device (``torch.set_num_threads(cpu_count - 1)``,
``cv2.setNumThreads(0)``): that is what its users get.

Pre+post CPU time is ``time.thread_time`` summed around the predictor's own ``preprocess`` and
``postprocess`` methods; ``results.speed`` (wall ms per stage,
ultralytics' own figures) is recorded per frame too.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from device.argtypes import finite_float
from device.bench.common import (
    CpuTimer,
    common_result,
    process_cpu_s,
    run_worker,
    stage_cpu_ms,
    start_time,
    steady_cpu_ms_per_frame,
    steady_fps,
    steady_seconds,
    write_result,
)

T0 = start_time()

from device.errors import JetyoloError  # noqa: E402
from host._env import ultralytics_offline  # noqa: E402

SPEED_STAGES = {"preprocess": "preprocess", "inference": "infer", "postprocess": "postprocess"}


def limit_threads(threads: Optional[int]) -> None:
    """Give ultralytics' ONNX Runtime session ``threads`` intra-op threads (None: ORT's default)."""
    if threads is None:
        return
    import onnxruntime as ort

    original = ort.InferenceSession

    class ThreadLimitedSession(original):  # type: ignore[misc, valid-type]
        def __init__(self, path: Any, sess_options: Any = None, *args: Any, **kwargs: Any):
            options = sess_options or ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            super().__init__(path, options, *args, **kwargs)

    ort.InferenceSession = ThreadLimitedSession


def ort_threading_label(model: Path, threads: Optional[int]) -> Optional[str]:
    """What ultralytics' ONNX Runtime session runs with (its own options: spinning on)."""
    if Path(model).suffix != ".onnx":
        return None
    return f"{threads or 'ORT default'} thread(s), spinning on"


def device_for(model: Path) -> Any:
    """An ultralytics TensorRT ``.engine`` (the fair contender on a Jetson) runs on GPU 0."""
    return 0 if model.suffix == ".engine" else "cpu"


def measure_ultralytics(args: argparse.Namespace) -> Dict[str, Any]:
    ultralytics_offline("bench")
    imports_done = time.time()
    limit_threads(args.threads)
    from ultralytics import YOLO

    model = YOLO(str(args.model), task="detect")
    stream: Any = model.predict(
        source=str(args.source), stream=True, imgsz=args.imgsz, conf=args.conf, iou=args.iou,
        max_det=args.max_det, device=device_for(args.model), half=False, verbose=False,
    )
    pre, post = CpuTimer(), CpuTimer()
    predictor: Any = model.predictor
    predictor.preprocess = pre.wrap(predictor.preprocess)
    predictor.postprocess = post.wrap(predictor.postprocess)
    result_times: List[float] = []
    speeds: Dict[str, List[float]] = {stage: [] for stage in SPEED_STAGES.values()}
    detections = 0
    first_result_wall: Optional[float] = None
    result_cpu: List[float] = []
    for prediction in stream:
        result_times.append(time.perf_counter())
        result_cpu.append(process_cpu_s())
        if first_result_wall is None:
            first_result_wall = time.time()
        for key, stage in SPEED_STAGES.items():
            speeds[stage].append(round(float(prediction.speed.get(key, float("nan"))), 3))
        detections += len(prediction.boxes)
        if len(result_times) >= args.frames:
            break
    stream.close()
    frames = len(result_times)
    if frames == 0:
        raise JetyoloError(f"ultralytics produced no result for {args.source}")
    gaps = [round((b - a) * 1000.0, 3) for a, b in zip(result_times, result_times[1:])]
    seconds = steady_seconds(result_times)
    result = common_result("ultralytics", frames, seconds, steady_cpu_ms_per_frame(result_cpu),
                           imports_done - T0)
    cpu_ms = stage_cpu_ms(pre.seconds, post.seconds, frames)
    result.update(
        fps=steady_fps(result_times),
        cold_start_s=(first_result_wall or time.time()) - T0,
        samples_ms={**speeds, "total": gaps},
        prepost_cpu_ms_per_frame=cpu_ms["prepost"],
        stage_cpu_ms_per_frame=cpu_ms,
        detections=detections,
        backend="ultralytics-onnxruntime",
        model=str(args.model),
        graph=f"ultralytics:{Path(args.model).name}",
        threading=ort_threading_label(args.model, args.threads),
    )
    return result


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m host.bench.worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="single-output YOLO ONNX")
    parser.add_argument("--source", required=True, help="video file or stream URL")
    parser.add_argument("--frames", type=int, required=True)
    parser.add_argument("--imgsz", type=lambda text: [int(side) for side in text.split(",")],
                        required=True, help="the bundle's input: SIDE or HEIGHT,WIDTH")
    parser.add_argument("--conf", type=finite_float, default=0.25)
    parser.add_argument("--iou", type=finite_float, default=0.45)
    parser.add_argument("--max-det", type=int, default=300)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--result", type=Path, required=True, help="JSON file to write")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    result = measure_ultralytics(args)
    return write_result(args.result, "ultralytics", result, args.threads)


if __name__ == "__main__":
    run_worker(main)
