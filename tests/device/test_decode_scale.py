"""Reduced-scale MJPEG decoding (``decode_scale``): the rule, the sizes libjpeg hands out, the
box mapping back to source pixels, and detection agreement with the full decode on a served
1080p MJPEG stream (the comparison fails when the boxes are not scaled back)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Set, Tuple

import cv2
import numpy as np
import pytest
from test_run_e2e import Collect

from device.config import config_from_mapping
from device.decode_scale import Reduction, auto_factor, decode_factor, reduced_size
from device.detections import Detections, FrameResult
from device.preprocess import FrameCopier, Letterbox, Preprocessor
from device.setup import run_configured
from device.sources import CaptureOptions, open_source
from host.bench.decode import agreement
from host.bench.live import PacedMjpegServer

FRAMES = 24
CAMERA_FPS = 8.0  # slow enough for the pipeline to publish most frames on a busy machine


def test_auto_factor_keeps_the_letterboxed_size() -> None:
    assert auto_factor((1920, 1080), (320, 320)) == 4  # 480x270 >= 320x180
    assert auto_factor((1920, 1080), (384, 640)) == 2  # 960x540 >= 640x360; 1/4 is 480 wide
    assert auto_factor((1920, 1080), (640, 640)) == 2
    assert auto_factor((640, 480), (640, 640)) == 1  # already smaller than the model input
    assert auto_factor((3840, 2160), (320, 320)) == 8  # 480x270
    assert decode_factor("auto", None, (320, 320)) == 1  # frame size unknown: full size
    assert decode_factor("auto", (1920, 1080), None) == 1
    assert decode_factor("2", (640, 480), (640, 640)) == 2  # asked for: as asked


@pytest.mark.parametrize("size", [(1920, 1080), (1366, 767), (333, 211)])
def test_reduced_size_is_what_opencv_decodes(size: tuple) -> None:
    image = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), np.uint8)
    jpeg = cv2.imencode(".jpg", image)[1]
    for factor, flag in ((2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4),
                         (8, cv2.IMREAD_REDUCED_COLOR_8)):
        decoded = cv2.imdecode(jpeg, flag)
        assert decoded is not None
        assert (decoded.shape[1], decoded.shape[0]) == reduced_size(size, factor)


def test_geometry_of_a_reduced_frame_maps_to_source_pixels() -> None:
    reduction = Reduction(4, (1920, 1080))
    reduced = Letterbox.fit((480, 270), (320, 320)).decoded_at(reduction)
    full = Letterbox.fit((1920, 1080), (320, 320))
    box = np.array([[40.0, 90.0, 200.0, 150.0]], np.float32)  # input pixels
    assert reduced.frame_size == (1920, 1080)
    np.testing.assert_allclose(reduced.to_frame(box), full.to_frame(box), atol=1e-3)
    np.testing.assert_allclose(reduced.to_input(reduced.to_frame(box)), box, atol=1e-3)
    assert Letterbox.fit((480, 270), (320, 320)).decoded_at(None).frame_size == (480, 270)


def test_preprocessors_return_source_geometry_for_reduced_frames() -> None:
    frame = np.zeros((270, 480, 3), np.uint8)
    reduction = Reduction(4, (1920, 1080))
    letterbox = Preprocessor((320, 320), "uint8")
    assert letterbox(frame, reduction).frame_size == (1920, 1080)
    assert letterbox(frame).frame_size == (480, 270)  # the same frame, not reduced: its own
    copier = FrameCopier((320, 320), np.empty((1, 270, 480, 3), np.uint8))
    assert copier(frame, reduction).scale == pytest.approx(320 / 1920)
    assert copier(frame).frame_size == (480, 270)


@pytest.fixture(scope="module")
def video_1080(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from host.synth import make_video

    return make_video(tmp_path_factory.mktemp("v1080") / "v1080.mp4", 4, (1920, 1080), FRAMES,
                      seed=3)


@pytest.fixture(scope="module")
def camera(video_1080: Path) -> Iterator[PacedMjpegServer]:
    with PacedMjpegServer(video_1080, CAMERA_FPS, FRAMES) as server:
        yield server


def test_stream_source_hands_out_reduced_frames_of_the_size_it_announces(
    camera: PacedMjpegServer,
) -> None:
    source = open_source(camera.url, CaptureOptions(model_input=(320, 320)))
    try:
        assert source.frame_size() == (480, 270)  # what the frame-input variant is pinned to
        frame = next(source.frames(threading.Event()))
    finally:
        source.close()
    assert frame.image.shape == (270, 480, 3)
    assert frame.reduction == Reduction(4, (1920, 1080))
    full = open_source(camera.url, CaptureOptions(decode_scale="1", model_input=(320, 320)))
    try:
        assert full.frame_size() == (1920, 1080)
        assert next(full.frames(threading.Event())).reduction is None
    finally:
        full.close()


def served_results(
    bundle_dir: Path, url: str, decode_scale: str
) -> Tuple[Dict[int, FrameResult], Set[tuple]]:
    """The published results by frame index, and the shapes of the images the pipeline had."""
    config = config_from_mapping({"bundle": str(bundle_dir), "source": url,
                                  "backend": "onnxruntime", "decode_scale": decode_scale,
                                  "tracker": "none"})
    sink = Collect()
    shapes: Set[tuple] = set()

    def observe_shapes(pipeline: Any, *_: Any) -> None:
        pipeline.add_frame_observer(lambda image, _result: shapes.add(image.shape))

    run_configured(config, sinks=sink, max_frames=FRAMES, handle_signals=False,
                   extensions=[observe_shapes])
    return {result.frame_index: result for result in sink.results}, shapes


def unscaled(detections: Detections, factor: int) -> Detections:
    """The boxes a pipeline that forgot the reduction would report: in decoded pixels."""
    return Detections(detections.xyxy / factor, detections.confidence, detections.class_id)


def test_reduced_decode_agrees_with_the_full_decode_on_a_served_stream(
    bundle_dir: Path, camera: PacedMjpegServer
) -> None:
    full, full_shapes = served_results(bundle_dir, camera.url, "1")
    reduced, reduced_shapes = served_results(bundle_dir, camera.url, "auto")
    assert full_shapes == {(1080, 1920, 3)} and reduced_shapes == {(270, 480, 3)}
    common = set(full) & set(reduced)
    assert len(common) >= FRAMES // 2, (sorted(full), sorted(reduced))
    assert all(reduced[i].frame_size == (1920, 1080) for i in common)  # source pixels
    detections = sum(len(full[i].detections) for i in common)
    assert detections >= len(common)  # the model finds the objects: the comparison means something
    indices = sorted(common)
    expected = [full[i].detections for i in indices]
    score, corner_px = agreement(expected, [reduced[i].detections for i in indices])
    assert score >= 0.99, (score, max(corner_px))
    # the comparison can fail: the same detections left in decoded (1/4) pixels
    wrong, _ = agreement(expected, [unscaled(reduced[i].detections, 4) for i in indices])
    assert wrong < 0.5


def test_a_stream_that_is_not_mjpeg_decodes_at_full_size(video_1080: Path) -> None:
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(video_1080.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{video_1080.name}"  # MPEG-4 over HTTP
    try:
        source = open_source(url, CaptureOptions(decode_scale="4", model_input=(320, 320)))
        try:
            frame = next(source.frames(threading.Event()))
        finally:
            source.close()
    finally:
        server.shutdown()
    assert frame.image.shape == (1080, 1920, 3) and frame.reduction is None


def counting_imdecode(monkeypatch: pytest.MonkeyPatch) -> List[int]:
    """Counts cv2.imdecode calls (one per JPEG decoded) from here on."""
    calls: List[int] = []
    real = cv2.imdecode

    def imdecode(buffer: Any, flags: int) -> Any:
        calls.append(flags)
        return real(buffer, flags)

    monkeypatch.setattr(cv2, "imdecode", imdecode)
    return calls


def test_a_stream_frame_is_decoded_only_when_its_pixels_are_used(
    camera: PacedMjpegServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = counting_imdecode(monkeypatch)
    source = open_source(camera.url, CaptureOptions(model_input=(320, 320)))
    try:
        frames = source.frames(threading.Event())
        taken = [next(frames) for _ in range(4)]
    finally:
        source.close()
    assert calls == []  # read, not decoded: a frame dropped as stale costs no decode
    used = [taken[1].image, taken[3].image]
    assert calls == [cv2.IMREAD_REDUCED_COLOR_4] * 2
    assert all(image.shape == (270, 480, 3) for image in used)
    assert taken[1].reduction == Reduction(4, (1920, 1080)) and taken[0].reduction is None


def test_a_frame_that_does_not_decode_when_taken_is_counted_and_skipped(
    bundle_dir: Path, video_1080: Path
) -> None:
    with PacedMjpegServer(video_1080, 30.0, 8) as broken:
        broken.jpegs[2] = b"\xff\xd8" + bytes(2000) + b"\xff\xd9"  # a JPEG of zeros
        config = config_from_mapping({"bundle": str(bundle_dir), "source": broken.url,
                                      "backend": "onnxruntime", "tracker": "none"})
        sink = Collect()
        summary = run_configured(config, sinks=sink, max_frames=10, handle_signals=False)
    assert summary.decode_errors >= 1
    assert summary.frames == 10 and all(r.frame_size == (1920, 1080) for r in sink.results)
