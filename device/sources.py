"""Where frames come from: video files, image folders/globs, V4L2 and CSI cameras, RTSP, raw
GStreamer pipelines.

``open_source(text, options)`` classifies ``text`` (``parse_source``), opens it (raising
``JetyoloError`` when it cannot) and returns a ``Source`` whose ``frames(stop)`` yields ``Frame``
values (index, capture timestamp, BGR image) until the source ends or ``stop`` is set.

- Files end cleanly. A frame that fails to decode mid-file is skipped and counted
  (``decode_errors``); its index is consumed, so indices stay positions in the file.
- Live sources (cameras, RTSP, pipelines) reconnect with exponential back-off after a failed
  read (``reconnects``). At start-up they wait for the camera with the same back-off for up to
  ``CaptureOptions.source_timeout_s`` (0: the first open must succeed; ``inf``: wait forever),
  logging one line per distinct failure and calling ``on_wait`` before each pause (the service
  turns that into ``STATUS=`` and ``EXTEND_TIMEOUT_USEC``). Files and image folders never wait.
- The GStreamer strings for CSI cameras and Jetson RTSP decoding are pure functions
  (``csi_pipeline``, ``rtsp_pipeline``).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple
from urllib.parse import urlsplit

import cv2
import numpy as np

from device.decode_scale import Reduction, decode_factor, reduced_size
from device.errors import JetyoloError
from device.redact import redact_url

LOG = logging.getLogger(__name__)

# FFmpeg's own log lines ("moov atom not found", "error while decoding MB") go straight to the
# terminal, past our logging; jetyolo says what they mean in its own lines instead. OpenCV reads
# this when it first opens a file with FFmpeg. `quiet_native_logs(False)` (--verbose) or an
# OPENCV_FFMPEG_LOGLEVEL of your own keeps them.
FFMPEG_LOGLEVEL_ENV = "OPENCV_FFMPEG_LOGLEVEL"
FFMPEG_QUIET = "-8"  # AV_LOG_QUIET (libavutil/log.h)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SOURCE_KINDS = ("file", "images", "v4l2", "csi", "rtsp", "stream", "gstreamer")
LIVE_KINDS = ("v4l2", "csi", "rtsp", "stream", "gstreamer")
APPSINK = "appsink drop=true max-buffers=1 sync=false"
MAX_CONSECUTIVE_DECODE_ERRORS = 30  # a file that fails this often in a row is over or broken
JETSON_RELEASE_FILE = Path("/etc/nv_tegra_release")


# An image decoded later (Frame.deferred): the image, None when the bytes do not decode.
Decoded = Tuple[Optional[np.ndarray], Optional[Reduction]]


class Frame:
    """A captured frame: ``image`` is BGR, (h, w, 3) uint8; ``source`` the source's name when
    several share one pipeline; ``reduction`` set when decoded smaller than the source sent it.

    Live sources hand their frames out as ``Frame.deferred``: the pixels come from a call made
    by whoever first needs them (the pipeline, when it takes the frame). An MJPEG stream decoded
    at reduced scale decodes its JPEG only then, so a frame dropped as stale in a queue is never
    decoded (4 cameras at 30 FPS in one process: 958 frames decoded
    for 240 inferred before; docs/BENCHMARKS.md)."""

    __slots__ = ("_decode", "_image", "index", "reduction", "source", "timestamp")

    def __init__(self, index: int, timestamp: float, image: Optional[np.ndarray],
                 source: Optional[str] = None, reduction: Optional[Reduction] = None) -> None:
        self.index = index
        self.timestamp = timestamp  # capture time, seconds since the epoch
        self.source = source
        self.reduction = reduction
        self._image = image
        self._decode: Optional[Callable[[], Decoded]] = None

    @classmethod
    def deferred(cls, index: int, timestamp: float, decode: Callable[[], Decoded]) -> Frame:
        frame = cls(index, timestamp, None)
        frame._decode = decode
        return frame

    def decode(self) -> bool:
        """Decode now if not yet done; False when the bytes do not decode (the source counted
        it as a decode error)."""
        if self._image is None and self._decode is not None:
            decode, self._decode = self._decode, None  # the bytes are not needed after
            self._image, self.reduction = decode()
        return self._image is not None

    @property
    def image(self) -> np.ndarray:
        if not self.decode() or self._image is None:
            raise JetyoloError(f"frame {self.index} of {self.source or 'its source'} "
                               "does not decode")
        return self._image

    @image.setter
    def image(self, image: np.ndarray) -> None:
        self._image, self._decode = image, None


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # one of SOURCE_KINDS
    location: str  # path, glob, device, URL or pipeline


@dataclass(frozen=True)
class CaptureOptions:
    """Camera and stream settings; None means the device's default."""

    width: Optional[int] = None
    height: Optional[int] = None
    fps: Optional[int] = None
    rtsp_latency_ms: int = 200
    reconnect_max_s: float = 30.0
    jetson: Optional[bool] = None  # None: detect (/etc/nv_tegra_release)
    source_timeout_s: float = 0.0  # live sources: how long to wait at start (inf: forever)
    decode_scale: str = "auto"  # MJPEG streams: device.decode_scale.DECODE_SCALES
    model_input: Optional[Tuple[int, int]] = None  # (h, w) the frames are letterboxed into


