"""Sources: classification, GStreamer pipeline strings, files ending cleanly, corrupt frames
skipped and counted, live sources reconnecting with back-off."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, List, Optional

import cv2
import numpy as np
import pytest

from device.errors import JetyoloError
from device.sources import (
    APPSINK,
    LiveSource,
    SourceSpec,
    csi_pipeline,
    open_source,
    opencv_has_gstreamer,
    parse_source,
    rtsp_pipeline,
    with_appsink,
)


@pytest.fixture
def media(tmp_path: Path) -> Path:
    (tmp_path / "clip.mp4").write_bytes(b"not really a video")
    (tmp_path / "clip.png").write_bytes(b"not really an image")
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "notes.txt").write_text("no images here")
    return tmp_path


@pytest.mark.parametrize(
    "text, expected",
    [
        # CSI camera through nvarguscamerasrc
        ("csi://1", SourceSpec("csi", "1")),
        # RTSP (and RTSPS)
        ("rtsp://cam.local:554/live", SourceSpec("rtsp", "rtsp://cam.local:554/live")),
        ("rtsps://cam/live", SourceSpec("rtsp", "rtsps://cam/live")),
        # HTTP streams go through FFmpeg
        ("http://cam/video.mjpg", SourceSpec("stream", "http://cam/video.mjpg")),
        # V4L2 by path or by number
        ("/dev/video2", SourceSpec("v4l2", "/dev/video2")),
        ("0", SourceSpec("v4l2", "/dev/video0")),
        # a raw GStreamer pipeline
        (
            "videotestsrc ! videoconvert ! appsink",
            SourceSpec("gstreamer", "videotestsrc ! videoconvert ! appsink"),
        ),
        # a glob of images (nothing has to exist yet)
        ("shots/*.jpg", SourceSpec("images", "shots/*.jpg")),
    ],
)
def test_parse_source(text: str, expected: SourceSpec) -> None:
    assert parse_source(text) == expected


def test_parse_source_files_and_folders(media: Path) -> None:
    assert parse_source(str(media / "clip.mp4")).kind == "file"
    assert parse_source(str(media / "frames")).kind == "images"
    assert parse_source(str(media / "clip.png")).kind == "images"


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "--source is empty"),  # nothing given
        ("csi://front", "CSI sensor id must be a number"),  # csi with a name
        ("/no/such/video.mp4", "does not exist"),  # a typo in a path
    ],
)
def test_parse_source_refusals(text: str, message: str) -> None:
    with pytest.raises(JetyoloError, match=message):
        parse_source(text)


def test_csi_pipeline_string() -> None:
    assert csi_pipeline(0, 1280, 720, 60, flip_method=2) == (
        "nvarguscamerasrc sensor-id=0 ! "
        "video/x-raw(memory:NVMM),width=1280,height=720,framerate=60/1,format=NV12 ! "
        "nvvidconv flip-method=2 ! video/x-raw,format=BGRx ! "
        "videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1 sync=false"
    )


def test_rtsp_pipeline_string_quotes_the_url() -> None:
    pipeline = rtsp_pipeline('rtsp://user:p"w@cam/live?x=1', latency_ms=100)
    assert pipeline.startswith('rtspsrc location="rtsp://user:p\\"w@cam/live?x=1" latency=100 ! ')
    assert "decodebin ! nvvidconv ! video/x-raw,format=BGRx" in pipeline
    assert pipeline.endswith(APPSINK)


def test_with_appsink_adds_a_bgr_appsink_only_when_missing() -> None:
    assert with_appsink("videotestsrc !") == (
        f"videotestsrc ! videoconvert ! video/x-raw,format=BGR ! {APPSINK}"
    )
    assert with_appsink("videotestsrc ! appsink name=x") == "videotestsrc ! appsink name=x"


def write_images(folder: Path, count: int, corrupt: Optional[int] = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        path = folder / f"{index:03d}.png"
        if index == corrupt:
            path.write_bytes(b"\x89PNG broken")
        else:
            cv2.imwrite(str(path), np.full((48, 64, 3), index * 10, np.uint8))


def collect(source_text: str) -> tuple:
    source = open_source(source_text)
    frames = list(source.frames(threading.Event()))
    source.close()
    return frames, source


def test_image_folder_skips_and_counts_a_corrupt_image(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", 5, corrupt=2)
    frames, source = collect(str(tmp_path / "imgs"))
    assert [frame.index for frame in frames] == [0, 1, 3, 4]
    assert [int(frame.image[0, 0, 0]) for frame in frames] == [0, 10, 30, 40]
    assert source.decode_errors == 1 and not source.live
    timestamps = [frame.timestamp for frame in frames]
    assert timestamps == sorted(timestamps) and timestamps[0] > 1.6e9


def test_image_glob(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", 3)
    frames, _ = collect(str(tmp_path / "imgs" / "00[12].png"))
    assert [frame.index for frame in frames] == [0, 1]


def write_mjpeg(path: Path, count: int, corrupt: Optional[int] = None) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10, (64, 48))
    for index in range(count):
        writer.write(np.full((48, 64, 3), index * 20, np.uint8))
    writer.release()
    if corrupt is not None:
        data = bytearray(path.read_bytes())
        starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xD8]
        # zero that frame's JPEG data, keeping the AVI chunk header of the next frame intact
        start, end = starts[corrupt], starts[corrupt + 1] - 16
        data[start:end] = bytes(end - start)
        path.write_bytes(bytes(data))


def test_video_file_ends_cleanly_with_every_frame(tmp_path: Path) -> None:
    write_mjpeg(tmp_path / "ok.avi", 8)
    frames, source = collect(str(tmp_path / "ok.avi"))
    assert [frame.index for frame in frames] == list(range(8))
    assert source.decode_errors == 0


def test_corrupt_frame_mid_file_is_skipped_counted_and_indices_stay_positions(
    tmp_path: Path,
) -> None:
    write_mjpeg(tmp_path / "bad.avi", 8, corrupt=3)
    frames, source = collect(str(tmp_path / "bad.avi"))
    assert [frame.index for frame in frames] == [0, 1, 2, 4, 5, 6, 7]
    assert [round(float(frame.image.mean()) / 20) for frame in frames] == [0, 1, 2, 4, 5, 6, 7]
    assert source.decode_errors == 1


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("clip.mp4", "is corrupt, truncated or not a video"),  # random bytes named .mp4
        ("frames", "has no images"),  # a folder without image files
    ],
)
def test_unopenable_sources_raise_one_clear_error(media: Path, name: str, message: str) -> None:
    with pytest.raises(JetyoloError, match=message) as error:
        open_source(str(media / name))
    assert "check that it exists" not in str(error.value)  # it exists: say what is wrong


def _cut_mp4(path: Path) -> Path:
    """An MP4 as OpenCV writes it (index last), cut in half: what a recording cut short is."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), 10, (64, 48))
    noise = np.random.default_rng(0)  # noise: the frames (mdat) outweigh the index (moov)
    for _ in range(10):
        writer.write(noise.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    writer.release()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b""), "the file is empty"),
        (_cut_mp4, "truncated MP4/MOV: its index is missing (FFmpeg: moov atom not found)"),
        (lambda p: p.write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(300)),
         "truncated MP4/MOV"),  # an MP4 header and nothing after it
        (lambda p: p.write_text("just text"), "corrupt, truncated or not a video"),
    ],
)
def test_a_file_that_is_no_video_says_why(
    tmp_path: Path, make: Callable[[Path], Any], message: str
) -> None:
    path = tmp_path / "clip.mp4"
    make(path)
    with pytest.raises(JetyoloError) as error:
        open_source(str(path))
    assert str(error.value).startswith(f"source {str(path)!r} is not a readable video: ")
    assert message in str(error.value)


