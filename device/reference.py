"""The reference format: what ``jetyolo reference`` (host) records in a bundle and what
``jetyolo verify`` (device) reads back. Files (each hashed in the manifest): the preprocessed
inputs and raw outputs as polygraphy JSON, and the post-processed detections per image with
their letterbox geometry. The host writer and the device reader share these names and record
shapes; neither imports the other's verb."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from device.bundle import Bundle
from device.detections import Detections
from device.errors import JetyoloError
from device.postprocess import PostprocessConfig, postprocess
from device.preprocess import Letterbox

REFERENCE_INPUTS = "reference/inputs.json"
REFERENCE_OUTPUTS = "reference/outputs.json"
REFERENCE_DETECTIONS = "reference/detections.json"
REFERENCE_FILES = (REFERENCE_INPUTS, REFERENCE_OUTPUTS, REFERENCE_DETECTIONS)
# Both sides are decoded down to this score so a box near ``conf`` that moves a little is a score
# delta, not a missing box (see device.matching). Deltas up to conf - FLOOR_CONF are handled.
FLOOR_CONF = 0.05


@dataclass
class ReferenceImage:
    name: str
    geometry: Letterbox
    detections: Detections  # frame pixels, down to the reference's floor score


@dataclass
class Reference:
    section: Dict[str, Any]
    inputs: List[Dict[str, np.ndarray]]
    outputs: Any  # polygraphy RunResults with one runner
    images: List[ReferenceImage]
    conf: float
    postprocess: PostprocessConfig


def detection_records(frame: Detections, geometry: Letterbox, names: List[str]) -> List[Dict]:
    """JSON records of one image: frame-pixel and input-pixel boxes at full float precision."""
    input_boxes = geometry.to_input(frame.xyxy) if len(frame) else frame.xyxy
    return [
        {
            "class_id": int(cls),
            "label": names[int(cls)] if int(cls) < len(names) else str(int(cls)),
            "score": float(score),
            "box": [float(v) for v in box],
            "box_input": [float(v) for v in box_in],
        }
        for box, box_in, score, cls in zip(
            frame.xyxy, input_boxes, frame.confidence, frame.class_id
        )
    ]


def geometry_record(geometry: Letterbox) -> Dict[str, Any]:
    return {
        "frame_size": list(geometry.frame_size), "input_size": list(geometry.input_size),
        "scale": geometry.scale, "resized": list(geometry.resized),
        "pad_left": geometry.pad_left, "pad_top": geometry.pad_top,
    }


def detections_from_records(records: List[Dict]) -> Detections:
    if not records:
        return Detections.empty()
    return Detections(
        np.array([r["box"] for r in records], np.float32),
        np.array([r["score"] for r in records], np.float32),
        np.array([r["class_id"] for r in records], np.int32),
    )


def decode(outputs: Mapping[str, np.ndarray], geometry: Letterbox, config: PostprocessConfig,
           floor: float = FLOOR_CONF) -> Detections:
    """Post-process one image's outputs like the runtime, keeping scores down to ``floor``."""
    low = PostprocessConfig(conf=min(floor, config.conf), iou=config.iou, max_det=config.max_det)
    return postprocess(outputs, geometry, low)


def _size(values: Sequence[int]) -> Tuple[int, int]:
    width, height = values
    return int(width), int(height)


def load_reference(bundle: Bundle) -> Reference:
    """The reference the host recorded (hashes already checked by ``Bundle.load``)."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json
    from polygraphy.logger import G_LOGGER

    section = bundle.manifest.get("reference")
    if not section:
        raise JetyoloError(
            f"bundle {bundle.root} has no reference data; record it on the host with "
            f"`jetyolo reference {bundle.root} --images DIR`"
        )
    missing = [name for name in REFERENCE_FILES if name not in bundle.manifest["files"]]
    if missing:
        raise JetyoloError(
            f"bundle {bundle.root}: the manifest lists no hash for {missing[0]}; re-run "
            f"`jetyolo reference` on the host so every reference file is hashed"
        )
    recorded, current = section.get("model_sha256"), bundle.model_sha256(section["variant"])
    if recorded != current:
        raise JetyoloError(
            f"bundle {bundle.root}: the reference was recorded for model sha256 "
            f"{str(recorded)[:12]}, the bundle's {section['variant']} model is {current[:12]}; "
            "re-run `jetyolo reference` after changing the model"
        )
    try:  # the files are hashed, not trusted: a rehashed manifest can list anything
        data = json.loads(bundle.path(REFERENCE_DETECTIONS).read_text())
        images = [
            ReferenceImage(
                image["name"],
                Letterbox.fit(_size(image["geometry"]["frame_size"]), bundle.input_size),
                detections_from_records(image["detections"]),
            )
            for image in data["images"]
        ]
        post = PostprocessConfig(**data["postprocess"])
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL + 1):  # its critical() would print, then raise
            inputs = load_json(str(bundle.path(REFERENCE_INPUTS)), description="reference inputs")
            outputs = RunResults.load(str(bundle.path(REFERENCE_OUTPUTS)))
        if not (isinstance(inputs, list) and all(isinstance(feed, dict) for feed in inputs)):
            raise TypeError(f"{REFERENCE_INPUTS} holds a {type(inputs).__name__}, not feeds")
        conf = float(data["conf"])
    except Exception as exc:  # JSON, polygraphy, key and type errors alike: the same cause
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise JetyoloError(
            f"bundle {bundle.root}: its reference data is not what `jetyolo reference` writes "
            f"({type(exc).__name__}: {first_line}); re-run `jetyolo reference` on the host"
        ) from exc
    return Reference(
        section=dict(section),
        inputs=inputs,
        outputs=outputs,
        images=images,
        conf=conf,
        postprocess=post,
    )
