"""Bundle manifests: a well-formed one loads; a damaged one is one JetyoloError line naming the
key, never an AttributeError or KeyError from deep inside the loader."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict

import pytest

from device.bundle import Bundle, check_schema, verify_files
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
        # values the run uses, refused at load, before any sink says "online"
        (_set("postprocess/conf", "high"), "postprocess.conf must be a number between 0 and 1"),
        (_set("postprocess/conf", float("nan")), "postprocess.conf must be a number between 0"),
        (_set("postprocess/iou", 2), "postprocess.iou must be a number between 0 and 1, not 2"),
        (_set("postprocess/max_det", 0), "postprocess.max_det must be a whole number >= 1"),
        (_set("name", 7), "name must be a string"),
        (_set("variants/fp32/input", "images"), "variant 'fp32': input must be a JSON object"),
        (_set("calibration", ["x.cache"]), "calibration must be a JSON object, not list"),
        (_set("head", {"postprocess_nodes": "Sigmoid"}), "head.postprocess_nodes must be a list"),
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


def _rename_model(name: str) -> Callable[[Dict[str, Any]], None]:
    """List the model under ``name`` (the variant points at it too)."""

    def change(manifest: Dict[str, Any]) -> None:
        manifest["files"] = {name: manifest["files"]["model.onnx"]}
        manifest["variants"]["fp32"]["file"] = name

    return change


@pytest.mark.parametrize(
    "name",
    [
        "../../../../etc/cron.d/x",  # climbs out of the bundle
        "/etc/hostname",  # absolute
        "reference/../../x",  # climbs out from a sub-folder
        "./model.onnx",  # a '.' part: not the plain name the manifest writer makes
        "a//model.onnx",  # an empty part
        "..\\evil.onnx",  # a Windows separator
    ],
)
def test_a_manifest_file_name_outside_the_bundle_is_refused(tmp_path: Path, name: str) -> None:
    root = write_bundle(tmp_path / "b", _rename_model(name))
    with pytest.raises(JetyoloError, match="it could lead outside the bundle"):
        Bundle.load(root)


def test_a_symlinked_model_is_refused_even_with_matching_hashes(tmp_path: Path) -> None:
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(MODEL)
    root = write_bundle(tmp_path / "b", lambda m: None)
    (root / "model.onnx").unlink()
    (root / "model.onnx").symlink_to(outside)  # same bytes: the hashes still match
    with pytest.raises(JetyoloError, match=r"model\.onnx is a symbolic link"):
        Bundle.load(root)


def test_a_symlinked_folder_that_leads_outside_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "model.onnx").write_bytes(MODEL)
    root = write_bundle(tmp_path / "b", _rename_model("sub/model.onnx"))
    (root / "sub").symlink_to(elsewhere)
    with pytest.raises(JetyoloError, match="sub is a symbolic link"):
        Bundle.load(root)
    manifest = json.loads((root / "manifest.json").read_text())
    assert any("outside the bundle" in problem for problem in verify_files(root, manifest))


def test_a_special_file_in_the_bundle_is_refused(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b", lambda m: None)
    os.mkfifo(root / "pipe")
    with pytest.raises(JetyoloError, match="pipe is not a regular file"):
        Bundle.load(root)


def test_a_symlinked_manifest_is_refused(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b", lambda m: None)
    (root / "manifest.json").rename(tmp_path / "real.json")
    (root / "manifest.json").symlink_to(tmp_path / "real.json")
    with pytest.raises(JetyoloError, match=r"manifest\.json is a symbolic link"):
        Bundle.load(root)


@pytest.mark.parametrize("relative", ["../x.cache", "/etc/passwd", "link/x.cache"])
def test_bundle_path_refuses_names_that_leave_the_bundle(tmp_path: Path, relative: str) -> None:
    bundle = Bundle.load(write_bundle(tmp_path / "b", lambda m: None))
    (bundle.root / "link").symlink_to(tmp_path)  # made after the load checked the folder
    with pytest.raises(JetyoloError, match=r"outside the bundle|not a plain relative path"):
        bundle.path(relative)
    assert bundle.path("model.onnx") == bundle.root / "model.onnx"
