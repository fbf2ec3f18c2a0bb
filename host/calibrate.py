"""Calibrate INT8 on the host's CPU and add both INT8 forms to the bundle.

    jetyolo calibrate BUNDLE --images DIR|LIST [--num 500] [--method entropy|minmax|percentile]
                      [--trt-version 10.3.0 [8.6.2 ...]] [--data DATA.yaml --max-drop 1.0]

One ONNX Runtime calibration pass over the images (through the device's preprocessing) gives the
per-tensor ranges; from them come a TensorRT calibration cache per --trt-version (implicit INT8,
TensorRT 8.5-10.x) and a Q/DQ model (explicit INT8, the only form TensorRT 11 takes). The head's
post-processing (DFL, sigmoid, box decode) stays in float in both. With --data, FP32 and INT8
mAP are measured on the val split; when the drop exceeds --max-drop, the layers whose INT8 input
loses most signal (measured) are kept in FP16, a few more at a time, until the drop is within the
limit, or the command fails with the figures and writes nothing. See docs/calibration.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from device import calibcache
from device.argtypes import finite_float
from device.bundle import Bundle, add_files
from device.errors import JetyoloError
from device.files import atomic_write_json
from device.postprocess import END2END_OUTPUTS, SPLIT_HEAD_OUTPUTS
from host import cache_variants, quantize
from host._env import installed_versions, require
from host.evaluate import EvalResult, evaluate_model, val_image_paths
from host.surgeon import load_onnx

log = logging.getLogger(__name__)

QDQ_FILE = "model_int8_qdq.onnx"
REPORT_FILE = "calibration.json"
CACHE_DIR = "calibration"
# trtexec --calib reads the cache through `class RndInt8Calibrator : public
# nvinfer1::IInt8EntropyCalibrator2` (TensorRT samples/common/sampleEngines.cpp, 8.5-10.x), and
# TensorRT ignores a cache whose header names another algorithm.
TRTEXEC_ALGORITHM = "EntropyCalibration2"
REPORT_VERSIONS = ("jetyolo", "onnxruntime", "onnx", "numpy", "opencv-python",
                   "opencv-python-headless", "ultralytics")
# Defaults of calibration/default.yaml (a test keeps the two equal). CLI flags override a recipe.
DEFAULT_RECIPE: Dict[str, Any] = {
    "method": "percentile",
    "num": 500,
    "min_images": 16,
    "num_bins": 2048,
    "num_quantized_bins": 128,
    "percentile": 99.999,
    "trt_versions": ["10.3.0"],
    "max_drop": 1.0,
    "max_fp16_layers": 8,
    "sensitivity_images": 16,
    "exclude_layers": [],
}


# ---- inputs -------------------------------------------------------------------------------------
def load_recipe(path: Optional[Path]) -> Dict[str, Any]:
    recipe = dict(DEFAULT_RECIPE)
    if path is None:
        return recipe
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise JetyoloError(f"cannot read recipe {path}: {exc}") from exc
    if not isinstance(loaded, dict):
        raise JetyoloError(f"recipe {path} must be a YAML mapping like calibration/default.yaml")
    unknown = sorted(set(loaded) - set(DEFAULT_RECIPE))
    if unknown:
        raise JetyoloError(
            f"recipe {path}: unknown key(s) {unknown}; known: {sorted(DEFAULT_RECIPE)}"
        )
    recipe.update(loaded)
    return recipe


def apply_flags(recipe: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    flags = {"method": args.method, "num": args.num, "max_drop": args.max_drop,
             "max_fp16_layers": args.max_fp16_layers, "trt_versions": _versions(args.trt_version),
             "exclude_layers": args.exclude}
    merged = dict(recipe)
    merged.update({key: value for key, value in flags.items() if value is not None})
    if merged["method"] not in quantize.METHODS:
        raise JetyoloError(f"--method {merged['method']!r} is not one of {list(quantize.METHODS)}")
    if float(merged["max_drop"]) < 0 or int(merged["max_fp16_layers"]) < 0:
        raise JetyoloError("--max-drop and --max-fp16-layers must be >= 0")
    return merged


def _versions(values: Optional[Sequence[str]]) -> Optional[List[str]]:
    if not values:
        return None
    return [part for value in values for part in value.replace(",", " ").split()]


def checked_trt_versions(versions: Sequence[str]) -> Dict[str, int]:
    """Normalised version text -> header int, in order; unknown or TensorRT 11+ versions refused
    (calibcache says why and points TensorRT 11 to the Q/DQ model)."""
    if not versions:
        raise JetyoloError(
            "no --trt-version given; pass the Jetson's, e.g. 10.3.0 (JetPack 6.1/6.2)"
        )
    checked: Dict[str, int] = {}
    for text in versions:
        number = calibcache.trt_version_int(text)
        checked.setdefault(calibcache.version_text(number), number)
    return checked


def split_head_nodes(bundle: Bundle, model: Any) -> List[str]:
    """The head's post-processing node names present in the graph; refuses a bundle whose fp32
    graph does not end in a split head: ``boxes``/``scores`` (one-to-many) or
    ``det_boxes``/``det_scores``/``det_classes`` (YOLO26 end-to-end, whose TopK/Gather and score
    and class tensors are head nodes too, so they stay out of INT8 like the DFL and sigmoid)."""
    outputs = [o.name for o in model.graph.output]
    if sorted(outputs) not in (sorted(SPLIT_HEAD_OUTPUTS), sorted(END2END_OUTPUTS)):
        raise JetyoloError(
            f"bundle {bundle.root}: the fp32 model's outputs are {outputs}, not a split head "
            f"({list(SPLIT_HEAD_OUTPUTS)} or {list(END2END_OUTPUTS)}): INT8 would share one "
            "scale between boxes and scores; re-export the bundle with `jetyolo export`"
        )
    listed = bundle.manifest.get("head", {}).get("postprocess_nodes")
    if not listed:
        raise JetyoloError(
            f"bundle {bundle.root}: manifest has no head.postprocess_nodes (the DFL/sigmoid/decode "
            "nodes INT8 must not touch); re-export the bundle with `jetyolo export`"
        )
    present = {node.name for node in model.graph.node}
    return [name for name in listed if name in present]


# ---- the accuracy gate --------------------------------------------------------------------------
@dataclass
class GateStep:
    """One gate attempt: the Q/DQ model (explicit INT8) and the cache's simulation (implicit INT8,
    every tensor the cache lists in int8) with the same layers kept in FP16."""

    fp16_layers: List[str]
    result: EvalResult
    cache_result: EvalResult

    def drop(self, fp32: EvalResult) -> float:
        return (fp32.map50_95 - self.result.map50_95) * 100

    def cache_drop(self, fp32: EvalResult) -> float:
        return (fp32.map50_95 - self.cache_result.map50_95) * 100

    def worst_drop(self, fp32: EvalResult) -> float:
        return max(self.drop(fp32), self.cache_drop(fp32))


@dataclass
class Gate:
    fp32: EvalResult
    max_drop: float
    method: str
    steps: List[GateStep] = field(default_factory=list)
    sensitivity: List[Tuple[str, float]] = field(default_factory=list)

    @property
    def final(self) -> GateStep:
        return self.steps[-1]

    @property
    def passed(self) -> bool:
        return bool(self.steps) and self.final.worst_drop(self.fp32) <= self.max_drop

    def to_dict(self) -> Dict[str, Any]:
        return {
            "metric": "mAP50-95 drop in points (FP32 - INT8 on ONNX Runtime, val split), for the "
                      "Q/DQ model and for the cache simulation (every cached tensor in int8); "
                      "the gate applies to both",
            "max_drop": self.max_drop,
            "passed": self.passed,
            "fp32": self.fp32.to_dict(),
            "int8": self.final.result.to_dict(),
            "int8_cache": self.final.cache_result.to_dict(),
            "drop": round(self.final.drop(self.fp32), 3),
            "cache_drop": round(self.final.cache_drop(self.fp32), 3),
            "steps": [{"fp16_layers": len(step.fp16_layers), "drop": round(step.drop(self.fp32), 3),
                       "cache_drop": round(step.cache_drop(self.fp32), 3),
                       "map50_95": round(step.result.map50_95, 5),
                       "cache_map50_95": round(step.cache_result.map50_95, 5)}
                      for step in self.steps],
            "sensitivity_sqnr_db": [[name, round(db, 2)] for name, db in self.sensitivity],
        }

    def failure(self) -> str:
        tried = ", ".join(
            f"{len(step.fp16_layers)} layers: {step.drop(self.fp32):.2f} Q/DQ, "
            f"{step.cache_drop(self.fp32):.2f} cache" for step in self.steps
        )
        worst = ", ".join(f"{name} ({db:.1f} dB)" for name, db in self.sensitivity[:3])
        others = " or ".join(m for m in quantize.METHODS if m != self.method)
        final = self.final
        return (
            f"INT8 loses {final.worst_drop(self.fp32):.2f} mAP50-95 points (FP32 "
            f"{self.fp32.map50_95:.4f} -> INT8 Q/DQ {final.result.map50_95:.4f}, INT8 cache "
            f"{final.cache_result.map50_95:.4f}), more than "
            f"--max-drop {self.max_drop:g}, even with the {len(final.fp16_layers)} most "
            f"sensitive layers in FP16 (drop by FP16 layers: {tried}; most sensitive: "
            f"{worst or 'not measured'}); try --method {others}, more and more "
            "representative --images, a larger --max-fp16-layers, or --exclude LAYER; "
            "nothing was written to the bundle"
        )


def exclusion_steps(limit: int) -> List[int]:
    """How many of the most sensitive layers to keep in FP16 per attempt: 1, 2, 4, ... limit."""
    steps, count = [], 1
    while count < limit:
        steps.append(count)
        count *= 2
    return [*steps, limit] if limit > 0 else []


def run_gate(
    ctx: Calibration, data_yaml: Path, max_drop: float, max_fp16_layers: int,
    eval_limit: Optional[int],
) -> Gate:
    images, names = val_image_paths(data_yaml)
    images = images[:eval_limit] if eval_limit else images
    log.info("calibrate: accuracy gate on %d val images of %s", len(images), data_yaml)
    fp32 = evaluate_model(ctx.bundle.model_path("fp32"), ctx.bundle, images, names, "fp32")
    gate = Gate(fp32, max_drop, ctx.ranges.method)
    qdq = ctx.build_qdq([])
    gate.steps.append(_gate_step(ctx, qdq, [], images, names))
    _log_step(gate)
    if gate.passed or max_fp16_layers == 0:
        return gate
    gate.sensitivity = quantize.layer_sensitivity(
        qdq, ctx.input_name, ctx.bundle.input_size, ctx.sensitivity_paths
    )
    for count in exclusion_steps(min(max_fp16_layers, len(gate.sensitivity))):
        layers = [name for name, _ in gate.sensitivity[:count]]
        qdq = ctx.build_qdq(layers)
        gate.steps.append(_gate_step(ctx, qdq, layers, images, names))
        _log_step(gate)
        if gate.passed:
            break
    return gate


def _gate_step(
    ctx: Calibration, qdq: Path, layers: List[str], images: Sequence[Path], names: Sequence[str]
) -> GateStep:
    result = evaluate_model(qdq, ctx.bundle, images, names, "int8-qdq")
    simulated = ctx.build_cache_simulation(qdq, layers)
    return GateStep(layers, result, evaluate_model(simulated, ctx.bundle, images, names,
                                                   "int8-cache"))


def _log_step(gate: Gate) -> None:
    step = gate.final
    log.info("calibrate: FP32 %.4f, INT8 Q/DQ %.4f, INT8 cache %.4f mAP50-95: drop %.2f / %.2f "
             "points with %d layer(s) in FP16", gate.fp32.map50_95, step.result.map50_95,
             step.cache_result.map50_95, step.drop(gate.fp32), step.cache_drop(gate.fp32),
             len(step.fp16_layers))


# ---- the run ------------------------------------------------------------------------------------
@dataclass
class Calibration:
    """Everything one calibration run holds while it works in ``workdir``."""

    bundle: Bundle
    model: Any
    workdir: Path
    ranges: quantize.Ranges
    head_nodes: List[str]
    user_excluded: List[str]
    sensitivity_paths: List[Path]
    input_name: str = "images"

    def build_qdq(self, fp16_layers: Sequence[str]) -> Path:
        excluded = [*self.head_nodes, *self.user_excluded, *fp16_layers]
        path = self.workdir / QDQ_FILE
        quantize.build_qdq_model(self.bundle.model_path("fp32"), self.ranges, path, excluded)
        qdq = load_onnx(path, "calibrate")
        problems = quantize.qdq_problems(qdq, quantize.head_tensors(self.model, self.head_nodes))
        if problems:
            raise JetyoloError(f"the Q/DQ model fails TensorRT's rules: {problems[0]} "
                               f"(and {len(problems) - 1} more); please report this bundle")
        return path

    def build_cache_simulation(self, qdq_path: Path, fp16_layers: Sequence[str]) -> Path:
        """What the fp32 cache builds on TensorRT, as an ONNX model (cache_variants)."""
        fp32 = variant_caches(self, fp16_layers, only=["fp32"])[0]
        qdq = load_onnx(qdq_path, "calibrate")
        model = cache_variants.build_cache_simulation(qdq, fp32.entries)
        path = self.workdir / "model_int8_cache_simulation.onnx"
        require("onnx", "calibrate").save(model, str(path))
        return path


def calibrate(
    bundle_root: Path,
    images: Path,
    recipe: Mapping[str, Any],
    data_yaml: Optional[Path] = None,
    eval_limit: Optional[int] = None,
) -> Bundle:
    """Run the whole calibration and add its files to the bundle; nothing is written on failure."""
    bundle = Bundle.load(bundle_root)
    versions = checked_trt_versions(recipe["trt_versions"])
    model = load_onnx(bundle.model_path("fp32"), "calibrate")
    head_nodes = split_head_nodes(bundle, model)
    user_excluded = _checked_layers(recipe["exclude_layers"], model)
    input_name = bundle.variant("fp32")["input"]["name"]
    if bundle.variant("fp32")["input"].get("dtype", "float32") != "float32":
        raise JetyoloError(
            "the fp32 variant's input is not float32; calibrate a bundle with a float input"
        )
    chosen = quantize.select_images(Path(images), int(recipe["num"]), int(recipe["min_images"]))
    ranges = quantize.collect_ranges(bundle.model_path("fp32"), input_name, bundle.input_size,
                                     chosen.paths, recipe["method"], recipe)
    contract = cache_variants.input_contract_amax("float32", bundle.manifest["preprocess"])
    cache_variants.apply_input_contract(ranges, input_name, contract)
    with tempfile.TemporaryDirectory(prefix="jetyolo-calibrate-") as tmp:
        ctx = Calibration(bundle, model, Path(tmp), ranges, head_nodes, user_excluded,
                          chosen.paths[: int(recipe["sensitivity_images"])], input_name)
        gate: Optional[Gate] = None
        if data_yaml is not None:
            gate = run_gate(ctx, data_yaml, float(recipe["max_drop"]),
                            int(recipe["max_fp16_layers"]), eval_limit)
            if not gate.passed:
                raise JetyoloError(gate.failure())
        fp16_by_sensitivity = gate.final.fp16_layers if gate else []
        qdq_path = ctx.build_qdq(fp16_by_sensitivity)
        caches = variant_caches(ctx, fp16_by_sensitivity)
        files = write_caches(caches, versions, Path(tmp), quantize.TRT_ALGORITHMS[recipe["method"]])
        files[QDQ_FILE] = qdq_path
        report = calibration_report(ctx, chosen, Path(images), versions, fp16_by_sensitivity, gate,
                                    qdq_path, recipe, caches)
        report_path = Path(tmp) / REPORT_FILE
        atomic_write_json(report_path, report)
        files[REPORT_FILE] = report_path
        updated = add_files(bundle, files, manifest_updates(bundle, report))
    return updated


def _checked_layers(names: Sequence[str], model: Any) -> List[str]:
    present = {node.name for node in model.graph.node}
    unknown = [name for name in names if name not in present]
    if unknown:
        raise JetyoloError(f"--exclude {unknown[0]!r} is not a node of the bundle's ONNX model; "
                           "use node names as in calibration.json's sensitivity list or Netron")
    return list(names)


def variant_caches(
    ctx: Calibration, fp16_by_sensitivity: Sequence[str], only: Optional[Sequence[str]] = None
) -> List[cache_variants.VariantCache]:
    """The cache content of every variant an implicit-INT8 engine can be built from (or of the
    variants ``only``), each from its own ONNX graph (docs/calibration.md, "One cache per
    variant"); the layers kept in FP16 have their tensors left out."""
    measured = {name: ctx.ranges.amax(name) for name in ctx.ranges.values}
    fp32_nodes = {node.name for node in ctx.model.graph.node}
    head = ctx.bundle.manifest["head"]["postprocess_nodes"]
    caches = []
    for name in cache_variants.cache_variant_names(ctx.bundle.manifest["variants"]):
        if only is not None and name not in only:
            continue
        variant = ctx.bundle.variant(name)
        model = ctx.model if name == "fp32" else load_onnx(ctx.bundle.model_path(name), "calibrate")
        dtype = str(variant["input"].get("dtype", "float32"))
        caches.append(cache_variants.variant_cache(
            name, model, dtype, measured, head, fp32_nodes, ctx.bundle.manifest["preprocess"],
            [*ctx.user_excluded, *fp16_by_sensitivity],
        ))
    return caches


def write_caches(
    caches: Sequence[cache_variants.VariantCache], versions: Mapping[str, int], workdir: Path,
    algorithm: str,
) -> Dict[str, Path]:
    """One TensorRT cache per version and variant (read back and compared before it is
    accepted)."""
    files: Dict[str, Path] = {}
    for cache in caches:
        for text in versions:
            relative = cache_variants.cache_file(text, cache.variant)
            path = calibcache.write_cache(workdir / relative, cache.entries, text, algorithm)
            if list(calibcache.read_cache(path).scales) != cache.tensors:
                raise JetyoloError(f"{relative} does not read back with the tensors written; "
                                   "please report this bundle")
            files[relative] = path
    return files


def calibration_report(
    ctx: Calibration,
    chosen: quantize.CalibrationSet,
    source: Path,
    versions: Mapping[str, int],
    fp16_by_sensitivity: Sequence[str],
    gate: Optional[Gate],
    qdq_path: Path,
    recipe: Mapping[str, Any],
    caches: Sequence[cache_variants.VariantCache],
) -> Dict[str, Any]:
    fp16_layers = [*ctx.head_nodes, *ctx.user_excluded, *fp16_by_sensitivity]
    fp32 = next(cache for cache in caches if cache.variant == "fp32")
    qdq = load_onnx(qdq_path, "calibrate")
    algorithm = quantize.TRT_ALGORITHMS[ctx.ranges.method]
    return {
        "schema": 1,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "bundle": ctx.bundle.name,
        "onnx": ctx.bundle.variant("fp32")["file"],
        "onnx_sha256": ctx.bundle.model_sha256("fp32"),
        "method": ctx.ranges.method,
        "trt_algorithm": algorithm,
        "recipe": dict(recipe),
        "images": {
            "source": str(source),
            "count": len(chosen.images),
            "skipped": [{"path": path, "reason": reason} for path, reason in chosen.skipped],
            "list": [{"path": str(image.path), "sha256": image.sha256} for image in chosen.images],
        },
        "timing": {"calibration_s": round(ctx.ranges.seconds, 2),
                   "images_per_s": round(ctx.ranges.images / max(ctx.ranges.seconds, 1e-9), 2)},
        "excluded_layers": {
            "head_postprocess": ctx.head_nodes,
            "sensitivity": list(fp16_by_sensitivity),
            "user": ctx.user_excluded,
        },
        "fp16_layers": fp16_layers,
        "cache": {
            "algorithm": algorithm,
            "files": cache_files(versions, algorithm, "fp32"),
            "tensors": len(fp32.entries),
            "left_out_tensors": fp32.uncached,
            "input_contract": fp32.from_contract,
            "scale": "amax / 127, big-endian float32 hex",
            "variants": {cache.variant: variant_record(cache, versions, algorithm, fp16_layers)
                         for cache in caches},
            "graph_tensors": {cache.variant: cache.graph_tensors for cache in caches},
        },
        "qdq": {
            "file": QDQ_FILE,
            "op_types": list(quantize.QUANTIZED_OP_TYPES),
            "quantized_layers": len(quantize.quantized_layers(qdq)),
            "options": quantize.QDQ_EXTRA_OPTIONS,
        },
        "ranges": {name: [low, high] for name, (low, high) in ctx.ranges.values.items()},
        "accuracy": gate.to_dict() if gate else None,
        "versions": installed_versions(REPORT_VERSIONS),
    }


def cache_files(versions: Mapping[str, int], algorithm: str, variant: str) -> Dict[str, Any]:
    return {text: {"file": cache_variants.cache_file(text, variant),
                   "header": f"TRT-{number}-{algorithm}"} for text, number in versions.items()}


def variant_record(
    cache: cache_variants.VariantCache, versions: Mapping[str, int], algorithm: str,
    fp16_layers: Sequence[str],
) -> Dict[str, Any]:
    """``calibration.variants.<name>`` of the manifest: that variant's caches, the tensors they
    leave in float and the layers kept in FP16 (the cache's lines are ``calibration.tensors``
    of the variant minus ``uncached_tensors``)."""
    return {
        "caches": cache_files(versions, algorithm, cache.variant),
        "uncached_tensors": cache.uncached,
        "fp16_layers": list(dict.fromkeys([*fp16_layers, *cache.fp16_layers])),
        "input_contract": cache.from_contract,
    }


def manifest_updates(bundle: Bundle, report: Mapping[str, Any]) -> Dict[str, Any]:
    fp32 = bundle.variant("fp32")
    accuracy = report["accuracy"]
    return {
        "variants": {"int8-qdq": {
            "file": QDQ_FILE,
            "input": fp32["input"],
            "contract": fp32.get("contract", "split_head"),
            "outputs": fp32["outputs"],
            "quantization": {"format": "QDQ", "activations": "int8 symmetric per-tensor",
                             "weights": "int8 symmetric per-channel (axis 0)",
                             "float_dtype": "float32", "method": report["method"]},
        }},
        "calibration": {
            "file": REPORT_FILE,
            "method": report["method"],
            "algorithm": report["trt_algorithm"],
            "onnx_sha256": report["onnx_sha256"],
            "images": report["images"]["count"],
            "caches": report["cache"]["files"],
            "fp16_layers": report["fp16_layers"],
            "uncached_tensors": report["cache"]["left_out_tensors"],
            "variants": report["cache"]["variants"],
            "tensors": report["cache"]["graph_tensors"],
            "accuracy": None if accuracy is None else {
                "max_drop": accuracy["max_drop"], "passed": accuracy["passed"],
                "drop": accuracy["drop"], "fp32_map50_95": accuracy["fp32"]["map50_95"],
                "int8_map50_95": accuracy["int8"]["map50_95"],
                "cache_drop": accuracy["cache_drop"],
                "int8_cache_map50_95": accuracy["int8_cache"]["map50_95"],
            },
        },
    }


# ---- CLI ----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="bundle directory (from `jetyolo export`)")
    parser.add_argument("--images", type=Path, required=True,
                        help="folder of calibration images (recursive) or a .txt list of paths")
    parser.add_argument("--num", type=int, help="images to use, first N in sorted order "
                        f"({DEFAULT_RECIPE['num']})")
    parser.add_argument("--method", choices=quantize.METHODS,
                        help=f"range method ({DEFAULT_RECIPE['method']})")
    parser.add_argument("--trt-version", nargs="+", metavar="X.Y.Z",
                        help="TensorRT version(s) of the Jetson(s), 8.5-10.x: one cache each "
                             "(10.3.0 = JetPack 6.1/6.2, 8.6.2 = JP 6.0, 8.5.2 = JP 5.1; "
                             f"default {' '.join(DEFAULT_RECIPE['trt_versions'])})")
    parser.add_argument("--data", type=Path, help="data.yaml: gate INT8 on its val split mAP")
    parser.add_argument("--max-drop", type=finite_float,
                        help=f"allowed mAP50-95 drop in points ({DEFAULT_RECIPE['max_drop']})")
    parser.add_argument("--max-fp16-layers", type=int,
                        help="most sensitive layers the gate may keep in FP16 "
                             f"({DEFAULT_RECIPE['max_fp16_layers']}; 0 = none)")
    parser.add_argument("--exclude", nargs="+", metavar="NODE", help="ONNX nodes to keep in FP16")
    parser.add_argument("--eval-limit", type=int, help="gate on the first N val images only")
    parser.add_argument("--recipe", type=Path, help="recipe YAML (see calibration/default.yaml)")


def run(args: argparse.Namespace) -> int:
    recipe = apply_flags(load_recipe(args.recipe), args)
    if args.data is None and args.max_drop is not None:
        raise JetyoloError("--max-drop needs --data DATA.yaml (the val split it is measured on)")
    if args.eval_limit is not None and args.eval_limit < 1:
        raise JetyoloError(f"--eval-limit must be at least 1, got {args.eval_limit}")
    bundle = calibrate(args.bundle, args.images, recipe, args.data, args.eval_limit)
    calibration = bundle.manifest["calibration"]
    print(f"calibration: {calibration['images']} images, method {calibration['method']}, "
          f"{len(calibration['fp16_layers'])} layer(s) kept in FP16")
    for variant, record in calibration["variants"].items():
        for version, entry in record["caches"].items():
            cached = len(calibration["tensors"][variant]) - len(record["uncached_tensors"])
            print(f"  TensorRT {version} {variant}: {bundle.root / entry['file']} "
                  f"({entry['header']}, {cached} tensors)")
    if calibration["algorithm"] != TRTEXEC_ALGORITHM:
        print(f"  note: trtexec --calib reads only {TRTEXEC_ALGORITHM} caches; these are "
              f"{calibration['algorithm']}: build with `jetyolo build`, or calibrate with "
              "--method percentile or entropy for trtexec")
    print(f"  Q/DQ model: {bundle.root / QDQ_FILE} (variant int8-qdq)")
    accuracy = calibration["accuracy"]
    if accuracy:
        print(f"  mAP50-95 FP32 {accuracy['fp32_map50_95']:.4f}, "
              f"INT8 Q/DQ {accuracy['int8_map50_95']:.4f} (drop {accuracy['drop']:.2f}), "
              f"INT8 cache simulation {accuracy['int8_cache_map50_95']:.4f} "
              f"(drop {accuracy['cache_drop']:.2f}); both <= {accuracy['max_drop']:g} points")
    else:
        print("  accuracy not measured: pass --data DATA.yaml to gate INT8 on the val split")
    return 0
