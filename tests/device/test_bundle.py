"""Bundle manifests: a well-formed one loads; a damaged one is one JetyoloError line naming the
key, never an AttributeError or KeyError from deep inside the loader."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, Dict

import pytest

from device.bundle import Bundle, check_schema
from device.errors import JetyoloError
from device.files import sha256_file

MODEL = b"not really onnx"


def good_manifest(model: Path) -> Dict[str, Any]:
    return {
        "schema_version": 1, "name": "tiny", "class_names": ["a", "b"],
        "preprocess": {"size": [32, 32]}, "postprocess": {"conf": 0.25},
        "variants": {"fp32": {"file": "model.onnx", "input": {}, "outputs": {}}},
        "files": {"model.onnx": {"sha256": sha256_file(model), "size": model.stat().st_size}},
    }


def write_bundle(root: Path, change: Callable[[Dict[str, Any]], None]) -> Path:
    root.mkdir()
    (root / "model.onnx").write_bytes(MODEL)
    manifest = good_manifest(root / "model.onnx")
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_a_well_formed_bundle_loads(tmp_path: Path) -> None:
    bundle = Bundle.load(write_bundle(tmp_path / "b", lambda m: None))
    assert bundle.input_size == (32, 32) and bundle.class_names == ["a", "b"]


def _set(path: str, value: Any) -> Callable[[Dict[str, Any]], None]:
    """Set the value at ``path``: keys joined by "/" (file names hold dots)."""

    def change(manifest: Dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node = manifest
        for key in parents:
            node = node[key]
        node[last] = value

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set("variants", ["fp32"]), "variants must be a JSON object, not list"),
        (_set("files", "model.onnx"), "files must be a JSON object, not str"),
        (_set("preprocess", [32, 32]), "preprocess must be a JSON object"),
        (_set("variants/fp32", "model.onnx"), "variant 'fp32' must be a JSON object"),
        (_set("variants/fp32/file", ["model.onnx"]), "variant 'fp32' names ['model.onnx']"),
        (_set("files/model.onnx", {"sha256": "x"}), "needs a sha256 string and a size"),
        (_set("class_names", "ab"), "class_names must be a list of strings"),
        (_set("preprocess/size", [32, "32"]), "preprocess.size must be [height, width]"),
        (_set("preprocess/size", [0, 32]), "preprocess.size must be [height, width]"),
    ],
)
def test_a_damaged_manifest_is_one_clear_error(
    tmp_path: Path, change: Callable[[Dict[str, Any]], None], message: str
) -> None:
    root = write_bundle(tmp_path / "b", change)
    with pytest.raises(JetyoloError, match="re-create the bundle") as error:
        Bundle.load(root)
    assert message in str(error.value)


def test_check_schema_accepts_what_it_should() -> None:
    manifest = {
        "schema_version": 1, "name": "x", "class_names": [], "preprocess": {"size": [640, 480]},
        "postprocess": {}, "variants": {"fp32": {"file": "m.onnx", "input": {}, "outputs": {}}},
        "files": {"m.onnx": {"sha256": "0" * 64, "size": 0}},
    }
    assert check_schema(manifest) == []
    broken = copy.deepcopy(manifest)
    broken["files"]["m.onnx"]["size"] = True  # a bool is not a size
    assert check_schema(broken) != []
