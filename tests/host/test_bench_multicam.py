"""The several-cameras bench (host/bench/multicam.py) and the ORT batch bench (batching.py):
parsing, aggregation and target evaluation on made-up figures, and one tiny run of each."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List

import pytest

from device.bench.worker import source_values
from device.errors import JetyoloError
from host import bench
from host.bench import batching, multicam


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_source_counts_are_parsed_sorted_and_checked() -> None:
    assert multicam.parse_counts("4,1,2,2") == [1, 2, 4]
    for bad in ("0,1", "a,2", ""):
        with pytest.raises(JetyoloError, match="--sources"):
            multicam.parse_counts(bad)


def test_window_fps_counts_only_while_every_stream_publishes() -> None:
    # one stream: the steady FPS, (n - 1) / (last - first)
    assert multicam.window_fps([[0.0, 0.5, 1.0, 1.5, 2.0]]) == (2.0, 2.0)
    # the second stream starts late and the first ends early: window 1.0 -> 2.0
    fps, window = multicam.window_fps([[0.0, 0.5, 1.0, 1.5, 2.0], [1.0, 1.5, 2.0, 2.5, 3.0]])
    assert window == 1.0 and fps == pytest.approx((6 - 1) / 1.0)
    assert multicam.window_fps([[0.0, 1.0], [2.0, 3.0]]) == (None, 0.0)  # never together
    assert multicam.window_fps([[0.0, 1.0], []]) == (None, 0.0)


def worker_result(frames: int, rss: float, cpu_ms: float, walls: Dict[str, List[float]],
                  latency: Dict[str, List[float]]) -> Dict[str, Any]:
    return {"frames": frames, "peak_rss_mib": rss, "process_cpu_ms_per_frame": cpu_ms,
            "result_walls": walls, "capture_to_publish_ms": latency}


def test_run_figures_sum_processes_and_keep_sources_apart() -> None:
    results = [worker_result(4, 200.0, 10.0, {"cam0": [0.0, 1.0, 2.0, 3.0]}, {"cam0": [5, 6]}),
               worker_result(2, 300.0, 40.0, {"cam1": [1.0, 2.0]}, {"cam1": [7]})]
    figures = multicam.run_figures(results, served=9)
    assert figures["processes"] == 2 and figures["frames"] == 6
    assert figures["rss_mib"] == 500.0
    assert figures["cpu_ms_per_frame"] == pytest.approx((4 * 10 + 2 * 40) / 6)
    assert figures["fps"] == pytest.approx((4 - 1) / 1.0)  # window 1.0 -> 2.0: 4 results
    assert figures["latency_samples_ms"] == {"cam0": [5, 6], "cam1": [7]}
    assert figures["frames_served"] == 9


def test_summary_takes_medians_and_the_worst_sources_p99() -> None:
    runs = [{"processes": 1, "fps": fps, "frames": 10, "rss_mib": rss, "cpu_ms_per_frame": 5.0,
             "frames_served": None,
             "latency_samples_ms": {"cam0": [10.0] * 99 + [20.0], "cam1": [30.0] * 100}}
            for fps, rss in ((10.0, 100.0), (30.0, 300.0), (20.0, 200.0))]
    summary = multicam.summarize(runs)
    assert summary["fps"] == 20.0 and summary["rss_mib"] == 200.0
    assert summary["fps_per_run"] == [10.0, 30.0, 20.0] and summary["frames_served"] is None
    assert summary["latency_ms"]["cam1"] == {"p50": 30.0, "p99": 30.0}
    assert summary["p99_max_ms"] == 30.0


def figures(fps: float, rss: float, p99: float) -> Dict[str, float]:
    return {"fps": fps, "rss_mib": rss, "p99_max_ms": p99}


def test_targets_pass_and_miss_at_each_count() -> None:
    summary = {
        "file/one-4": figures(40.0, 300.0, 0), "file/procs-4": figures(30.0, 1000.0, 0),
        "file/procs1t-4": figures(41.0, 900.0, 0),
        "live/one-4": figures(30.0, 300.0, 90.0), "live/procs-1": figures(30.0, 250.0, 40.0),
    }
    checks = {check.key: check for check in bench.check_targets(
        summary, multicam.targets([1, 4], live=True))}
    assert set(checks) == {"fps_vs_default_4", "fps_vs_one_thread_4", "rss_4", "live_p99_4"}
    assert checks["fps_vs_default_4"].status == "PASS"  # 40 / 30 = 1.33 >= 1.3
    assert checks["fps_vs_one_thread_4"].status == "MISS"  # 40 / 41 < 1.0
    assert checks["rss_4"].status == "PASS" and checks["rss_4"].value == pytest.approx(0.3)
    assert checks["live_p99_4"].status == "MISS"  # 90 / 40 = 2.25 > 2
    assert checks["live_p99_4"].value == pytest.approx(2.25)


def test_the_batched_process_is_compared_with_the_unbatched_one() -> None:
    summary = {"file/one-4": {"fps": 30.0}, "file/one1-4": {"fps": 24.0},
               "file/one-2": {"fps": 20.0}}
    rows = multicam.target_rows([], summary)
    assert rows[2:] == ["| file, 4 sources: batched / unbatched one process, aggregate FPS | "
                        "1.250 | - | info |"]


def test_targets_without_a_single_source_baseline_have_no_live_check() -> None:
    keys = [target.key for target in multicam.targets([2, 4], live=True)]
    assert "live_p99_2" not in keys and "rss_2" in keys and "fps_vs_default_4" in keys
    assert multicam.targets([1], live=True) == []


def test_configurations_and_the_childrens_commands(tmp_path: Path) -> None:
    assert multicam.configurations(1, batched=False) == ["procs", "procs1t"]
    assert multicam.configurations(1, batched=True) == ["one", "procs", "procs1t"]
    assert multicam.configurations(4, batched=False) == ["one", "procs", "procs1t"]
    assert multicam.configurations(4, batched=True) == ["one", "one1", "procs", "procs1t"]
    settings = multicam.MulticamSettings(
        bundle=Path("b1"), counts=[2], videos=[Path("v.mp4")], frames=30, runs=1, out=tmp_path,
        multi_bundle=Path("b4"), batch_size=4)
    (one,) = multicam.jobs_for(settings, "file", "one", 2, ["a.mp4", "b.mp4"], tmp_path)
    command = one[0]
    assert command[command.index("--bundle") + 1] == "b4"
    assert command[command.index("--frames") + 1] == "60"  # 30 per source, 2 sources
    assert command[command.index("--batch-size") + 1] == "4"
    assert [command[i + 1] for i, arg in enumerate(command) if arg == "--name"] == ["cam0", "cam1"]
    ((unbatched, _, _),) = multicam.jobs_for(settings, "file", "one1", 2, ["a", "b"], tmp_path)
    assert unbatched[unbatched.index("--bundle") + 1] == "b1" and "--batch-size" not in unbatched
    singles = multicam.jobs_for(settings, "live", "procs1t", 2, ["u0", "u1"], tmp_path)
    assert len(singles) == 2
    for index, (single, _, _) in enumerate(singles):
        assert single[single.index("--bundle") + 1] == "b1" and "--batch-size" not in single
        assert single[single.index("--source") + 1] == f"u{index}"
        assert single[single.index("--threads") + 1] == "1"
        assert single[single.index("--infer-workers") + 1] == "1"


def test_the_schedule_rotates_per_run(tmp_path: Path) -> None:
    settings = multicam.MulticamSettings(bundle=Path("b"), counts=[1, 2], videos=[], frames=5,
                                         runs=2, out=tmp_path, live_fps=30.0)
    first, second = multicam.schedule(settings, 0), multicam.schedule(settings, 1)
    assert len(first) == 2 * (2 + 3) and sorted(first) == sorted(second)
    assert second == first[1:] + first[:1]


def test_the_worker_names_one_or_several_sources() -> None:
    assert source_values(["a.mp4"], ["cam0"]) == {"source": "a.mp4", "source_name": "cam0"}
    assert source_values(["a.mp4"], []) == {"source": "a.mp4", "source_name": None}
    assert source_values(["a", "b"], ["x", "y"]) == {
        "sources": [{"source": "a", "name": "x"}, {"source": "b", "name": "y"}]}
    with pytest.raises(JetyoloError, match="--name given 1 times for 2"):
        source_values(["a", "b"], ["x"])


def test_bad_combinations_are_refused(bundle_dir: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    cases = [
        ((str(bundle_dir), "--sources", "1,2", "--ort-batch"), "one at a time"),
        ((str(bundle_dir), "--source", "v.mp4", "--batch-size", "4"), "go with --sources"),
        ((str(bundle_dir), "--sources", "1", "--threads", "2"), "drop --threads"),
        ((str(bundle_dir), str(bundle_dir), "--sources", "1"), "one BUNDLE"),
        ((str(bundle_dir), "--sources", "0"), "at least 1"),
        ((str(bundle_dir), "--sources", "1", "--source", str(tmp_path / "no.mp4")),
         "no such video"),
        ((str(bundle_dir), str(bundle_dir), "--ort-batch"), "one bundle per batch size"),
    ]
    for argv, message in cases:
        with pytest.raises(JetyoloError, match=message):
            bench.run(parse(*argv, "--out", out))
    assert not (tmp_path / "out" / "raw").exists()  # nothing measured


def test_per_image_rows_compare_with_batch_one() -> None:
    rows = batching.per_image_rows({2: {1: [10.0, 12.0, 11.0], 4: [8.0, 9.0, 8.5]}, 1: {2: [5.0]}})
    by_key = {(row["threads"], row["batch"]): row for row in rows}
    assert by_key[(2, 1)]["ms_per_image"] == 11.0 and by_key[(2, 1)]["speedup_vs_batch1"] == 1.0
    assert by_key[(2, 4)]["speedup_vs_batch1"] == pytest.approx(11.0 / 8.5)
    assert by_key[(1, 2)]["speedup_vs_batch1"] is None  # no batch-1 bundle at 1 thread


def test_a_tiny_multicam_run_writes_its_report(
    bundle_dir: Path, synth_video: Path, tmp_path: Path
) -> None:
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n")
    args = parse(str(bundle_dir), "--sources", "1,2", "--source", str(synth_video),
                 "--frames", "6", "--runs", "1", "--live", "15", "--out", str(tmp_path / "out"),
                 "--append-md", str(md))
    assert bench.run(args) == 0
    report = json.loads((tmp_path / "out" / "multicam.json").read_text())
    assert set(report["configurations"]) == {
        f"{phase}/{config}" for phase in ("file", "live")
        for config in ("procs-1", "procs1t-1", "one-2", "procs-2", "procs1t-2")}
    one = report["configurations"]["file/one-2"]
    assert one["processes"] == 1 and one["frames"] == 12 and set(one["latency_ms"]) == {
        "cam0", "cam1"}
    assert report["configurations"]["file/procs-2"]["processes"] == 2
    assert report["configurations"]["live/one-2"]["frames_served"] >= 12
    assert {check["key"] for check in report["targets"]} == {
        "fps_vs_default_2", "fps_vs_one_thread_2", "rss_2", "live_p99_2"}
    statuses = {check["key"]: check["status"] for check in report["targets"]}
    assert statuses["rss_2"] in ("PASS", "MISS") and statuses["live_p99_2"] in ("PASS", "MISS")
    # 6 frames: two processes may not publish at the same time on a busy machine (no window)
    assert statuses["fps_vs_default_2"] in ("PASS", "MISS", "n/a")
    text = md.read_text()
    assert "### jetyolo bench --sources" in text
    assert "| file | 2 | one process, N sources | 1 |" in text
    assert "- Load: `" in text and "- Command: `" in text


def test_a_tiny_ort_batch_run(bundle_dir: Path, tmp_path: Path) -> None:
    args = parse(str(bundle_dir), "--ort-batch", "--threads", "1", "--frames", "2", "--runs",
                 "2", "--out", str(tmp_path))
    assert bench.run(args) == 0
    report = json.loads((tmp_path / "ort_batch.json").read_text())
    (row,) = report["rows"]
    assert row["threads"] == 1 and row["batch"] == 1 and row["speedup_vs_batch1"] == 1.0
    assert len(row["runs_ms"]) == 2 and row["ms_per_image"] > 0


def test_a_batched_bench_judges_the_unbatched_process_too() -> None:
    keys = [target.key for target in multicam.targets([1, 4], live=True, batched=True)]
    assert keys[-2:] == ["rss_unbatched_4", "live_p99_unbatched_4"]
    summary = {"file/one1-4": {"rss_mib": 300.0}, "file/procs-4": {"rss_mib": 800.0},
               "live/one1-4": {"p99_max_ms": 90.0}, "live/procs-1": {"p99_max_ms": 40.0}}
    checks = {check.key: check.status for check in bench.check_targets(
        summary, multicam.unbatched_targets(4, live=True))}
    assert checks == {"rss_unbatched_4": "PASS", "live_p99_unbatched_4": "MISS"}  # 0.375, 2.25
