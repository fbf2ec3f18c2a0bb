"""Input shapes: rectangular model input (`jetyolo export --imgsz H,W`, `--source-size WxH`) —
the shape rules, the manifest, detection agreement with ultralytics' own rectangular `.pt`
predict — and the frame-input variant (`--frame-input`: the letterbox in the graph)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from device.bundle import Bundle
from device.detections import Detections
from device.errors import JetyoloError
from device.postprocess import PostprocessConfig, postprocess
from device.preprocess import FRAME_INPUT, Letterbox, Preprocessor
from host.export import export_bundle, parse_frame_size, parse_imgsz, rectangle_for
from host.parity import match_detections

RECT = (192, 320)  # what ultralytics' .pt predict pads a 16:9 frame to at imgsz 320


@pytest.mark.parametrize(
    ("frame", "side", "expected"),
    [
        ((1920, 1080), 640, (384, 640)),  # 16:9 landscape: 360 rounded up to the stride
        ((1920, 1080), 320, (192, 320)),
        ((1080, 1920), 640, (640, 384)),  # portrait camera
        ((640, 480), 640, (480, 640)),  # 4:3, already aligned
        ((1000, 1000), 320, (320, 320)),  # square stays square
        ((4000, 100), 320, (32, 320)),  # never below one stride
    ],
)
def test_rectangle_for(frame: tuple, side: int, expected: tuple) -> None:
    assert rectangle_for(frame, side, 32) == expected


def test_parse_sizes() -> None:
    assert parse_imgsz("640") == (640, 640)
    assert parse_imgsz("384,640") == (384, 640)
    assert parse_frame_size("1920x1080") == (1920, 1080)
    for bad in ("", "a", "1,2,3", "384x640"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_imgsz(bad)
    for bad in ("1920", "1920x", "0x1080", "axb"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_frame_size(bad)


def test_side_off_the_stride_is_refused(tmp_path: Path, fixture_weights: Path) -> None:
    with pytest.raises(JetyoloError, match="--imgsz 200 is not a multiple of the model stride 32"):
        export_bundle(fixture_weights, tmp_path / "b", imgsz=(200, 320), reference_num=0)
    assert not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def rect_bundle(tmp_path_factory: pytest.TempPathFactory, fixture_weights: Path) -> Bundle:
    out = tmp_path_factory.mktemp("rect") / "synth192x320"
    return export_bundle(fixture_weights, out, imgsz=320, source_size=(1920, 1080),
                         uint8_input=True, frame_input=True, reference_num=4)


def test_manifest_and_graph_are_rectangular(rect_bundle: Bundle) -> None:
    manifest = json.loads((rect_bundle.root / "manifest.json").read_text())
    assert manifest["preprocess"]["size"] == list(RECT)
    assert manifest["variants"]["fp32"]["input"]["shape"] == [1, 3, *RECT]
    assert manifest["variants"]["uint8"]["input"]["shape"] == [1, *RECT, 3]
    assert rect_bundle.input_size == RECT
    session = ort.InferenceSession(str(rect_bundle.model_path("fp32")))
    assert session.get_inputs()[0].shape == [1, 3, *RECT]


def video_frames(video: Path, count: int) -> List[np.ndarray]:
    capture = cv2.VideoCapture(str(video))
    frames = []
    while len(frames) < count:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def agreement_with_ultralytics(
    bundle: Bundle, weights: Path, video: Path, geometry_size: Optional[Tuple[int, int]] = None
) -> Tuple[float, int]:
    """(agreement, ultralytics' detection count) over 12 frames at conf 0.25, iou 0.45; with
    ``geometry_size`` boxes are mapped back as if the input had that size (a wrong geometry)."""
    from ultralytics import YOLO

    config = PostprocessConfig(conf=0.25, iou=0.45)
    session = ort.InferenceSession(str(bundle.model_path("fp32")))
    names = [output.name for output in session.get_outputs()]
    preprocess = Preprocessor(bundle.input_size, "float32")
    model = YOLO(str(weights))
    theirs_total = ours_total = matched = 0
    for frame in video_frames(video, 12):
        result = model.predict(frame, imgsz=320, conf=config.conf, iou=config.iou, verbose=False)
        boxes = result[0].boxes
        theirs = Detections(boxes.xyxy.numpy(), boxes.conf.numpy(), boxes.cls.numpy().astype(int))
        geometry = preprocess(frame)
        if geometry_size is not None:
            geometry = Letterbox.fit(geometry.frame_size, geometry_size)
        outputs = dict(zip(names, session.run(None, {"images": preprocess.buffer})))
        ours = postprocess(outputs, geometry, config)
        theirs_total, ours_total = theirs_total + len(theirs), ours_total + len(ours)
        matched += match_detections(theirs, ours)
    return matched / max(theirs_total, ours_total, 1), theirs_total


def test_agrees_with_ultralytics_rect_predict(
    rect_bundle: Bundle, fixture_weights: Path, synth_video: Path
) -> None:
    """ultralytics pads a 16:9 frame only to the stride on a .pt; the rectangular bundle must
    detect what it detects, at the same thresholds."""
    agreement, detected = agreement_with_ultralytics(rect_bundle, fixture_weights, synth_video)
    assert detected > 10, "the fixture model should detect the synthetic objects"
    assert agreement >= 0.99


def test_agreement_fails_with_the_square_geometry(
    rect_bundle: Bundle, fixture_weights: Path, synth_video: Path
) -> None:
    """The same comparison with boxes mapped back through a square letterbox fails."""
    agreement, _ = agreement_with_ultralytics(rect_bundle, fixture_weights, synth_video, (320, 320))
    assert agreement < 0.5


def test_frame_variant_in_the_manifest(rect_bundle: Bundle) -> None:
    variant = rect_bundle.variant("frame")
    assert variant["input"]["name"] == "frame" and variant["input"]["color"] == "BGR"
    record = rect_bundle.manifest["parity"]["frame_vs_cpu_letterbox"]
    assert record["agreement"] >= 0.99 and record["cpu"] > 10
    # float resize vs uint8 resize: a few frame pixels (< 8 at NMS IoU 0.45); at ultralytics' IoU
    # 0.7 (the default since issue 13) near-duplicate boxes survive NMS and can differ by ~21 px
    assert 0 < record["max_box_px"] < 25
    session = ort.InferenceSession(str(rect_bundle.model_path("frame")))
    (frame_input,) = session.get_inputs()
    assert frame_input.shape == [1, "frame_height", "frame_width", 3]
    assert frame_input.type == "tensor(uint8)"


@pytest.mark.parametrize("size", [(1920, 1080), (333, 517), (320, 192), (100, 40)])
def test_frame_graph_letterboxes_like_the_cpu(rect_bundle: Bundle, size: tuple) -> None:
    """Any frame size, including one that needs no resize and one that is upscaled: the
    graph's model input equals the CPU letterbox's within one grey level (read back by
    making the letterboxed tensor a graph output)."""
    import onnx

    model = onnx.load(str(rect_bundle.model_path("frame")))
    model.graph.output.append(onnx.helper.make_tensor_value_info(
        "images_from_frame", onnx.TensorProto.FLOAT, [1, 3, *RECT]))
    session = ort.InferenceSession(model.SerializeToString())
    frame = cv2.resize(video_frame_like(size), size)
    preprocess = Preprocessor(RECT, "float32")
    preprocess(frame)
    (graph_input,) = session.run(["images_from_frame"], {"frame": frame[None]})
    difference = np.abs(graph_input - preprocess.buffer)
    assert difference.max() <= 1.5 / 255  # the CPU rounds the resized pixels to uint8
    assert difference.mean() < 0.2 / 255


def video_frame_like(size: tuple) -> np.ndarray:
    rng = np.random.default_rng(sum(size))
    frame = np.full((size[1], size[0], 3), 40, np.uint8)
    for _ in range(6):
        x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        cv2.circle(frame, (int(x), int(y)), max(3, size[0] // 10), color, -1)
    return frame


def test_frame_check_fails_on_a_wrong_channel_order(rect_bundle: Bundle, tmp_path: Path) -> None:
    """The export's frame check catches a graph that feeds the model BGR instead of RGB."""
    import onnx
    from onnx import numpy_helper

    from host.parity import frame_difference, synthetic_frames

    model = onnx.load(str(rect_bundle.model_path("frame")))
    (order,) = [t for t in model.graph.initializer if t.name == "images_frame_rgb"]
    order.CopyFrom(numpy_helper.from_array(np.array([0, 1, 2], np.int64), order.name))
    broken = tmp_path / "bgr.onnx"
    onnx.save(model, str(broken))
    frames = synthetic_frames(4, 8)
    config = PostprocessConfig()
    good = frame_difference(rect_bundle.model_path("fp32"), rect_bundle.model_path("frame"),
                            frames, RECT, config)
    bad = frame_difference(rect_bundle.model_path("fp32"), broken, frames, RECT, config)
    assert good["agreement"] >= 0.99
    assert bad["agreement"] < 0.9


def run_detections(bundle: Bundle, source: Path, variant: str, out: Path) -> Dict[int, Detections]:
    from device.cli import main

    code = main(["run", str(bundle.root), "--source", str(source), "--backend", "onnxruntime",
                 "--variant", variant, "--sink", f"jsonl:{out}"])
    assert code == 0
    found: Dict[int, Detections] = {}
    for line in out.read_text().splitlines():
        message = json.loads(line)["payload"]
        if isinstance(message, dict) and message.get("type") == "detections":
            found[message["frame_index"]] = Detections.from_list(message["detections"])
    return found


def test_jetyolo_run_on_the_frame_variant_agrees_with_the_cpu_letterbox(
    rect_bundle: Bundle, synth_video: Path, tmp_path: Path
) -> None:
    cpu = run_detections(rect_bundle, synth_video, "fp32", tmp_path / "cpu.jsonl")
    graph = run_detections(rect_bundle, synth_video, "frame", tmp_path / "graph.jsonl")
    assert sorted(cpu) == sorted(graph) and len(cpu) >= 40
    total = sum(max(len(cpu[i]), len(graph[i])) for i in cpu)
    assert total > 40
    assert sum(match_detections(cpu[i], graph[i]) for i in cpu) / total >= 0.99


def test_the_frame_variant_on_onnxruntime_feeds_each_frame_without_a_copy(
    rect_bundle: Bundle, synth_video: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The calls read the frames themselves, none of the input buffers; the detections are the
    same as when each frame is copied into a buffer first (as on TensorRT)."""
    from device.backends.onnxruntime import OnnxRuntimeBackend

    fed_buffers: List[bool] = []
    original = OnnxRuntimeBackend.infer_impl

    def spy(self: OnnxRuntimeBackend, feed: Dict[str, np.ndarray], out: Optional[dict]) -> dict:
        buffers = {buffer.ctypes.data for buffer in self._input_buffers}
        fed_buffers.append(feed[FRAME_INPUT].ctypes.data in buffers)
        return original(self, feed, out)

    monkeypatch.setattr(OnnxRuntimeBackend, "infer_impl", spy)
    in_place = run_detections(rect_bundle, synth_video, "frame", tmp_path / "in_place.jsonl")
    assert len(fed_buffers) >= 40 and not any(fed_buffers)
    fed_buffers.clear()
    monkeypatch.setattr(OnnxRuntimeBackend, "reads_host_arrays", False)
    copied = run_detections(rect_bundle, synth_video, "frame", tmp_path / "copied.jsonl")
    assert len(fed_buffers) >= 40 and all(fed_buffers)
    assert sorted(in_place) == sorted(copied)
    for index, detections in in_place.items():
        assert np.array_equal(detections.xyxy, copied[index].xyxy)


def test_the_frame_variant_refuses_an_unknown_frame_size(rect_bundle: Bundle) -> None:
    """(Its TensorRT engine, pinned to the frame size: tests/device/test_tensorrt_profiles.py.)"""
    from device.backends import open_backend

    with pytest.raises(JetyoloError, match="frame size is not known"):
        open_backend("onnxruntime", rect_bundle, variant="frame", frame_size=lambda: None)
    backend = open_backend("onnxruntime", rect_bundle, variant="frame", frame_size=lambda: (64, 48))
    with backend:
        assert backend.input_spec.shape == (1, 48, 64, 3)
