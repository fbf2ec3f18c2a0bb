"""`jetyolo bundle verify` loads every model and checks it against the manifest: a model that is
not ONNX, one with another class count or input, calibration or reference made for another model
(each with the manifest's hashes rewritten to match: hashes alone would say OK)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Dict

import pytest

from device.cli import main


@pytest.fixture()
def bundle(bundle_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    return copy


def edit(bundle: Path, change: Callable[[Dict[str, Any]], None]) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def rehash(bundle: Path, relative: str) -> None:
    data = (bundle / relative).read_bytes()
    entry = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    edit(bundle, lambda m: m["files"].update({relative: entry}))


def test_verify_says_what_it_checked(bundle: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bundle", "verify", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "model.onnx (fp32): onnx.checker, ONNX Runtime load, input images [1, 3, 320, 320] " \
           "float32, outputs boxes, scores, 4 classes = class_names" in out
    assert "reference recorded with this fp32 model" in out


def _random_model(bundle: Path) -> None:
    (bundle / "model.onnx").write_bytes(bytes(range(256)) * 64)
    rehash(bundle, "model.onnx")


def _more_names(bundle: Path) -> None:
    edit(bundle, lambda m: m.update(class_names=[*m["class_names"], "extra"]))


def _other_input(bundle: Path) -> None:
    edit(bundle, lambda m: m["variants"]["fp32"]["input"].update(shape=[1, 3, 640, 640]))


def _foreign_calibration(bundle: Path) -> None:
    edit(bundle, lambda m: m.update(calibration={"onnx_sha256": "0" * 64, "caches": {}}))


def _foreign_cache(bundle: Path) -> None:
    relative = "calibration/trt-10.3.0.cache"
    cache = bundle / relative
    cache.parent.mkdir()
    cache.write_text("TRT-100300-EntropyCalibration2\nimages: 3c010a14\nnot_this_model: 3c010a14\n")
    rehash(bundle, relative)
    sha = json.loads((bundle / "manifest.json").read_text())["files"]["model.onnx"]["sha256"]
    calibration = {"onnx_sha256": sha, "caches": {"10.3.0": {"file": relative}}}
    edit(bundle, lambda m: m.update(calibration=calibration))


def _foreign_reference(bundle: Path) -> None:
    edit(bundle, lambda m: m["reference"].update(model_sha256="f" * 64))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_random_model, "model.onnx is not a valid ONNX model"),  # random bytes, rehashed
        (_more_names, "the model scores 4 classes, class_names has 5"),  # labels "4" otherwise
        (_other_input, "input shape is [1, 3, 320, 320], the manifest says [1, 3, 640, 640]"),
        (_foreign_calibration, "its calibration was made for ONNX 000000000000"),
        (_foreign_cache, "names 1 tensors the model does not have (first 'not_this_model')"),
        (_foreign_reference, "its reference was recorded for model ffffffffffff"),
    ],
)
def test_verify_refuses_a_model_that_does_not_match(
    bundle: Path, capsys: pytest.CaptureFixture, damage: Callable[[Path], None], message: str
) -> None:
    damage(bundle)
    assert main(["bundle", "verify", str(bundle)]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "OK" not in captured.out
