"""``jetyolo run --http``: the endpoint of a real run. Metrics against the run's own counters,
loopback by default (checked with ``ss``), refusals in one line, 401s, no stream or broker
credentials anywhere it serves, and a file run that ends closes the endpoint."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from http_camera import MjpegCamera  # tests/ is on sys.path (tests/device/conftest.py)
from mqtt_broker import MosquittoBroker, mosquitto_available
from polling import wait_until
from prometheus_client.parser import text_string_to_metric_families
from test_run_e2e import Collect

from device.config import config_from_mapping
from device.errors import JetyoloError
from device.ops.extension import http_extensions
from device.setup import run_configured

SERVING = re.compile(r"http: serving (http://(\S+):(\d+))")
STOP_AT_FRAME = 12


def get(host: str, port: int, path: str, headers: Optional[Dict[str, str]] = None
        ) -> Tuple[int, Dict[str, str], bytes]:
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def samples(text: bytes) -> Dict[Tuple[str, Tuple[Tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_match_the_run_counters_frame_for_frame(
    bundle_dir: Path, synth_video: Path
) -> None:
    """At frame N the publishing thread stops and scrapes: the pipeline's counters are frozen,
    so every figure must be exactly the run's."""
    config = config_from_mapping({"bundle": str(bundle_dir), "source": str(synth_video),
                                  "backend": "onnxruntime", "http": "127.0.0.1:0"})
    (extension,) = http_extensions(config)
    scraped: Dict[str, Any] = {}

    def probe(pipeline: Any, _config: Any, _stack: Any) -> None:
        def at_frame(_image: Any, _result: Any) -> None:
            counters = pipeline.counters()
            if counters["frames"] == STOP_AT_FRAME:
                host, port = extension.endpoint.address
                scraped["counters"] = counters
                scraped["latencies"] = pipeline.stats.count
                scraped["metrics"] = samples(get(host, port, "/metrics")[2])

        pipeline.add_frame_observer(at_frame)  # after the endpoint's observer: it has counted

    sinks = Collect()
    summary = run_configured(config, sinks=sinks, extensions=[extension, probe],
                             handle_signals=False)
    assert summary.frames == len(sinks.results) == 40
    metrics, counters = scraped["metrics"], scraped["counters"]
    source = (("source", counters["source"]),)
    assert metrics[("jetyolo_frames_total", source)] == counters["frames"] == STOP_AT_FRAME
    assert metrics[("jetyolo_dropped_frames_total", source)] == counters["dropped_frames"]
    assert metrics[("jetyolo_decode_errors_total", source)] == counters["decode_errors"]
    assert metrics[("jetyolo_reconnects_total", source)] == counters["reconnects"]
    for stage in ("capture", "preprocess", "infer", "postprocess", "total"):
        key = ("jetyolo_stage_latency_seconds_count", (*source, ("stage", stage)))
        assert metrics[key] == scraped["latencies"] == STOP_AT_FRAME, stage
    assert metrics[("jetyolo_inference_batch_size_count", ())] == STOP_AT_FRAME
    assert 0 <= metrics[("jetyolo_seconds_since_last_frame", source)] < 5
    info = [labels for name, labels in metrics if name == "jetyolo_model_info"]
    assert dict(info[0])["backend"] == "onnxruntime"
    # the endpoint went away with the run
    with pytest.raises(OSError):
        get(*extension.endpoint.address, "/healthz")


ZONE = [[96, 60], [864, 60], [864, 480], [96, 480]]  # frame pixels of the 960x540 video
ELSEWHERE = [[48, 30], [912, 30], [912, 510], [48, 510]]  # no zone there


def outline_share(jpeg: bytes, polygon: List[List[int]], frame_width: int) -> float:
    """The share of points along ``polygon``'s edges (scaled to the preview) where the preview
    is near white in a 3x3 neighbourhood: the zone outline's colour, absent from the video."""
    import cv2
    import numpy as np

    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    white = cv2.dilate((image.min(axis=2) > 180).astype(np.uint8), np.ones((3, 3), np.uint8))
    scale = image.shape[1] / frame_width
    corners = np.array(polygon, float) * scale
    hits = []
    for start, end in zip(corners, np.roll(corners, -1, axis=0)):
        for t in np.linspace(0.05, 0.95, 40):  # away from the corners (the zone's label)
            x, y = np.round(start + (end - start) * t).astype(int)
            hits.append(bool(white[y, x]))
    return sum(hits) / len(hits)


