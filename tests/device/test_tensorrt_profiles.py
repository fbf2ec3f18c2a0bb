"""TensorRT optimisation profiles on the stand-in (tests/trt_standin/, one profile per supported
version, each fact cited there): the batch profile of an ``export --batch N`` bundle (min 1 /
opt N / max N, the calibration profile for INT8 from a cache, partial batches through
``set_input_shape``), the plan name and key, and what TensorRT refuses.

The stand-in runs the ONNX model on ONNX Runtime's CPU: these say that jetyolo calls each
version's API as its sources describe and moves k rows correctly, nothing about TensorRT itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import onnxruntime as ort
import pytest
from test_tensorrt_standin import VERSIONS, build, onnx_float_tensors, with_cache
from trt_standin.profiles import PROFILES
from trt_standin.standin import World, install

from device.backends import open_chosen
from device.bundle import Bundle
from device.choice import BackendChoice
from device.errors import JetyoloError

N = 3  # conftest's batch_bundle_dir: --batch 3, 320 px
CALIBRATED = [version for version in VERSIONS if PROFILES[version].calibrators]


@pytest.fixture(params=VERSIONS)
def standin(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> World:
    return install(monkeypatch, request.param)


def rows(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 3, 320, 320), dtype=np.float32)


def test_a_batch_bundle_builds_profile_1_n_n_and_runs_every_partial_batch(
    standin: World, batch_bundle_dir: Path, tmp_path: Path
) -> None:
    bundle = Bundle.load(batch_bundle_dir)
    result = build(bundle, tmp_path, [])
    record = standin.builds[-1]
    assert record["profiles"] == {"images": [[1, 3, 320, 320], [N, 3, 320, 320],
                                             [N, 3, 320, 320]]}
    assert result.plan.name == "fp16-b3.plan"
    assert result.key.input_profile.startswith("b3:images min 1x3x320x320 opt 3x3x320x320")
    choice = BackendChoice("tensorrt", cache_dir=tmp_path / "engines")
    reference = ort.InferenceSession(str(bundle.model_path(result.key.variant)),
                                     providers=["CPUExecutionProvider"])
    with open_chosen(choice, bundle) as backend:
        assert len(standin.builds) == 1  # the plan was reused
        assert backend.dynamic_batch and backend.input_spec.shape == (N, 3, 320, 320)
        buffer, out = backend.input_buffer, backend.allocate_outputs()
        assert out["boxes"].shape == (N, 4, 2100)
        buffer[...] = rows(N)
        for count in (1, N, 2, 1):  # shape changes both ways
            out["scores"][...] = -1.0
            backend.infer({"images": buffer[:count]}, out=out)
            expected = reference.run(None, {"images": buffer[:count]})
            np.testing.assert_allclose(out["boxes"][:count], expected[0], atol=1e-4)
            np.testing.assert_allclose(out["scores"][:count], expected[1], atol=1e-6)
            assert (out["scores"][count:] == -1.0).all()  # rows past k are not written
        alone = backend.infer({"images": buffer[1:2].copy()})  # staged, without out=
        np.testing.assert_allclose(alone["scores"], reference.run(None, {"images": buffer[1:2]})[1],
                                   atol=1e-6)
        with pytest.raises(JetyoloError, match=r"model wants \['1..3', 3, 320, 320\]"):
            backend.infer({"images": np.zeros((N + 1, 3, 320, 320), np.float32)})


def test_without_the_profile_tensorrt_refuses_the_symbolic_batch(
    standin: World, batch_bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the builder did before profiles: TensorRT's own refusal, quoted by the stand-in."""
    monkeypatch.setattr("device.backends.tensorrt_build._add_profile", lambda *args: None)
    with pytest.raises(JetyoloError, match="TensorRT could not build the engine"):
        build(Bundle.load(batch_bundle_dir), tmp_path, [])
    assert "[E] Network has dynamic or shape inputs, but no optimization profile has been " \
           "defined." in standin.log


