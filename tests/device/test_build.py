"""`jetyolo build --config FILE`: the engine settings come from the `jetyolo run` config, flags
override them, and a CPU-backend config needs no engine (exit 0, one line)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List

import pytest
import yaml

from device import build
from device.backends import tensorrt_missing
from device.choice import MIB
from device.cli import main
from device.errors import JetyoloError


def write_config(folder: Path, **values: Any) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({"bundle": "bundles/b", "source": "/dev/video0", **values}))
    return path


def parse(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jetyolo build")
    build.add_arguments(parser)
    return parser.parse_args(argv)


def request_for(argv: List[str]) -> build.BuildRequest:
    args = parse(argv)
    return build.request_from_args(args, build.config_from_args(args))


def test_config_file_gives_the_engine_settings_run_would_load(tmp_path: Path) -> None:
    config = write_config(tmp_path, backend="tensorrt", precision="int8", int8_from="cache",
                          variant="uint8", engine_cache_dir="engines")
    args = parse(["--config", str(config)])
    loaded = build.config_from_args(args)
    assert loaded.bundle == str(tmp_path / "bundles/b")  # relative to the file, as for `run`
    request = build.request_from_args(args, loaded)
    assert (request.precision, request.int8_from, request.variant) == ("int8", "cache", "uint8")
    assert request.cache_dir == tmp_path / "engines"
    assert request.workspace_bytes is None and request.dla_core is None  # `run`'s settings


def test_flags_override_the_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, backend="tensorrt", precision="int8", variant="uint8",
                          engine_cache_dir="engines")
    request = request_for(["other", "--config", str(config), "--precision", "fp16",
                           "--variant", "fp32", "--cache-dir", "/var/cache/e",
                           "--workspace", "512", "--dla", "1"])
    assert (request.precision, request.variant) == ("fp16", "fp32")
    assert request.cache_dir == Path("/var/cache/e")
    assert (request.workspace_bytes, request.dla_core) == (512 * MIB, 1)
    assert build.config_from_args(parse(["other", "--config", str(config)])).bundle == "other"


def test_int8_qdq_variant_is_read_as_run_reads_it(tmp_path: Path) -> None:
    config = write_config(tmp_path, backend="tensorrt", variant="int8-qdq")
    request = request_for(["--config", str(config)])
    assert (request.precision, request.int8_from, request.variant) == ("int8", "qdq", "fp32")


def test_without_config_the_defaults_are_unchanged() -> None:
    args = parse(["bundles/b"])
    config = build.config_from_args(args)
    assert config.backend == "tensorrt"  # an explicit build never turns into "nothing to do"
    request = build.request_from_args(args, config)
    # precision None: device.build_plan.default_precision decides once TensorRT's version is known
    assert (request.precision, request.int8_from, request.variant) == (None, None, "fp32")


@pytest.mark.parametrize(
    "values, argv, message",
    [
        ({"precison": "fp16"}, [], "precison: unknown key; did you mean 'precision'?"),
        ({"precision": "int4"}, [], "precision: 'int4' is not allowed"),
        ({"bundle": None}, [], "bundle: must be set"),
        ({"backend": "tensorrt"}, ["--int8-from", "qdq"], "--int8-from only applies to "
                                                          "precision int8"),
    ],
)
def test_bad_config_or_flags_are_refused(
    tmp_path: Path, values: Dict[str, Any], argv: List[str], message: str
) -> None:
    args = parse(["--config", str(write_config(tmp_path, **values)), *argv])
    with pytest.raises(JetyoloError, match=message.replace("'", ".")):
        build.request_from_args(args, build.config_from_args(args))


def test_no_bundle_anywhere_is_one_clear_line(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("source: /dev/video0\n")
    with pytest.raises(JetyoloError, match="bundle is not set; give the BUNDLE argument"):
        build.config_from_args(parse(["--config", str(config)]))


def test_onnxruntime_config_needs_no_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, backend="onnxruntime")  # the bundle need not even exist
    assert main(["build", "--config", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["jetyolo build: no TensorRT engine is needed: the backend is onnxruntime"]


@pytest.mark.skipif(tensorrt_missing() is None, reason="TensorRT is importable here: auto builds")
def test_auto_without_tensorrt_needs_no_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path)  # backend: auto, the default
    assert main(["build", "--config", str(config)]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert "the backend is auto and TensorRT is unavailable" in line


def test_auto_with_tensorrt_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "tensorrt_missing", lambda: None)
    config = build.config_from_args(parse(["--config", str(write_config(tmp_path))]))
    assert build.no_engine_reason(config) is None


def test_tensorrt_config_goes_on_to_the_build(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, backend="tensorrt", bundle=str(tmp_path / "missing"))
    assert main(["build", "--config", str(config)]) == 2  # not "no engine needed"
    captured = capsys.readouterr()
    assert "no TensorRT engine is needed" not in captured.out
    assert "jetyolo: error:" in captured.err and "missing" in captured.err


def test_the_frame_size_comes_from_the_capture_size_or_the_flag(tmp_path: Path) -> None:
    """jetyolo-build.service runs before the camera is opened: the frame variant's engine is
    built for the capture size the config asks for (top level, or the one source's)."""
    top = write_config(tmp_path, backend="tensorrt", capture_width=1280, capture_height=720)
    assert request_for(["--config", str(top)]).frame_size == (1280, 720)
    assert request_for(["--config", str(top), "--frame-size", "640x360"]).frame_size == (640, 360)
    one = tmp_path / "one"
    one.mkdir()
    entry = {"source": "/dev/video0", "capture_width": 1920, "capture_height": 1080}
    single = one / "config.yaml"
    single.write_text(yaml.safe_dump({"bundle": "b", "backend": "tensorrt", "sources": [entry]}))
    assert request_for(["--config", str(single)]).frame_size == (1920, 1080)
    assert request_for(["b", "--backend", "tensorrt"]).frame_size is None
    with pytest.raises(SystemExit):
        parse(["b", "--frame-size", "1920"])
