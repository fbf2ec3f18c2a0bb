"""Build (or reuse) the TensorRT engine for a bundle on this device.

The engine is cached as a plain plan file with a JSON sidecar (its key: ONNX and INT8 input
hashes, precision, TensorRT version, GPU, L4T release, workspace setting). A matching plan is
reused; a changed key or a damaged plan is rebuilt. INT8 comes from the bundle's calibration
cache (TensorRT 8.5-10.x; its header and tensor names are checked first, and the head stays
FP16) or from its Q/DQ model (TensorRT >= 10, the only way on 11).

With ``--config FILE`` (the service's form) the bundle, backend, precision, int8_from, variant
and engine_cache_dir come from the same YAML file ``jetyolo run --config`` reads, so the engine
built is the one the detector loads; flags override the file. A config whose backend is
onnxruntime (or auto on a device without TensorRT) needs no engine: the verb says so and exits 0.

examples:
  jetyolo build bundles/synth320 --precision fp16
  jetyolo build --config /etc/jetyolo/config.yaml
  jetyolo build bundles/synth320 --precision int8 --int8-from cache --workspace 1024
  jetyolo build bundles/synth320 --precision int8 --trt-version-check
  jetyolo build bundles/synth320 --variant frame --frame-size 1920x1080

A bundle exported with ``--batch N`` gets an optimisation profile of 1..N frames per call (plan
``fp16-b4.plan``); the frame variant one pinned to the camera's frame size
(``fp16-frame-1920x1080.plan``): docs/tensorrt.md, "Optimisation profiles".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Tuple

from device import argtypes
from device.backends import BACKEND_KINDS, tensorrt_missing
from device.bundle import Bundle
from device.choice import INT8_SOURCES, PRECISIONS, QDQ_VARIANT, BackendChoice, parse_workspace
from device.config import RunConfig, load_config
from device.engine import BuildRequest, check_int8_cache, engine_key
from device.engine_cache import default_cache_dir, key_plan_path, needs_rebuild
from device.errors import JetyoloError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", nargs="?",
                        help="bundle directory (made by `jetyolo export`, or `bundle:` in "
                             "--config)")
    parser.add_argument("--config", help="the `jetyolo run` YAML file (docs/runtime.md): bundle, "
                                         "backend, precision, int8_from, variant, "
                                         "engine_cache_dir")
    parser.add_argument("--backend", choices=BACKEND_KINDS, default=None,
                        help="tensorrt (default without --config), or auto/onnxruntime as the "
                             "detector runs: nothing is built for ONNX Runtime")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="engine precision (default: fp16; on TensorRT 11 fp16 when the "
                             "bundle has its fp16 graph, else fp32)")
    parser.add_argument("--int8-from", choices=INT8_SOURCES, default=None,
                        help="INT8 source: the calibration cache or the Q/DQ model "
                             "(default: qdq on TensorRT >= 10 when the bundle has it, else cache)")
    parser.add_argument("--variant", default=None,
                        help="bundle graph to build from: fp32 (default), uint8, nms, "
                             f"{QDQ_VARIANT}")
    parser.add_argument("--workspace", default=None,
                        help="builder workspace: 'auto' (half the free memory, at most 4 GiB; "
                             "default) or MiB; part of the engine's key, so set it in the run "
                             "config (workspace:) for `jetyolo run` to load this engine")
    parser.add_argument("--dla", type=int, default=None, metavar="N",
                        help="build for DLA core N with GPU fallback (Xavier, Orin AGX/NX)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"engine cache directory (default {default_cache_dir()})")
    parser.add_argument("--frame-size", type=argtypes.frame_size, default=None, metavar="WxH",
                        help="the camera frame the frame variant's engine is built for (default: "
                             "the config's capture_width x capture_height); part of its key")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache matches")
    parser.add_argument("--trt-version-check", action="store_true",
                        help="check that the bundle's INT8 inputs fit this device's TensorRT "
                             "(cache header, tensor names) and report the cache state; "
                             "build nothing")


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config's build settings (``--config``), flags overriding them. Without a config
    file the backend is tensorrt: building an engine is what was asked for."""
    backend = args.backend or (None if args.config else "tensorrt")
    overrides = {
        "bundle": args.bundle, "backend": backend, "precision": args.precision,
        "int8_from": args.int8_from, "variant": args.variant,
        "engine_cache_dir": str(args.cache_dir) if args.cache_dir is not None else None,
        "workspace_mib": parse_workspace(args.workspace) if args.workspace else None,
        "dla": args.dla,
    }
    return load_config(args.config, overrides, required_keys=("bundle",))