def test_the_preview_outlines_the_tracking_zones(bundle_dir: Path, synth_video: Path) -> None:
    """``jetyolo run``'s preview draws the configured zones (the tracking step's own, with its
    counts), fetched over HTTP while the run runs."""
    config = config_from_mapping({
        "bundle": str(bundle_dir), "source": str(synth_video), "backend": "onnxruntime",
        "http": "127.0.0.1:0", "tracker": "bytetrack",
        "tracking": {"zones": {"door": {"polygon": ZONE}}}})
    (extension,) = http_extensions(config)
    fetched: Dict[str, Any] = {}

    def probe(pipeline: Any, _config: Any, _stack: Any) -> None:
        def at_frame(_image: Any, result: Any) -> None:
            if result.frame_index == 3:  # ask, and hold this frame until the request watches
                host, port = extension.endpoint.address
                fetched["thread"] = threading.Thread(target=lambda: fetched.update(
                    reply=get(host, port, "/preview/synth.jpg")))
                fetched["thread"].start()
                assert wait_until(lambda: extension.endpoint.view.previews.watched("synth"), 30)
            elif result.frame_index == 4:  # frame 4 was offered: let the reply go out first
                fetched["thread"].join(30)

        pipeline.add_frame_observer(at_frame)

    run_configured(config, sinks=Collect(), extensions=[extension, probe], handle_signals=False)
    status, _, jpeg = fetched["reply"]
    assert status == 200 and jpeg[:2] == b"\xff\xd8"
    assert outline_share(jpeg, ZONE, 960) > 0.8
    assert outline_share(jpeg, ELSEWHERE, 960) < 0.2  # the measure finds no outline elsewhere


# ---- the verb, as a process -------------------------------------------------------------------


class RunningJetyolo:
    """``jetyolo run ARGS`` as a process; stderr is drained by a thread (a full pipe would
    block the run) and searched for the endpoint's address."""

    def __init__(self, args: List[str], cwd: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "device.cli", "run", *args], cwd=cwd,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: List[str] = []
        self.address: Optional[Tuple[str, int]] = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            match = SERVING.search(line)
            if match and self.address is None:
                self.address = (match.group(2).strip("[]"), int(match.group(3)))

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(5)
        return self.process.returncode


@contextlib.contextmanager
def jetyolo_run(args: List[str], cwd: Path) -> Iterator[Tuple[RunningJetyolo, str, int]]:
    """Yields (run, host, port) once the endpoint serves; SIGTERM at the end, exit 0 checked."""
    run = RunningJetyolo(args, cwd)
    try:
        served = wait_until(lambda: run.address is not None or run.process.poll() is not None,
                            timeout=120)
        if not served or run.address is None:
            pytest.fail("jetyolo run did not start its endpoint:\n" + run.log())
        yield run, run.address[0], run.address[1]
    finally:
        status = run.stop()
    assert status == 0, run.log()


