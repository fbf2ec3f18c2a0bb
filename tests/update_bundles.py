"""Bundles for the model-update tests, made from the session bundle without another export.

``renamed`` keeps every file and changes the manifest's name, so the model_id (name + ONNX
sha256 prefix) differs: a second model the store treats as new. ``wrong_reference`` moves the
reference boxes, so the model fails ``jetyolo verify`` although every hash matches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from device.bundle import MANIFEST, Bundle, add_files

REFERENCE_DETECTIONS = "reference/detections.json"


def renamed(source: Path, out: Path, name: str) -> Path:
    shutil.copytree(source, out)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["name"] = name
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def wrong_reference(source: Path, out: Path, name: str, shift_px: float = 40.0) -> Path:
    """A bundle whose recorded reference detections sit ``shift_px`` away from what the model
    computes (hashes updated: only verify can tell)."""
    renamed(source, out, name)
    data = json.loads((out / REFERENCE_DETECTIONS).read_text())
    for image in data["images"]:
        for detection in image["detections"]:
            detection["box"] = [value + shift_px for value in detection["box"]]
    add_files(Bundle.load(out), {REFERENCE_DETECTIONS: json.dumps(data).encode()})
    return out