def test_a_batch_1_bundle_gets_no_profile_and_keeps_its_plan_name(
    standin: World, bundle_dir: Path, tmp_path: Path
) -> None:
    result = build(Bundle.load(bundle_dir), tmp_path, [])
    assert standin.builds[-1]["profiles"] == {} and result.key.input_profile is None
    assert result.plan.name == "fp16.plan"


@pytest.mark.parametrize("version", CALIBRATED)
def test_int8_from_a_cache_sets_the_calibration_profile(
    version: str, monkeypatch: pytest.MonkeyPatch, batch_bundle_dir: Path, tmp_path: Path
) -> None:
    world = install(monkeypatch, version)
    trt_version = ".".join(world.profile.version.split(".")[:3])
    shutil.copytree(batch_bundle_dir, tmp_path / "bundle")
    tensors = onnx_float_tensors(tmp_path / "bundle" / "model.onnx")
    bundle = with_cache(Bundle.load(tmp_path / "bundle"), tmp_path, trt_version, tensors, tensors)
    result = build(bundle, tmp_path, [], precision="int8", int8_from="cache")
    assert result.plan.name == "int8-cache-b3.plan"
    one = [1, 3, 320, 320]
    assert world.builds[-1]["calibration_profile"] == {"images": (tuple(one),) * 3}
    assert world.builds[-1]["int8"]["int8"]  # the cache's scales were taken

    from device.backends import tensorrt_build

    original = tensorrt_build._add_profile
    monkeypatch.setattr(  # without it the stand-in refuses (NvInfer.h: "must be set")
        tensorrt_build, "_add_profile",
        lambda builder, network, config, profile, calibrated: original(
            builder, network, config, profile, False))
    with pytest.raises(JetyoloError, match="TensorRT could not build the engine"):
        build(bundle, tmp_path, [], precision="int8", int8_from="cache", force=True)
    assert any("calibration profile not set" in line for line in world.log)


def test_dla_with_a_batch_range_is_refused(
    monkeypatch: pytest.MonkeyPatch, batch_bundle_dir: Path, tmp_path: Path
) -> None:
    world = install(monkeypatch, "10.3")
    with pytest.raises(JetyoloError, match="DLA runs one input shape"):
        build(Bundle.load(batch_bundle_dir), tmp_path, [], precision="fp16", dla_core=0)
    assert world.builds == []


def test_a_static_batch_n_graph_is_refused_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, bundle_dir: Path, tmp_path: Path
) -> None:
    """A bundle whose manifest says N = 3 over a graph TensorRT sees as static (an export made
    before dim 0 became symbolic): the profile cannot vary a static dim."""
    import json

    world = install(monkeypatch, "8.6.2")
    shutil.copytree(bundle_dir, tmp_path / "bundle")
    manifest_path = tmp_path / "bundle" / "manifest.json"
    manifest: Dict[str, Any] = json.loads(manifest_path.read_text())
    manifest["variants"]["fp32"]["input"]["shape"][0] = N
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(JetyoloError, match=r"input images is \[1, 3, 320, 320\] in the ONNX"):
        build(Bundle.load(tmp_path / "bundle"), tmp_path, [])
    assert world.builds == []


def test_the_runner_calls_set_input_shape_where_set_binding_shape_is_gone(
    standin: World, batch_bundle_dir: Path, tmp_path: Path
) -> None:
    """set_binding_shape exists on 8.x only (profiles.Profile.set_binding_shape); the runner's
    set_input_shape works on every version, a partial batch included."""
    from device.backends.tensorrt import TensorRTBackend

    result = build(Bundle.load(batch_bundle_dir), tmp_path, [])
    calls: List[Any] = []
    with TensorRTBackend(result.plan) as backend:
        context = backend._context
        assert hasattr(context, "set_binding_shape") is (standin.profile.major < 10)
        original = context.set_input_shape
        context.set_input_shape = lambda name, shape: calls.append(tuple(shape)) or original(
            name, shape)
        buffer = backend.input_buffer
        backend.infer({"images": buffer[:2]})
        backend.infer({"images": buffer[:2]})  # same k: the shape is not set again
    assert calls == [(2, 3, 320, 320)]