def no_engine_reason(config: RunConfig) -> Optional[str]:
    """Why the configured backend needs no TensorRT engine, or None when it does."""
    if config.backend == "onnxruntime":
        return "the backend is onnxruntime"
    if config.backend == "auto":
        missing = tensorrt_missing()
        if missing:
            return f"the backend is auto and TensorRT is unavailable ({missing}), so the " \
                   "detector runs on ONNX Runtime"
    return None


def configured_frame_size(config: RunConfig) -> Optional[Tuple[int, int]]:
    """The camera frame size the config states: capture_width x capture_height, top level or of
    its one ``sources:`` entry. ``jetyolo-build.service`` runs before the service opens the
    camera, so the frame variant's engine is built for the size the config asks the camera for
    (``jetyolo run`` probes the opened source; a camera that delivers another size gets its own
    plan, built at start)."""
    width, height = config.capture_width, config.capture_height
    entries = config.sources or []
    if (width is None or height is None) and len(entries) == 1:
        entry = entries[0]
        width, height = entry.get("capture_width", config), entry.get("capture_height", config)
    return (width, height) if width is not None and height is not None else None


def request_from_args(args: argparse.Namespace, config: RunConfig) -> BuildRequest:
    """Flag checks that need no TensorRT, so a typo fails before the (slow) TensorRT import."""
    choice = BackendChoice.from_config(config)
    if args.int8_from and choice.precision != "int8" and not choice.is_qdq:
        raise JetyoloError(f"--int8-from only applies to precision int8 (precision is "
                           f"{choice.precision or 'the default'}); drop it or add "
                           "--precision int8")
    size = getattr(args, "frame_size", None) or configured_frame_size(config)
    return choice.build_request(force=args.force, frame_size=size)


def load_tensorrt_ops() -> Any:
    from device.backends.tensorrt_build import TensorRTBuildOps
    from device.backends.tensorrt_util import import_pycuda, import_tensorrt

    import_tensorrt()
    import_pycuda()
    return TensorRTBuildOps()


def check_only(bundle: Bundle, request: BuildRequest, ops: Any) -> int:
    facts = ops.device_facts()
    key, build, inputs, why = engine_key(bundle, request, facts)
    print(f"TensorRT {facts.trt_version} on {facts.gpu_name} (sm {facts.compute_capability}), "
          f"L4T {facts.l4t_release or 'n/a'}")
    if why:
        print(f"INT8 from {why}")
    if build.calibrator_from_cache and inputs is not None:
        onnx_path = bundle.model_path(key.variant)
        check_int8_cache(inputs, onnx_path, build, facts, ops, print)
    plan = key_plan_path(request.cache_dir or default_cache_dir(), bundle.model_id, key)
    rebuild, reason = needs_rebuild(plan, key)
    print(("a build is needed: " if rebuild else "up to date: ") + reason)
    return 0


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    reason = no_engine_reason(config)
    if reason:
        print(f"jetyolo build: no TensorRT engine is needed: {reason}", flush=True)
        return 0
    request = request_from_args(args, config)
    bundle = Bundle.load(config.bundle, verify=True)
    if request.variant != "fp32":
        bundle.variant(request.variant)  # names the bundle's variants when it lacks this one
    ops = load_tensorrt_ops()
    if args.trt_version_check:
        return check_only(bundle, request, ops)
    from device.engine import ensure_engine

    result = ensure_engine(bundle, request, ops, _log)
    print(result.plan)
    return 0