# A live read whose decode may wait: (read ok, the call that decodes it; None: nothing to decode).
DeferredRead = Tuple[bool, Optional[Callable[[], Decoded]]]
# Called before each pause while a live source waits at start: (source name, pause seconds).
WaitCallback = Callable[[str, float], None]
FIRST_RETRY_S = 0.5

# ---- classification and pipeline strings (pure) --------------------------------------------------


def default_source_name(text: str) -> str:
    """A short, stable name for a source, for MQTT topics and messages (cameras are known by
    name, as in Frigate): ``videos/gate.mp4`` -> ``gate``, ``/dev/video0`` -> ``video0``,
    ``csi://1`` -> ``csi1``, ``rtsp://user:pw@cam3:554/live`` -> ``cam3``."""
    spec = parse_source(text)
    if spec.kind == "csi":
        return f"csi{spec.location}"
    if spec.kind == "v4l2":
        return Path(spec.location).name
    if spec.kind in ("rtsp", "stream"):
        host = urlsplit(spec.location).hostname
        return host or spec.kind
    if spec.kind == "gstreamer":
        return "gstreamer"
    if spec.kind == "images" and any(char in spec.location for char in "*?["):
        return Path(spec.location).parent.name or "images"
    return Path(spec.location).stem or spec.kind


def parse_source(text: str) -> SourceSpec:
    """Classify a ``--source`` value. Does not touch the device, only the filesystem."""
    text = text.strip()
    if not text:
        raise JetyoloError("--source is empty; pass a video file, image folder, /dev/videoN, "
                           "csi://N, rtsp://URL or a GStreamer pipeline")
    if text.startswith("csi://"):
        sensor = text[len("csi://"):]
        if not sensor.isdigit():
            raise JetyoloError(f"source {text!r}: CSI sensor id must be a number, e.g. csi://0")
        return SourceSpec("csi", sensor)
    if re.match(r"^rtsps?://", text):
        return SourceSpec("rtsp", text)
    if re.match(r"^(https?|rtmp)://", text):
        return SourceSpec("stream", text)
    if re.fullmatch(r"/dev/video\d+", text) or text.isdigit():
        return SourceSpec("v4l2", text if text.startswith("/dev/") else f"/dev/video{text}")
    if " ! " in text:
        return SourceSpec("gstreamer", text)
    if any(char in text for char in "*?["):
        return SourceSpec("images", text)
    path = Path(text)
    if path.is_dir():
        return SourceSpec("images", text)
    if not path.exists():
        raise JetyoloError(f"source {text!r} does not exist; pass a video file, image folder or "
                           "glob, /dev/videoN, csi://N, rtsp://URL or a GStreamer pipeline")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return SourceSpec("images", text)
    return SourceSpec("file", text)


