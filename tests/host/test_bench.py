"""`jetyolo bench`: the ratio/target logic, aggregation, trtexec parsing, and end-to-end runs on a
tiny input that must write a well-formed result. No timing is asserted: benchmarks are not tests.
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest

from device.choice import ort_threading
from device.errors import JetyoloError
from host import bench
from host.bench import report as bench_report
from host.bench import trt as bench_trt


def summary(**overrides: Dict[str, float]) -> Dict[str, Dict[str, Any]]:
    """Per-contender medians that meet every target; ``overrides`` replace single figures."""
    figures: Dict[str, Dict[str, Any]] = {
        "ceiling": {"fps": 100.0},
        "pipeline": {"fps": 95.0, "prepost_cpu_ms_per_frame": 1.0, "peak_rss_mib": 200.0,
                     "cold_start_s": 1.0},
        "ultralytics": {"fps": 50.0, "prepost_cpu_ms_per_frame": 5.0, "peak_rss_mib": 800.0,
                        "cold_start_s": 8.0},
    }
    for contender, values in overrides.items():
        figures[contender] = {**figures[contender], **values}
    return figures


def statuses(figures: Dict[str, Dict[str, Any]]) -> Dict[str, str]:
    return {check.key: check.status for check in bench.check_targets(figures)}


@pytest.mark.parametrize(
    ("overrides", "missed"),
    [
        ({}, []),  # everything within target
        ({"pipeline": {"fps": 80.0}}, ["fps_vs_ceiling"]),  # 0.80 < 0.9 of the ceiling
        ({"ultralytics": {"fps": 70.0}}, ["fps_vs_ultralytics"]),  # 95/70 = 1.36 < 1.5
        ({"pipeline": {"prepost_cpu_ms_per_frame": 1.5}}, ["prepost_cpu_vs_ultralytics"]),
        ({"pipeline": {"peak_rss_mib": 400.0}}, ["rss_vs_ultralytics"]),  # 0.5 > 0.4
        ({"pipeline": {"cold_start_s": 3.0}}, ["cold_start_vs_ultralytics"]),  # 0.375 > 0.3
        # a slow pipeline misses both FPS targets at once
        ({"pipeline": {"fps": 60.0}}, ["fps_vs_ceiling", "fps_vs_ultralytics"]),
    ],
)
def test_targets_pass_and_miss(overrides: Dict[str, Dict[str, float]], missed: List[str]) -> None:
    result = statuses(summary(**overrides))
    assert sorted(key for key, status in result.items() if status == "MISS") == sorted(missed)
    assert all(status == "PASS" for key, status in result.items() if key not in missed)


def test_a_ratio_on_the_bound_passes() -> None:
    # exactly 0.9x the ceiling and exactly 0.25x ultralytics' CPU meet the targets
    figures = summary(pipeline={"fps": 90.0, "prepost_cpu_ms_per_frame": 1.25})
    assert statuses(figures)["fps_vs_ceiling"] == "PASS"
    assert statuses(figures)["prepost_cpu_vs_ultralytics"] == "PASS"


def test_targets_without_ultralytics_are_not_applicable() -> None:
    figures = summary()
    del figures["ultralytics"]
    result = statuses(figures)
    assert result["fps_vs_ceiling"] == "PASS"
    assert {result[key] for key in result if key != "fps_vs_ceiling"} == {"n/a"}


def test_ratio_value() -> None:
    checks = {c.key: c for c in bench.check_targets(summary())}
    assert checks["fps_vs_ceiling"].value == pytest.approx(0.95)
    assert checks["rss_vs_ultralytics"].value == pytest.approx(0.25)


def test_aggregate_takes_medians_and_pools_samples() -> None:
    runs = [
        {"frames": 3, "fps": fps, "seconds": 1.0, "cold_start_s": cold, "peak_rss_mib": 100.0,
         "samples_ms": {"infer": samples}}
        for fps, cold, samples in ((10.0, 3.0, [1.0, 2.0]), (30.0, 1.0, [3.0]),
                                   (20.0, 2.0, [4.0, 5.0]))
    ]
    figures = bench.aggregate(runs)
    assert figures["fps"] == 20.0 and figures["cold_start_s"] == 2.0
    assert figures["fps_per_run"] == [10.0, 30.0, 20.0]
    assert figures["latency_ms"]["infer"]["p50"] == pytest.approx(3.0)
    expected_p99 = np.percentile([1, 2, 3, 4, 5], 99)
    assert figures["latency_ms"]["infer"]["p99"] == pytest.approx(expected_p99)
    assert figures["prepost_cpu_ms_per_frame"] is None  # not measured: not invented


TRTEXEC_OUTPUT = """\
[11/24/2026-10:00:00] [I] === Performance summary ===
[11/24/2026-10:00:00] [I] Throughput: 412.5 qps
[11/24/2026-10:00:00] [I] Latency: min = 2.1 ms, max = 3.5 ms, mean = 2.4 ms, median = 2.35 ms, \
percentile(90%) = 2.6 ms, percentile(95%) = 2.7 ms, percentile(99%) = 3.1 ms
[11/24/2026-10:00:00] [I] Enqueue Time: min = 0.5 ms, max = 0.9 ms, mean = 0.6 ms, \
median = 0.6 ms, percentile(99%) = 0.8 ms
[11/24/2026-10:00:00] [I] GPU Compute Time: min = 1.9 ms, max = 3.0 ms, mean = 2.2 ms, \
median = 2.15 ms, percentile(99%) = 2.9 ms
[11/24/2026-10:00:00] [I] Total Host Walltime: 3.0 s
"""


def test_parse_trtexec_summary() -> None:
    figures = bench_trt.parse_trtexec(TRTEXEC_OUTPUT)
    assert figures["throughput_qps"] == 412.5
    assert figures["gpu_compute_time_ms"]["median"] == 2.15
    assert figures["latency_ms"]["percentile(99%)"] == 3.1
    assert figures["enqueue_time_ms"]["mean"] == 0.6


def test_parse_trtexec_without_a_summary() -> None:
    assert bench_trt.parse_trtexec("[E] Error[1]: engine deserialization failed") == {}


def bench_args(bundle: Path, video: Path, out: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args([str(bundle), "--source", str(video), "--out", str(out), *extra])


def test_bad_source_and_counts_are_refused(bundle_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(JetyoloError, match="no such video file"):
        bench.run(bench_args(bundle_dir, tmp_path / "missing.mp4", tmp_path / "out"))
    video = tmp_path / "v.mp4"
    video.write_bytes(b"not a video")
    with pytest.raises(JetyoloError, match="--runs must be at least 1"):
        bench.run(bench_args(bundle_dir, video, tmp_path / "out", "--runs", "0"))
    assert not (tmp_path / "out").exists()


def test_one_ultralytics_model_for_several_sizes_is_refused(
    bundle_dir: Path, synth_video: Path, tmp_path: Path
) -> None:
    model = tmp_path / "yolo.onnx"
    model.write_bytes(b"x")
    args = bench_args(bundle_dir, synth_video, tmp_path / "out", "--ultralytics-model", str(model))
    args.bundles = [bundle_dir, bundle_dir]
    with pytest.raises(JetyoloError, match="bundle folder names must differ"):
        bench.run(args)
    args.bundles = [bundle_dir, shutil.copytree(bundle_dir, tmp_path / "other")]
    with pytest.raises(JetyoloError, match="one model for one image size"):
        bench.run(args)


def test_a_failing_child_is_reported_with_its_log(
    bundle_dir: Path, synth_video: Path, tmp_path: Path
) -> None:
    # no TensorRT on this machine: the ceiling child exits 2 and its one-line reason comes back
    args = bench_args(bundle_dir, synth_video, tmp_path / "out", "--frames", "2", "--runs", "1",
                      "--backend", "tensorrt", "--no-ultralytics")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here; the child would not fail")
    with pytest.raises(JetyoloError, match=r"ceiling.*failed \(exit 2\).*tensorrt"):
        bench.run(args)
    assert not (tmp_path / "out" / "bench.json").exists()


def test_fps_bound_is_ceiling_over_ultralytics() -> None:
    assert bench_report.fps_bound(summary()) == pytest.approx(2.0)
    assert bench_report.fps_bound({"ceiling": {"fps": 10.0}}) is None


CPU_FIGURES = {
    "ceiling": {"fps": 50.0, "process_cpu_ms_per_frame": 30.0, "decode_cpu_ms_per_frame": 8.0},
    "pipeline": {"prepost_cpu_ms_per_frame": 2.0, "process_cpu_ms_per_frame": 45.0,
                 "infer_cpu_ms_per_frame": 33.0},
}


def test_decode_bound_is_what_the_cores_leave_after_decode_and_prepost() -> None:
    # 2 cores / (30 + 8 + 2) ms = 50 FPS of CPU, the ceiling's own 50 FPS: at most 1.0 of it
    assert bench.decode_bound(CPU_FIGURES, 2) == pytest.approx(1.0)
    # one core: 25 FPS of CPU against a 50 FPS ceiling
    assert bench.decode_bound(CPU_FIGURES, 1) == pytest.approx(0.5)
    # never above 1: the pipeline cannot outrun its own backend call, however many cores
    assert bench.decode_bound(CPU_FIGURES, 8) == 1.0
    no_decode = {**CPU_FIGURES, "ceiling": {"fps": 50.0, "process_cpu_ms_per_frame": 30.0}}
    assert bench.decode_bound(no_decode, 2) is None


def test_cpu_line_splits_the_pipelines_cpu_per_frame() -> None:
    (line, _) = bench_report.cpu_lines({"contenders": CPU_FIGURES})
    assert ("the ceiling's call alone 30.0; the pipeline 45.0 = inference 33.0 + decode 8.0"
            in line) and "pre+post 2.00 + threads, queues and the sink 2.0." in line
    # a 2-thread ONNX Runtime session's inference CPU is not measured: no line, no guess
    unmeasured = {**CPU_FIGURES, "pipeline": {**CPU_FIGURES["pipeline"],
                                              "infer_cpu_ms_per_frame": None}}
    assert bench_report.cpu_lines({"contenders": unmeasured}) == []


def test_bench_writes_json_markdown_and_plot(
    bundle_dir: Path, synth_video: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, md = tmp_path / "out", tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n")
    args = bench_args(bundle_dir, synth_video, out, "--frames", "10", "--runs", "1",
                      "--no-ultralytics", "--append-md", str(md))  # threads: the defaults
    assert bench.run(args) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["settings"]["threads"] is None
    assert {"date", "command", "machine", "load_average_start", "load_average_end",
            "settings", "bundles"} <= set(report)
    assert report["machine"]["cores"] >= 1 and "onnxruntime" in report["machine"]["versions"]
    (record,) = report["bundles"]
    assert record["input_size"] == [320, 320]
    assert set(record["contenders"]) == {"ceiling", "pipeline"}
    pipeline = record["contenders"]["pipeline"]
    assert pipeline["frames"] == 10 and pipeline["fps"] > 0
    assert {"preprocess", "infer", "postprocess", "total"} <= set(pipeline["latency_ms"])
    assert set(pipeline["latency_ms"]["infer"]) == {"p50", "p90", "p99"}
    assert pipeline["peak_rss_mib"] > 0 and pipeline["cold_start_s"] > 0
    assert pipeline["prepost_cpu_ms_per_frame"] > 0
    assert record["contenders"]["ceiling"]["latency_ms"]["infer"]["p50"] > 0
    # the ceiling runs with the pipeline's own session settings: jetyolo run's auto rule
    auto = ort_threading(None, None)
    expected = f"{auto.workers} at once x {auto.threads_per_call or 'ORT default'} thread(s)"
    assert record["contenders"]["ceiling"]["threading"] == expected
    assert pipeline["threading"] == expected
    assert pipeline["latency_ms"]["infer"]["p50"] > 0  # measured around the call, not after it
    ceiling = record["contenders"]["ceiling"]
    assert ceiling["decode_cpu_ms_per_frame"] > 0 and pipeline["infer_cpu_ms_per_frame"] > 0
    assert ceiling["process_cpu_ms_per_frame"] > 0
    assert 0 < record["decode_bound"] <= 1
    assert [t["status"] for t in record["targets"]][1:] == ["n/a"] * 4
    for contender in ("ceiling", "pipeline"):  # device children load no torch/ultralytics/host
        raw = json.loads((out / bundle_dir.name / "raw" / f"{contender}-1.json").read_text())
        assert raw["heavy_modules_loaded"] == []
    text = md.read_text()
    assert text.startswith("# Benchmarks\n") and "## jetyolo bench" in text
    assert "| pipeline | 10 |" in text and "| pipeline FPS / ceiling FPS |" in text
    assert "CPU ms per frame (medians): the ceiling's call alone" in text
    assert "| the most pipeline FPS / ceiling FPS can be while the decode" in text
    assert (f"Graphs: ceiling `onnxruntime:model.onnx` ({expected}), pipeline "
            f"`onnxruntime:model.onnx` ({expected})") in text
    assert "threads: each contender's default" in text
    assert (out / "bench.md").read_text() in text
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "FPS / ceiling FPS" in capsys.readouterr().out


def test_bench_against_ultralytics(bundle_dir: Path, synth_video: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = bench_args(bundle_dir, synth_video, out, "--frames", "5", "--runs", "1",
                      "--threads", "1", "--no-profile", "--plot", str(tmp_path / "p.png"))
    assert bench.run(args) == 0
    (record,) = json.loads((out / "bench.json").read_text())["bundles"]
    ultralytics = record["contenders"]["ultralytics"]
    pipeline = record["contenders"]["pipeline"]
    assert ultralytics["frames"] == 5 and ultralytics["prepost_cpu_ms_per_frame"] > 0
    assert {"preprocess", "infer", "postprocess"} <= set(ultralytics["latency_ms"])
    # same graph, same thresholds: the two find the same objects
    assert ultralytics["detections"] == pytest.approx(pipeline["detections"], abs=2)
    assert all(t["status"] in ("PASS", "MISS") for t in record["targets"])
    raw = json.loads((out / bundle_dir.name / "raw" / "ultralytics-1.json").read_text())
    assert "torch" in raw["heavy_modules_loaded"]  # the check does see heavy imports
    assert "| ceiling FPS / ultralytics FPS" in (out / "bench.md").read_text()
    assert ultralytics["threading"] == "1 thread(s), spinning on"
    assert pipeline["threading"] == "1 at once x 1 thread(s)"  # --threads 1: one call
    assert (tmp_path / "p.png").is_file()


def test_ultralytics_model_is_the_bundle_graph_with_one_output(
    bundle_dir: Path, tmp_path: Path
) -> None:
    import onnx

    from device.bundle import Bundle

    path = bench_report.ultralytics_model_for(Bundle.load(bundle_dir), tmp_path / "u.onnx")
    model = onnx.load(str(path))
    assert [o.name for o in model.graph.output] == ["output0"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["task"] == "detect" and meta["imgsz"] == "[320, 320]"
    assert ast.literal_eval(meta["names"])[0] == "red_circle"  # how ultralytics reads it


def live_summary(service_p50: float, total_p99: float) -> Dict[str, Any]:
    latency = {stage: {"p50": service_p50 / 4} for stage in bench.SERVICE_STAGES}
    return {"pipeline": {"latency_ms": {**latency, "total": {"p99": total_p99}}}}


@pytest.mark.parametrize(("total_p99", "status"), [(20.0, "PASS"), (40.0, "PASS"),
                                                   (41.0, "MISS"), (None, "n/a")])
def test_live_check_is_p99_against_one_frames_service_time(
    total_p99: Any, status: str
) -> None:
    summary = live_summary(20.0, total_p99) if total_p99 else {"pipeline": {"latency_ms": {}}}
    check = bench.live_check(summary)
    assert check.status == status and check.bound == 2.0


def test_the_live_camera_serves_the_video_paced(synth_video: Path) -> None:
    import time

    import cv2

    from host.bench.live import PacedMjpegServer

    first = cv2.VideoCapture(str(synth_video)).read()[1]
    with PacedMjpegServer(synth_video, fps=40.0, frames=5) as camera:
        started = time.perf_counter()  # before connecting: the pace starts at the connection
        capture = cv2.VideoCapture(camera.url, cv2.CAP_FFMPEG)
        ok, image = capture.read()
        for _ in range(8):
            ok = ok and capture.read()[0]
        elapsed = time.perf_counter() - started
        capture.release()
    assert ok and image.shape == first.shape
    assert np.abs(image.astype(int) - first.astype(int)).mean() < 3  # JPEG of the first frame
    assert elapsed >= 8 / 40  # the 9th frame is sent 8 periods after the first (it loops)
    assert camera.sent >= 9
    with pytest.raises(JetyoloError, match="--live must be a frame rate above 0"):
        PacedMjpegServer(synth_video, fps=0, frames=5)