def test_ffmpeg_log_lines_stay_off_the_terminal(tmp_path: Path) -> None:
    """FFmpeg writes "moov atom not found" to the process's stderr, past Python's logging."""
    path = _cut_mp4(tmp_path / "cut.mp4")
    code = (f"from device.sources import open_source\n"
            f"try: open_source({str(path)!r})\nexcept Exception: pass")
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_FFMPEG_LOGLEVEL"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "moov atom" not in done.stderr and "WARN" not in done.stderr, done.stderr
    loud = f"from device.sources import quiet_native_logs\nquiet_native_logs(False)\n{code}"
    done = subprocess.run([sys.executable, "-c", loud], capture_output=True, text=True, env=env)
    assert "moov atom not found" in done.stderr  # the same run with --verbose shows it


def test_images_that_all_fail_to_decode_are_an_error(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    for index in range(3):
        (tmp_path / "imgs" / f"{index}.jpg").write_text("not a jpeg")
    source = open_source(str(tmp_path / "imgs"))
    with pytest.raises(JetyoloError, match="none of its 3 images decodes"):
        list(source.frames(threading.Event()))


def test_a_video_with_no_decodable_frame_is_an_error(tmp_path: Path) -> None:
    write_mjpeg(tmp_path / "black.avi", 3)
    data = bytearray((tmp_path / "black.avi").read_bytes())
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xD8]
    for start in starts:  # every frame's JPEG data zeroed, the AVI index intact
        data[start:start + 200] = bytes(200)
    (tmp_path / "black.avi").write_bytes(bytes(data))
    source = open_source(str(tmp_path / "black.avi"))
    with pytest.raises(JetyoloError, match="not one frame of it decodes"):
        list(source.frames(threading.Event()))


class FakeCapture:
    """A camera that delivers ``good`` frames, then fails every read (unplugged)."""

    def __init__(self, opened: bool, good: int) -> None:
        self.opened, self.good, self.released = opened, good, False

    def isOpened(self) -> bool:
        return self.opened

    def read(self) -> tuple:
        if self.good <= 0:
            return False, None
        self.good -= 1
        return True, np.zeros((4, 4, 3), np.uint8)

    def release(self) -> None:
        self.released = True