def csi_pipeline(sensor_id: int, width: int = 1920, height: int = 1080, fps: int = 30,
                 flip_method: int = 0) -> str:
    """GStreamer pipeline for a Jetson CSI camera (Argus): NVMM NV12 -> BGR appsink."""
    return (
        f"nvarguscamerasrc sensor-id={sensor_id} ! "
        f"video/x-raw(memory:NVMM),width={width},height={height},framerate={fps}/1,format=NV12 ! "
        f"nvvidconv flip-method={flip_method} ! video/x-raw,format=BGRx ! "
        f"videoconvert ! video/x-raw,format=BGR ! {APPSINK}"
    )


def rtsp_pipeline(url: str, latency_ms: int = 200) -> str:
    """GStreamer pipeline for RTSP on a Jetson: the hardware decoder (picked by decodebin) and
    nvvidconv out of NVMM memory. Codec-agnostic (H.264/H.265)."""
    quoted = '"' + url.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return (
        f"rtspsrc location={quoted} latency={latency_ms} ! decodebin ! "
        f"nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! {APPSINK}"
    )


def with_appsink(pipeline: str) -> str:
    """A user pipeline ending in a BGR appsink (added when the user left it out)."""
    if "appsink" in pipeline:
        return pipeline
    head = pipeline.rstrip().rstrip("!").rstrip()
    return f"{head} ! videoconvert ! video/x-raw,format=BGR ! {APPSINK}"


def is_jetson() -> bool:
    return JETSON_RELEASE_FILE.exists()


def opencv_has_gstreamer() -> bool:
    return bool(re.search(r"GStreamer:\s+YES", cv2.getBuildInformation()))