def listeners(port: int) -> List[str]:
    """Local addresses listening on ``port``, from ``ss -ltn``."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout
    return [line.split()[3] for line in out.splitlines() if line.strip()]


needs_ss = pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) is missing")


@needs_ss
@pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")
def test_loopback_by_default_and_no_credentials_shown(
    bundle_dir: Path, tmp_path: Path
) -> None:
    camera = MjpegCamera()
    stream = camera.url.replace("http://", "http://viewer:cam-secret-1@")
    with MosquittoBroker(tmp_path / "broker", users={"dev": "mqtt-secret-2"}) as broker:
        args = [str(bundle_dir), "--source", stream, "--backend", "onnxruntime",
                "--sink", f"mqtt://dev:mqtt-secret-2@127.0.0.1:{broker.port}",
                "--spool-dir", str(tmp_path / "spool"), "--stats-interval-s", "0.5",
                "--http", "0"]  # a bare port: loopback, any free port
        with jetyolo_run(args, tmp_path) as (_run, host, port):
            assert host == "127.0.0.1"
            assert listeners(port) == [f"127.0.0.1:{port}"]
            assert wait_until(lambda: get(host, port, "/api/stats")[0] == 200, timeout=30)
            assert wait_until(lambda: get(host, port, "/healthz")[0] == 200, timeout=30)
            served = [get(host, port, path)[2] for path in
                      ("/", "/api/stats", "/metrics", "/healthz", "/preview/127.0.0.1.jpg")]
            stats = json.loads(served[1])
            assert stats["source"] == "127.0.0.1" and stats["frames"] > 0
            assert served[4][:2] == b"\xff\xd8"  # the stream's preview
            for body in served:
                assert b"cam-secret-1" not in body and b"mqtt-secret-2" not in body
            assert b"viewer:" not in served[0] and b"dev:" not in served[2]
    camera.close()


def test_a_non_loopback_address_without_credentials_is_one_line(
    bundle_dir: Path, synth_video: Path, tmp_path: Path
) -> None:
    for extra in ([], ["--http-allow-remote", "true"]):
        done = subprocess.run(
            [sys.executable, "-m", "device.cli", "run", str(bundle_dir), "--source",
             str(synth_video), "--backend", "onnxruntime", "--http", "0.0.0.0:0", *extra],
            cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("jetyolo: error: http: 0.0.0.0:0"), lines
        assert "http_token_file" in lines[0]
        assert "pipeline" not in done.stderr and done.stdout == ""  # refused before anything ran


def test_refusals_happen_before_the_run_opens_anything(tmp_path: Path) -> None:
    config = config_from_mapping({"bundle": str(tmp_path / "none"), "source": "x.mp4",
                                  "http": "192.168.0.2:8080"})
    with pytest.raises(JetyoloError, match="not a loopback address"):
        http_extensions(config)
    assert http_extensions(config_from_mapping({"bundle": "b", "source": "s"})) == []


@needs_ss
def test_remote_bind_with_a_token_file_needs_the_token(
    bundle_dir: Path, tmp_path: Path
) -> None:
    camera = MjpegCamera()
    token = tmp_path / "token"
    token.write_text("tok-3\n")
    token.chmod(0o600)
    args = [str(bundle_dir), "--source", camera.url, "--backend", "onnxruntime",
            "--sink", f"jsonl:{tmp_path / 'out.jsonl'}", "--spool-dir", str(tmp_path / "spool"),
            "--http", "0.0.0.0:0", "--http-allow-remote", "true",
            "--http-token-file", str(token)]
    with jetyolo_run(args, tmp_path) as (run, _host, port):
        assert listeners(port) == [f"0.0.0.0:{port}"]
        status, headers, body = get("127.0.0.1", port, "/metrics",
                                    {"Authorization": "Bearer tok-4"})
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert b"tok-3" not in body
        assert get("127.0.0.1", port, "/")[0] == 401
        basic = "Basic " + base64.b64encode(b"x:tok-3").decode()
        assert get("127.0.0.1", port, "/healthz", {"Authorization": basic})[0] == 401
        ok = get("127.0.0.1", port, "/metrics", {"Authorization": "Bearer tok-3"})
        assert ok[0] == 200 and b"jetyolo_frames_total" in ok[2]
        assert "tok-3" not in " ".join(map(str, run.process.args))  # never on the command line
        assert "tok-3" not in run.log()
    camera.close()


def test_the_example_config_http_lines_are_valid_settings() -> None:
    """The commented-out http/homeassistant lines of systemd/config.example.yaml, uncommented,
    are accepted keys and values (off by default: commented out)."""
    import yaml

    from device.config import checked_values

    text = (Path(__file__).resolve().parents[2] / "systemd/config.example.yaml").read_text()
    lines = [line[2:] for line in text.splitlines()
             if re.match(r"# (http|homeassistant)\w*: ", line)]
    values = yaml.safe_load("\n".join(lines))
    assert {"http", "http_allow_remote", "http_token_file", "homeassistant"} <= set(values)
    checked = checked_values(values, "config.example.yaml")
    assert checked["http"] == "127.0.0.1:8080" and checked["http_allow_remote"] is False
    assert "http" not in yaml.safe_load(text)  # off by default


def test_the_example_config_several_cameras_block_is_valid_settings() -> None:
    """The commented-out sources/batch block of systemd/config.example.yaml, uncommented, is a
    valid config (three cameras, per-camera overrides, a batch)."""
    import yaml

    from device.config import config_from_mapping

    text = (Path(__file__).resolve().parents[2] / "systemd/config.example.yaml").read_text()
    lines = text.splitlines()
    start = lines.index("# sources:")
    block = [line[2:] for line in lines[start:] if line.startswith("# ")]
    block = block[:next(i for i, line in enumerate(block) if line.startswith("batch_timeout_ms"))
                  + 1]
    config = config_from_mapping({"bundle": "b", **yaml.safe_load("\n".join(block))})
    assert [entry.name for entry in config.sources or []] == [None, "door", "yard"]
    assert config.batch_size == 3 and (config.sources or [])[2].overrides["report"] == "non-empty"