def test_live_source_reconnects_with_backoff_and_keeps_counting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # opens: 1st works (2 frames), 2nd fails, 3rd works (2 frames), then unavailable
    captures = [FakeCapture(True, 2), FakeCapture(False, 0), FakeCapture(True, 2)]
    opened: List[FakeCapture] = []

    def opener() -> FakeCapture:
        capture = captures.pop(0) if captures else FakeCapture(False, 0)
        opened.append(capture)
        return capture

    waits: List[float] = []
    stop = threading.Event()

    def fake_wait(timeout: float) -> bool:  # no real sleeping; stop after a few back-offs
        waits.append(timeout)
        if len(waits) >= 5:
            stop.set()
        return stop.is_set()

    monkeypatch.setattr(stop, "wait", fake_wait)
    source = LiveSource("cam", opener, reconnect_max_s=2.0)  # type: ignore[arg-type]
    frames = list(source.frames(stop))
    assert [frame.index for frame in frames] == [0, 1, 2, 3]
    assert source.live and source.reconnects == 2
    # back-off doubles while the camera stays away, resets after a success, and is capped
    assert waits == [0.5, 1.0, 0.5, 1.0, 2.0]
    assert all(capture.released for capture in opened)


def test_live_source_that_never_opens_fails_at_start() -> None:
    with pytest.raises(JetyoloError, match="cannot open source 'cam'"):
        LiveSource("cam", lambda: FakeCapture(False, 0))  # type: ignore[arg-type, return-value]


def test_a_header_that_overstates_the_frame_count_is_not_a_decode_error(tmp_path: Path) -> None:
    write_mjpeg(tmp_path / "ok.avi", 6)
    source = open_source(str(tmp_path / "ok.avi"))
    source.frame_count += 5  # type: ignore[attr-defined]  # an estimated count, too high
    frames = list(source.frames(threading.Event()))
    assert len(frames) == 6 and source.decode_errors == 0


@pytest.mark.skipif(opencv_has_gstreamer(), reason="this OpenCV has GStreamer")
@pytest.mark.parametrize("text", ["csi://0", "videotestsrc ! videoconvert"])
def test_gstreamer_sources_need_an_opencv_with_gstreamer(text: str) -> None:
    with pytest.raises(JetyoloError, match=r"needs OpenCV with GStreamer.*JetPack's OpenCV"):
        open_source(text)


def test_a_missing_camera_is_one_clear_error() -> None:
    free = next(f"/dev/video{n}" for n in range(90, 100) if not Path(f"/dev/video{n}").exists())
    with pytest.raises(JetyoloError, match=f"cannot open source '{free}'.*video` group"):
        open_source(free)


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("/dev/video0", "video0"),  # V4L2 camera
        ("0", "video0"),  # V4L2 by index
        ("csi://1", "csi1"),  # Jetson CSI sensor
        ("rtsp://user:pw@cam3:554/live", "cam3"),  # the stream's host, never its credentials
        ("http://127.0.0.1:8080/mjpeg", "127.0.0.1"),
        ("videotestsrc ! videoconvert ! appsink", "gstreamer"),
    ],
)
def test_default_source_name_is_short_and_topic_safe(source: str, name: str) -> None:
    from device.sources import default_source_name

    assert default_source_name(source) == name


def test_default_source_name_of_files_and_folders(tmp_path: Path) -> None:
    from device.sources import default_source_name

    video = tmp_path / "gate.mp4"
    video.write_bytes(b"")
    (tmp_path / "shots").mkdir()
    assert default_source_name(str(video)) == "gate"
    assert default_source_name(str(tmp_path / "shots")) == "shots"
    assert default_source_name(str(tmp_path / "shots" / "*.jpg")) == "shots"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rtsp://user:s3cret@cam3:554/live", "rtsp://user:***@cam3:554/live"),  # password hidden
        ("rtsp://user@cam3/live", "rtsp://user@cam3/live"),  # no password: unchanged
        ("http://127.0.0.1:8080/mjpeg", "http://127.0.0.1:8080/mjpeg"),
        ("/dev/video0", "/dev/video0"),  # not a URL
        # inside any text (an error echoing a config value), a bad port, a path, an "@" in it
        ("bad --sink 'mqtt://u:pw@host:99999': port", "bad --sink 'mqtt://u:***@host:99999': port"),
        ("mqtt://u:p@ss@broker/x and tcp://a:b@c:1", "mqtt://u:***@broker/x and tcp://a:***@c:1"),
        ("mqtt://u:@host", "mqtt://u:***@host"),  # an empty password: still not shown
        ("host:8080 and user@example.com", "host:8080 and user@example.com"),  # no URL
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    from device.redact import redact_url

    assert redact_url(url) == shown


def test_a_stream_that_does_not_open_never_shows_its_password() -> None:
    # nothing listens on port 9 of this machine: FFmpeg fails at once
    with pytest.raises(JetyoloError) as error:
        open_source("http://user:s3cret@127.0.0.1:9/stream")
    assert "s3cret" not in str(error.value) and "user:***@127.0.0.1" in str(error.value)