def list_images(pattern: str) -> List[Path]:
    """Image files of a folder, glob or single file, sorted by name."""
    path = Path(pattern)
    if path.is_dir():
        candidates = sorted(path.iterdir())
    elif path.is_file():
        candidates = [path]
    else:
        candidates = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
    return [p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


# ---- sources -----------------------------------------------------------------------------------


def quiet_native_logs(quiet: bool = True) -> None:
    """FFmpeg's and OpenCV's own log lines off the terminal (``quiet``) or back on."""
    if quiet:
        os.environ.setdefault(FFMPEG_LOGLEVEL_ENV, FFMPEG_QUIET)
    elif os.environ.get(FFMPEG_LOGLEVEL_ENV) == FFMPEG_QUIET:
        del os.environ[FFMPEG_LOGLEVEL_ENV]
    logging_api = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging_api is not None:
        logging_api.setLogLevel(
            logging_api.LOG_LEVEL_ERROR if quiet else logging_api.LOG_LEVEL_WARNING
        )


quiet_native_logs()


def _top_level_boxes(path: Path) -> List[bytes]:
    """The types of an ISO-BMFF (MP4/MOV) file's complete top-level boxes, in order (a cut file
    ends early). Only to say why FFmpeg refused the file."""
    types = []
    size = path.stat().st_size
    with open(path, "rb") as handle:
        offset = 0
        while offset + 8 <= size:
            handle.seek(offset)
            header = handle.read(16)
            length, kind = int.from_bytes(header[:4], "big"), header[4:8]
            if length == 1 and len(header) == 16:  # 64-bit size follows the type
                length = int.from_bytes(header[8:16], "big")
            elif length == 0:  # the box runs to the end of the file
                length = size - offset
            if length < 8 or offset + length > size:  # damaged, or cut inside this box
                break
            types.append(kind)
            offset += length
    return types


def file_open_failure(path: Path) -> str:
    """Why the existing file ``path`` does not open as a video, from its bytes."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(12)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc}); check that this user may read it"
    if not head:
        return "the file is empty"
    if head[4:8] == b"ftyp" and b"moov" not in _top_level_boxes(path):
        return (
            "it is a truncated MP4/MOV: its index is missing (FFmpeg: moov atom not found), as "
            "when a recording is cut before it finishes; copy the complete file (recorders that "
            "write the index first, ffmpeg -movflags +faststart, stay readable when cut)"
        )
    return "it is corrupt, truncated or not a video FFmpeg can read; `ffprobe` says more"


class Source:
    """Base: a name, whether it is live, counters, and ``frames(stop)``."""

    live = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.decode_errors = 0
        self.reconnects = 0

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the device or file; ``frames`` must not be used afterwards."""

    def frame_size(self) -> Optional[Tuple[int, int]]:
        """(width, height) of the frames, when the source knows it before reading them."""
        return None


def _capture_size(capture: Optional[cv2.VideoCapture]) -> Optional[Tuple[int, int]]:
    if capture is None:
        return None
    size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    return size if min(size) > 0 else None


class ImageSource(Source):
    """Still images in name order; an unreadable image is skipped and counted."""

    def __init__(self, name: str, paths: List[Path]) -> None:
        super().__init__(name)
        self.paths = paths

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        decoded = 0
        for index, path in enumerate(self.paths):
            if stop.is_set():
                return
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                self.decode_errors += 1
                LOG.warning("source: %s cannot be decoded; skipped", path)
                continue
            decoded += 1
            yield Frame(index, time.time(), image)
        if not decoded:
            raise JetyoloError(
                f"source {self.name!r}: none of its {len(self.paths)} images decodes (corrupt, "
                "or not images whatever their names say); pass a folder of JPEG or PNG images"
            )

    def frame_size(self) -> Optional[Tuple[int, int]]:
        """The first readable image's size (a folder of one camera's stills)."""
        for path in self.paths:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is not None:
                return (int(image.shape[1]), int(image.shape[0]))
        return None


class VideoFileSource(Source):
    """A video file through OpenCV (FFmpeg); ends at the end of the file."""

    def __init__(self, name: str, capture: cv2.VideoCapture) -> None:
        super().__init__(name)
        self._capture = capture
        self.frame_count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        index, decoded = 0, 0
        failed: List[int] = []  # indices that failed since the last good frame
        while not stop.is_set():
            ok, image = self._capture.read()
            if ok and image is not None:
                self._count_skipped(failed)
                failed = []
                decoded += 1
                yield Frame(index, time.time(), image)
            elif index >= self.frame_count or len(failed) >= MAX_CONSECUTIVE_DECODE_ERRORS:
                break
            else:
                failed.append(index)
            index += 1
        if not decoded and not stop.is_set():
            raise JetyoloError(
                f"source {self.name!r} opens but not one frame of it decodes: it is corrupt, "
                "truncated or not a video FFmpeg can read; `ffprobe` says more"
            )
        if failed:  # failures with no good frame after them: the file is shorter than it says
            LOG.info("source: %s ended at frame %d; its header says %d frames", self.name,
                     failed[0], self.frame_count)

    def _count_skipped(self, failed: List[int]) -> None:
        """Failures followed by a good frame were corrupt frames mid-file: count them."""
        for index in failed:
            self.decode_errors += 1
            LOG.warning("source: %s frame %d cannot be decoded; skipped", self.name, index)

    def close(self) -> None:
        self._capture.release()

    def frame_size(self) -> Optional[Tuple[int, int]]:
        return _capture_size(self._capture)


class FullDecode:
    """Frames as OpenCV's capture decodes them: BGR at the source's own size."""

    def prepare(self, capture: cv2.VideoCapture) -> cv2.VideoCapture:
        return capture

    def read_deferred(self, capture: cv2.VideoCapture) -> DeferredRead:
        """The next frame as (read ok, the call that gives its pixels; None: it does not
        decode). Here OpenCV decoded it already; MjpegReducedDecode defers the decode."""
        ok, image = capture.read()
        if not ok or image is None:
            return ok, None
        return True, lambda: (image, None)

    def frame_size(self, capture: Optional[cv2.VideoCapture]) -> Optional[Tuple[int, int]]:
        return _capture_size(capture)


# The JPEG bytes come from OpenCV's FFmpeg backend in raw mode (CAP_PROP_FORMAT -1: its
# mpjpeg demuxer hands out each multipart part whole) rather than from a multipart reader of our
# own: FFmpeg keeps doing the HTTP, the boundary parsing and the reconnect-on-EOF it does for
# every other stream, and a raw read costs ~0.1 ms per 1080p frame (docs/BENCHMARKS.md).
REDUCED_FLAGS = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                 8: cv2.IMREAD_REDUCED_COLOR_8}
RAW_PACKETS = -1  # CAP_PROP_FORMAT: undecoded packets (OpenCV videoio, cap_ffmpeg_impl.hpp)


