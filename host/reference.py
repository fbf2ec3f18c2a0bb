"""Record what the host's FP32 model computes on real images, into the bundle.

ONNX Runtime (FP32, CPU, through polygraphy) runs the bundle's fp32 model on real images
preprocessed exactly as the device does (``device.preprocess.Preprocessor``). Saved into the
bundle, hashed in the manifest:
  reference/inputs.json      the model inputs, polygraphy's data-loader JSON (--load-inputs)
  reference/outputs.json     the outputs, polygraphy RunResults (--load-outputs)
  reference/detections.json  post-processed detections per image, frame and input pixels
`jetyolo verify` on the device (or plain `polygraphy run ... --load-inputs ... --load-outputs`)
compares against them.
Example:
  jetyolo reference bundle/ --images data/valid/images --num 16
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from device.bundle import Bundle, add_files
from device.errors import JetyoloError
from device.files import atomic_write_json, sha256_file
from device.postprocess import PostprocessConfig
from device.preprocess import Letterbox, Preprocessor
from device.reference import (
    FLOOR_CONF,
    REFERENCE_DETECTIONS,
    REFERENCE_INPUTS,
    REFERENCE_OUTPUTS,
    decode,
    detection_records,
    geometry_record,
)
from device.sources import IMAGE_SUFFIXES  # what `jetyolo run` reads as images
from host._env import require

log = logging.getLogger(__name__)
DEFAULT_NUM = 16


def select_images(
    images: Union[Path, Sequence[Path]], num: int, flag: str = "--images"
) -> List[Path]:
    """``num`` images spread evenly over the sorted candidates (folders searched recursively);
    ``flag`` names the option in errors."""
    if num < 1:
        raise JetyoloError(f"--num {num}: need at least one reference image")
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if not folder.is_dir():
            raise JetyoloError(f"{flag} {folder} is not a folder; pass e.g. data/valid/images")
        candidates = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        where = str(folder)
    else:
        candidates = sorted(Path(p) for p in images)
        where = "the image list"
    if not candidates:
        raise JetyoloError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {where}")
    if len(candidates) <= num:
        return candidates
    picks = np.unique(np.linspace(0, len(candidates) - 1, num).round().astype(int))
    return [candidates[i] for i in picks]


def _read(path: Path) -> np.ndarray:
    import cv2

    frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if frame is None:
        raise JetyoloError(f"cannot read image {path}; remove it or pass a folder of valid images")
    return frame


def _display_name(path: Path, root: Optional[Path]) -> str:
    if root is not None:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return path.name


def preprocess_images(
    bundle: Bundle, variant: str, paths: Sequence[Path]
) -> Tuple[List[Dict[str, np.ndarray]], List[Letterbox]]:
    """One feed dict per image (a copy of the preprocess buffer) and its letterbox geometry."""
    spec = bundle.variant(variant)["input"]
    preprocessor = Preprocessor(bundle.input_size, spec["dtype"])
    batch = int(spec["shape"][0]) if spec["shape"] else 0
    if batch < 1 or list(preprocessor.buffer.shape[1:]) != list(spec["shape"][1:]):
        raise JetyoloError(
            f"variant {variant!r} input {spec['shape']} is not what the preprocessing makes "
            f"({list(preprocessor.buffer.shape)}); record the reference on the fp32 variant"
        )
    feeds, geometries = [], []
    for path in paths:
        geometries.append(preprocessor(_read(path)))
        # a batch-N graph (export --batch N) gets the image N times; entry 0 is the reference
        feeds.append({spec["name"]: np.repeat(preprocessor.buffer, batch, axis=0)})
    return feeds, geometries


def run_onnxruntime(model: Path, feeds: List[Dict[str, np.ndarray]], name: str) -> Any:
    """polygraphy's ONNX Runtime runner (CPU) over ``feeds``: a RunResults with one runner."""
    require("onnxruntime", "reference")
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    runner = OnnxrtRunner(SessionFromOnnx(str(model), providers=["cpu"]), name=name)
    with G_LOGGER.verbosity(G_LOGGER.WARNING):
        return Comparator.run([runner], data_loader=feeds)


def image_record(name: str, path: Path, geometry: Letterbox, iteration: Any,
                 config: PostprocessConfig, bundle: Bundle) -> Dict[str, Any]:
    """detections.json entry of one image: name, hash, letterbox geometry, detections."""
    outputs = {key: np.asarray(value) for key, value in iteration.items()}
    detections = decode(outputs, geometry, config, FLOOR_CONF)
    return {
        "name": name, "sha256": sha256_file(path), "geometry": geometry_record(geometry),
        "detections": detection_records(detections, geometry, bundle.class_names),
    }