# ---- the frame variant: a profile pinned to the camera's frame size ---------------------------
@pytest.fixture(scope="module")
def frame_bundle_dir(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bundle_dir plus the frame-input variant, as `export --frame-input` writes it."""
    from device.bundle import add_files
    from host import surgeon
    from host.export import frame_variant

    root = tmp_path_factory.mktemp("frame") / "bundle"
    shutil.copytree(bundle_dir, root)
    bundle = Bundle.load(root)
    model, _ = surgeon.apply_passes(surgeon.load_onnx(bundle.model_path("fp32")),
                                    [surgeon.frame_input])
    path = root.parent / "model_frame.onnx"
    import onnx

    onnx.save(model, str(path))
    variants = {**bundle.manifest["variants"],
                "frame": frame_variant(bundle.manifest["variants"]["fp32"])}
    return add_files(bundle, {"model_frame.onnx": path}, {"variants": variants}).root


def camera_frame(width: int, height: int) -> np.ndarray:
    return np.random.default_rng(width).integers(0, 255, (1, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("version", ["8.5.2", "10.3"])
def test_the_frame_variant_builds_for_the_camera_size_and_another_size_is_another_plan(
    version: str, monkeypatch: pytest.MonkeyPatch, frame_bundle_dir: Path, tmp_path: Path
) -> None:
    world = install(monkeypatch, version)
    bundle = Bundle.load(frame_bundle_dir)
    choice = BackendChoice("tensorrt", variant="frame", precision="fp16",
                           cache_dir=tmp_path / "engines")
    reference = ort.InferenceSession(str(bundle.model_path("frame")),
                                     providers=["CPUExecutionProvider"])
    for width, height, builds, index in ((640, 360, 1, 0), (1280, 720, 2, 1), (640, 360, 2, 0)):
        size = (width, height)
        with open_chosen(choice, bundle, frame_size=lambda size=size: size) as backend:  # type: ignore[misc]
            assert len(world.builds) == builds  # the third reuses the first's plan
            assert backend.name == f"tensorrt:fp16-frame-{width}x{height}.plan"
            assert not backend.dynamic_batch
            assert backend.input_spec.shape == (1, height, width, 3)
            pinned = [1, height, width, 3]
            assert world.builds[index]["profiles"] == {"frame": [pinned] * 3}
            frame = camera_frame(width, height)
            backend.input_buffer[...] = frame
            got = backend.infer({"frame": backend.input_buffer})
            for name, expected in zip(("boxes", "scores"), reference.run(None, {"frame": frame})):
                np.testing.assert_allclose(got[name], expected, atol=1e-4)


def test_the_frame_variant_needs_a_frame_size_for_tensorrt(
    monkeypatch: pytest.MonkeyPatch, frame_bundle_dir: Path, tmp_path: Path
) -> None:
    from device.engine import BuildRequest

    world = install(monkeypatch, "10.3")
    request = BuildRequest(variant="frame", cache_dir=tmp_path / "engines")
    from device.backends.tensorrt_build import TensorRTBuildOps
    from device.engine import ensure_engine

    with pytest.raises(JetyoloError, match="set capture_width and capture_height"):
        ensure_engine(Bundle.load(frame_bundle_dir), request, TensorRTBuildOps(), print)
    assert world.builds == []


def test_jetyolo_build_config_builds_the_batched_and_the_frame_engine(
    monkeypatch: pytest.MonkeyPatch, batch_bundle_dir: Path, frame_bundle_dir: Path,
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What jetyolo-build.service runs (`jetyolo build --config`): the engine the detector will
    load, its profile from the bundle (batch) and from the config's capture size (frame)."""
    import yaml

    from device.cli import main

    world = install(monkeypatch, "10.3")
    monkeypatch.setenv("JETYOLO_ENGINE_CACHE", str(tmp_path / "engines"))
    batched = tmp_path / "batched.yaml"
    batched.write_text(yaml.safe_dump({"bundle": str(batch_bundle_dir), "source": "/dev/video0",
                                       "backend": "tensorrt"}))
    assert main(["build", "--config", str(batched)]) == 0
    assert capsys.readouterr().out.strip().endswith("/fp16-b3.plan")
    framed = tmp_path / "framed.yaml"
    framed.write_text(yaml.safe_dump({"bundle": str(frame_bundle_dir), "source": "/dev/video0",
                                      "backend": "tensorrt", "variant": "frame",
                                      "capture_width": 1280, "capture_height": 720}))
    assert main(["build", "--config", str(framed)]) == 0
    assert capsys.readouterr().out.strip().endswith("/fp16-frame-1280x720.plan")
    assert world.builds[-1]["profiles"] == {"frame": [[1, 720, 1280, 3]] * 3}
    assert main(["build", "--config", str(framed)]) == 0  # the key check: nothing rebuilt
    assert len(world.builds) == 2


@pytest.mark.parametrize("version", ["8.6.2", "11"])
def test_verify_runs_the_batched_engine_against_the_reference(
    version: str, monkeypatch: pytest.MonkeyPatch, batch_bundle_dir: Path, tmp_path: Path
) -> None:
    """The reference feeds each image N times (entry 0 is the reference): a full batch."""
    from device.verify import verify

    world = install(monkeypatch, version)
    report = verify(batch_bundle_dir, backend="tensorrt", cache_dir=tmp_path / "engines")
    assert report.passed, report.format_text()
    assert world.builds[-1]["profiles"]["images"][2] == [N, 3, 320, 320]


def test_selftest_builds_and_times_the_frame_variant_for_a_1080p_camera(
    monkeypatch: pytest.MonkeyPatch, frame_bundle_dir: Path, tmp_path: Path
) -> None:
    from device import selftest

    world = install(monkeypatch, "10.3")
    monkeypatch.setenv("JETYOLO_ENGINE_CACHE", str(tmp_path / "engines"))
    bundle = Bundle.load(frame_bundle_dir)
    case = selftest.Case("frame", "fp16")
    assert case in selftest.tensorrt_cases(bundle, "10.3.0")
    toolkit = selftest.Toolkit()
    assert toolkit.build(bundle, case).name == "fp16-frame-1920x1080.plan"
    figures = toolkit.bench(bundle, "tensorrt", case, runs=2)
    assert figures["backend"] == "tensorrt:fp16-frame-1920x1080.plan" and len(world.builds) == 1


def detections_by_frame(path: Path) -> Dict[Any, Any]:
    import json

    found = {}
    for line in path.read_text().splitlines():
        message = json.loads(line)["payload"]
        if isinstance(message, dict) and message.get("type") == "detections":
            found[(message["source"], message["frame_index"])] = [
                (item["class_id"], [round(v) for v in item["box"]])
                for item in message["detections"]]
    return found


def test_jetyolo_run_batches_two_cameras_through_the_engine_as_the_cpu_does(
    monkeypatch: pytest.MonkeyPatch, batch_bundle_dir: Path, synth_video: Path, tmp_path: Path
) -> None:
    """Two sources on the batch-3 engine: every call is a partial batch (k <= 2 of 3) through
    the pipeline's batching and the runner's set_input_shape; the detections equal ONNX
    Runtime's on the same bundle, frame by frame."""
    from device.cli import main

    install(monkeypatch, "10.3")
    monkeypatch.setenv("JETYOLO_ENGINE_CACHE", str(tmp_path / "engines"))
    second = tmp_path / "yard.mp4"
    shutil.copyfile(synth_video, second)
    found = {}
    for backend in ("tensorrt", "onnxruntime"):
        out = tmp_path / f"{backend}.jsonl"
        # to the end of both files (never --max-frames: how the first N frames split between
        # two files depends on which decode is ready first, so the two runs would share fewer)
        assert main(["run", str(batch_bundle_dir), "--source", str(synth_video), "--source",
                     str(second), "--backend", backend, "--variant", "fp32",
                     "--sink", f"jsonl:{out}"]) == 0
        found[backend] = detections_by_frame(out)
    shared = set(found["tensorrt"]) & set(found["onnxruntime"])
    assert shared == {(source, index) for source in ("synth", "yard") for index in range(40)}
    assert all(found["tensorrt"][key] == found["onnxruntime"][key] for key in shared)
    assert sum(len(found["tensorrt"][key]) for key in shared) > 0, shared