class MjpegReducedDecode(FullDecode):
    """An HTTP MJPEG stream decoded at 1/2, 1/4 or 1/8 (``device.decode_scale``): each JPEG is
    decoded by ``cv2.imdecode`` with ``IMREAD_REDUCED_COLOR_N``. A stream that is not MJPEG, or
    a reduction of 1, decodes as usual. The factor is chosen at each (re)open from the stream's
    size, so a camera that comes back at another resolution gets its own."""

    def __init__(self, name: str, setting: str, model_input: Optional[Tuple[int, int]]) -> None:
        self.name = name
        self.setting = setting
        self.model_input = model_input
        self.factor = 1  # of the open capture
        self.source_size: Optional[Tuple[int, int]] = None
        self._said = ""

    def prepare(self, capture: cv2.VideoCapture) -> cv2.VideoCapture:
        self.factor, self.source_size = 1, _capture_size(capture)
        if not capture.isOpened():
            return capture
        factor = decode_factor(self.setting, self.source_size, self.model_input)
        codec = int(capture.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little")
        if factor > 1 and codec == b"MJPG" and capture.set(cv2.CAP_PROP_FORMAT, RAW_PACKETS):
            self.factor = factor
        self._say(factor, codec)
        return capture

    def _say(self, factor: int, codec: bytes) -> None:
        if factor == 1:
            line = ""
        elif self.factor == 1:
            line = (f"source: {self.name} is not MJPEG ({codec.decode('latin-1')!r}); "
                    f"decode_scale {self.setting} needs MJPEG, so it decodes at full size")
        else:
            width, height = self.source_size or (0, 0)
            reduced = reduced_size((width, height), self.factor)
            line = (f"source: {self.name} decodes its {width}x{height} MJPEG at 1/{self.factor} "
                    f"({reduced[0]}x{reduced[1]}; decode_scale {self.setting})")
        if line and line != self._said:
            LOG.info("%s", line)
        self._said = line

    def read_deferred(self, capture: cv2.VideoCapture) -> DeferredRead:
        """Reduced: the JPEG as read (raw mode: ``read`` would hand out the bytes as the
        image), decoded only when its pixels are needed."""
        if self.factor == 1 or self.source_size is None:
            return super().read_deferred(capture)
        ok, packet = capture.read()
        if not ok or packet is None:
            return False, None
        return True, self._decoder(packet, self.factor, self.source_size)

    @staticmethod
    def _decoder(packet: np.ndarray, factor: int,
                 expected: Tuple[int, int]) -> Callable[[], Decoded]:
        """Decodes ``packet`` at ``factor`` when called (this capture's: a reopen may change
        the decoder's own)."""

        def decode() -> Decoded:
            image = cv2.imdecode(packet, REDUCED_FLAGS[factor])
            if image is None:
                return None, None
            source_size = expected
            if (image.shape[1], image.shape[0]) != reduced_size(expected, factor):
                source_size = (image.shape[1] * factor, image.shape[0] * factor)
            return image, Reduction(factor, source_size)

        return decode

    def frame_size(self, capture: Optional[cv2.VideoCapture]) -> Optional[Tuple[int, int]]:
        if self.factor == 1 or self.source_size is None:
            return super().frame_size(capture)
        return reduced_size(self.source_size, self.factor)


class LiveSource(Source):
    """A camera or stream: reconnects with exponential back-off after a failed read.

    ``opener`` is called once here (and retried for up to ``start_timeout_s``, see
    ``open_waiting``), so a ``LiveSource`` always starts with an open device. ``decoder`` turns
    reads into frames (default: OpenCV's own decode)."""

    live = True

    def __init__(self, name: str, opener: Callable[[], cv2.VideoCapture],
                 reconnect_max_s: float = 30.0, start_timeout_s: float = 0.0,
                 on_wait: Optional[WaitCallback] = None,
                 decoder: Optional[FullDecode] = None) -> None:
        super().__init__(name)
        self._decoder = decoder or FullDecode()
        self._opener: Callable[[], cv2.VideoCapture] = lambda: self._decoder.prepare(opener())
        self.reconnect_max_s = reconnect_max_s
        self._capture: Optional[cv2.VideoCapture] = open_waiting(
            name, self._opener, start_timeout_s, reconnect_max_s, on_wait
        )

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        index = 0
        delay = FIRST_RETRY_S
        while not stop.is_set():
            if self._capture is None:
                self._capture = self._reopen(stop, delay)
                delay = min(delay * 2, self.reconnect_max_s)
                continue
            ok, decode = self._decoder.read_deferred(self._capture)  # decoded when taken
            if decode is not None:
                delay = FIRST_RETRY_S
                yield self._deferred_frame(index, decode)
                index += 1
                continue
            if ok:
                self._undecodable()
                continue
            LOG.warning("source: %s read failed; reconnecting in %.1f s", self.name, delay)
            self._capture.release()
            self._capture = None
            self.reconnects += 1

    def _deferred_frame(self, index: int, decode: Callable[[], Decoded]) -> Frame:
        def decode_or_count() -> Decoded:
            image, reduction = decode()
            if image is None:
                self._undecodable()
            return image, reduction

        return Frame.deferred(index, time.time(), decode_or_count)

    def _undecodable(self) -> None:
        self.decode_errors += 1
        LOG.warning("source: %s sent a frame that does not decode; skipped", self.name)

    def _reopen(self, stop: threading.Event, delay: float) -> Optional[cv2.VideoCapture]:
        if stop.wait(delay):
            return None
        capture = self._opener()
        if capture.isOpened():
            LOG.info("source: %s reconnected", self.name)
            return capture
        capture.release()
        LOG.warning("source: %s still unavailable", self.name)
        return None

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None

    def frame_size(self) -> Optional[Tuple[int, int]]:
        """The size of the frames it hands out (reduced, when it decodes at reduced scale)."""
        return self._decoder.frame_size(self._capture)


def open_failure(name: str) -> str:
    """Why ``name`` did not open, as far as the filesystem tells (OpenCV says nothing)."""
    if name.startswith("/dev/"):
        device = Path(name)
        if not device.exists():
            return f"{name} does not exist (camera unplugged or not yet enumerated)"
        if not os.access(device, os.R_OK | os.W_OK):
            return f"{name} is not readable by this user (the `video` group)"
        return f"{name} exists but does not open (busy or not a capture device)"
    return "it does not open (not reachable, refused, or no stream there yet)"


@contextlib.contextmanager
def _opencv_warnings_off(enabled: bool) -> Iterator[None]:
    """OpenCV's own log at ERROR while ``enabled`` (FFmpeg's and GStreamer's lines stay: OpenCV
    reads their log level once, at start-up)."""
    logging_api = getattr(getattr(cv2, "utils", None), "logging", None)
    if not enabled or logging_api is None:
        yield
        return
    previous = logging_api.getLogLevel()
    logging_api.setLogLevel(logging_api.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        logging_api.setLogLevel(previous)


def open_waiting(
    name: str,
    opener: Callable[[], cv2.VideoCapture],
    timeout_s: float,
    max_delay_s: float = 30.0,
    on_wait: Optional[WaitCallback] = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> cv2.VideoCapture:
    """The open capture of a live source, retried with exponential back-off (0.5 s doubling up
    to ``max_delay_s``) for up to ``timeout_s`` seconds (0: one try; ``inf``: forever). Logs one
    line per distinct failure; ``JetyoloError`` (one line) when the time is up."""
    if timeout_s <= 0:
        return _checked_open(name, opener)
    started = clock()
    delay, attempts, logged = FIRST_RETRY_S, 0, ""
    while True:
        with _opencv_warnings_off(attempts > 0):  # its warning says nothing new after the first
            capture = opener()
        attempts += 1
        if capture.isOpened():
            if attempts > 1:
                LOG.info("source: %s opened after %.0f s (%d attempts)", name,
                         clock() - started, attempts)
            return capture
        capture.release()
        failure = open_failure(name)
        left = timeout_s - (clock() - started)
        if left <= 0:
            raise JetyoloError(
                f"cannot open source {name!r} within {timeout_s:g} s ({attempts} attempts): "
                f"{failure}; check that it is connected and reachable, or wait longer with "
                "--source-timeout (source_timeout_s)"
            )
        if failure != logged:
            limit = "forever" if timeout_s == float("inf") else f"up to {timeout_s:g} s"
            LOG.warning("source: %s cannot be opened: %s; waiting for it (%s)", name, failure,
                        limit)
            logged = failure
        pause = min(delay, left)
        if on_wait is not None:
            on_wait(name, pause)
        sleep(pause)
        delay = min(delay * 2, max_delay_s)


def _checked_open(name: str, opener: Callable[[], cv2.VideoCapture]) -> cv2.VideoCapture:
    capture = opener()
    if not capture.isOpened():
        capture.release()
        raise JetyoloError(
            f"cannot open source {name!r}; check that it exists, is reachable and that this user "
            "may read it (cameras: the `video` group; `jetyolo doctor` lists cameras)"
        )
    return capture


def _v4l2_opener(device: str, options: CaptureOptions) -> Callable[[], cv2.VideoCapture]:
    def open_camera() -> cv2.VideoCapture:
        capture = cv2.VideoCapture(device, cv2.CAP_V4L2)
        settings = ((cv2.CAP_PROP_FRAME_WIDTH, options.width),
                    (cv2.CAP_PROP_FRAME_HEIGHT, options.height), (cv2.CAP_PROP_FPS, options.fps))
        for prop, value in settings:
            if value is not None:
                capture.set(prop, value)
        capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # newest frame, not a stale queue
        return capture

    return open_camera


def _gstreamer_opener(name: str, pipeline: str) -> Callable[[], cv2.VideoCapture]:
    if not opencv_has_gstreamer():
        raise JetyoloError(
            f"source {name!r} needs OpenCV with GStreamer, and this OpenCV was built without it; "
            "on a Jetson use JetPack's OpenCV (apt python3-opencv / nvidia-opencv) in a venv "
            "made with --system-site-packages, not the opencv-python wheel"
        )
    return lambda: cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER)


def live_opener(spec: SourceSpec, options: CaptureOptions) -> Callable[[], cv2.VideoCapture]:
    """How to (re)open a live source."""
    jetson = is_jetson() if options.jetson is None else options.jetson
    if spec.kind == "v4l2":
        return _v4l2_opener(spec.location, options)
    if spec.kind == "csi":
        pipeline = csi_pipeline(int(spec.location), options.width or 1920,
                                options.height or 1080, options.fps or 30)
        return _gstreamer_opener(spec.location, pipeline)
    if spec.kind == "gstreamer":
        return _gstreamer_opener(spec.location, with_appsink(spec.location))
    if spec.kind == "rtsp" and jetson and opencv_has_gstreamer():
        pipeline = rtsp_pipeline(spec.location, options.rtsp_latency_ms)
        return _gstreamer_opener(spec.location, pipeline)
    return lambda: cv2.VideoCapture(spec.location, cv2.CAP_FFMPEG)


def open_source(
    text: str, options: Optional[CaptureOptions] = None, on_wait: Optional[WaitCallback] = None
) -> Source:
    """Classify and open ``text``; ``JetyoloError`` when it cannot be opened (a live source
    after waiting ``options.source_timeout_s``; ``on_wait`` as in ``open_waiting``)."""
    options = options or CaptureOptions()
    spec = parse_source(text)
    if spec.kind == "images":
        paths = list_images(spec.location)
        if not paths:
            raise JetyoloError(f"source {text!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
        return ImageSource(text, paths)
    if spec.kind == "file":
        capture = cv2.VideoCapture(spec.location, cv2.CAP_FFMPEG)
        if not capture.isOpened():
            capture.release()
            raise JetyoloError(
                f"source {text!r} is not a readable video: {file_open_failure(Path(text))}"
            )
        return VideoFileSource(text, capture)
    name = redact_url(text)
    decoder = MjpegReducedDecode(name, options.decode_scale, options.model_input) \
        if spec.kind == "stream" and options.decode_scale != "1" else None
    return LiveSource(name, live_opener(spec, options), options.reconnect_max_s,
                      options.source_timeout_s, on_wait, decoder)