def make_reference(
    bundle: Union[Bundle, Path, str],
    images: Union[Path, str, Sequence[Path]],
    num: int = DEFAULT_NUM,
    variant: str = "fp32",
) -> Bundle:
    """Record reference inputs, outputs and detections for ``bundle`` (see the module docstring);
    returns the updated bundle. `jetyolo export` calls it when given images."""
    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle, verify=True)
    root: Optional[Path] = None
    if isinstance(images, (str, Path)):
        root = Path(images)
        paths = select_images(root, num)
    else:
        paths = select_images(list(images), num)
    log.info("reference: %d images, %s model %s", len(paths), variant, bundle.model_path(variant))
    feeds, geometries = preprocess_images(bundle, variant, paths)
    runner_name = f"reference-onnxrt-{variant}"
    results = run_onnxruntime(bundle.model_path(variant), feeds, runner_name)
    config = PostprocessConfig(**bundle.manifest["postprocess"])
    image_records = [
        image_record(_display_name(path, root), path, geometry, iteration, config, bundle)
        for path, geometry, iteration in zip(paths, geometries, results[0][1])
    ]
    detections_doc, section = reference_documents(bundle, variant, runner_name, config,
                                                  image_records)
    updated = _save_reference(bundle, feeds, results, detections_doc, section)
    log.info("reference: wrote %s/reference/ (%d images)", bundle.root, len(paths))
    return updated


def reference_documents(
    bundle: Bundle, variant: str, runner_name: str, config: PostprocessConfig,
    image_records: List[Dict[str, Any]],
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(detections.json, the manifest's ``reference`` section) from the per-image records."""
    at_conf = sum(d["score"] >= config.conf for r in image_records for d in r["detections"])
    log.info("reference: %d detections at conf %.2f over %d images", at_conf, config.conf,
             len(image_records))
    runner = (f"polygraphy {require('polygraphy', 'reference').__version__} OnnxrtRunner, "
              f"onnxruntime {require('onnxruntime', 'reference').__version__} "
              "CPUExecutionProvider, float32")
    detections_doc = {
        "model_id": bundle.model_id, "variant": variant, "runner": runner,
        "conf": config.conf, "floor_conf": FLOOR_CONF,
        "postprocess": {"conf": config.conf, "iou": config.iou, "max_det": config.max_det},
        "class_names": bundle.class_names, "images": image_records,
    }
    section = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "variant": variant, "model_sha256": bundle.model_sha256(variant), "runner": runner,
        "runner_name": runner_name, "num": len(image_records),
        "images": [{"name": r["name"], "sha256": r["sha256"]} for r in image_records],
        "detections_at_conf": at_conf,
        "files": {"inputs": REFERENCE_INPUTS, "outputs": REFERENCE_OUTPUTS,
                  "detections": REFERENCE_DETECTIONS},
    }
    return detections_doc, section


def _save_reference(
    bundle: Bundle, feeds: List[Dict[str, np.ndarray]], results: Any,
    detections_doc: Dict[str, Any], section: Dict[str, Any],
) -> Bundle:
    """Stage the three files in a temp folder; ``add_files`` renames them in, manifest last."""
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    with tempfile.TemporaryDirectory(prefix="jetyolo-reference-") as tmp:
        staged = Path(tmp)
        with G_LOGGER.verbosity(G_LOGGER.WARNING):
            save_json(feeds, str(staged / "inputs.json"), description="reference inputs")
            results.save(str(staged / "outputs.json"))
        atomic_write_json(staged / "detections.json", detections_doc)
        return add_files(
            bundle,
            {REFERENCE_INPUTS: staged / "inputs.json", REFERENCE_OUTPUTS: staged / "outputs.json",
             REFERENCE_DETECTIONS: staged / "detections.json"},
            {"reference": section},
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="bundle directory (`jetyolo export` made it)")
    parser.add_argument("--images", type=Path, required=True,
                        help="folder of real images (searched recursively), e.g. data/valid/images")
    parser.add_argument("--num", type=int, default=DEFAULT_NUM,
                        help=f"images to record, spread over the folder (default {DEFAULT_NUM})")
    parser.add_argument("--variant", default="fp32", help="model to record (default fp32)")


def run(args: argparse.Namespace) -> int:
    bundle = make_reference(args.bundle, args.images, args.num, args.variant)
    section = bundle.manifest["reference"]
    print(f"reference: {section['num']} images, {section['detections_at_conf']} detections, "
          f"in {bundle.root}/reference/ ({section['runner']})")
    return 0
