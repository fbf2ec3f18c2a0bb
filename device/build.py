"""Build (or reuse) the TensorRT engine for a bundle on this device.

The engine is cached as a plain plan file with a JSON sidecar (its key: ONNX and INT8 input
hashes, precision, TensorRT version, GPU, L4T release, workspace setting). A matching plan is
reused; a changed key or a damaged plan is rebuilt. INT8 comes from the bundle's calibration
cache (TensorRT 8.5-10.x; its header and tensor names are checked first, and the head stays
FP16) or from its Q/DQ model (TensorRT >= 10, the only way on 11).

examples:
  jetyolo build bundles/synth320 --precision fp16
  jetyolo build bundles/synth320 --precision int8 --int8-from cache --workspace 1024
  jetyolo build bundles/synth320 --precision int8 --trt-version-check
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from device.bundle import Bundle
from device.engine import (
    INT8_SOURCES,
    PRECISIONS,
    BuildRequest,
    check_int8_cache,
    default_cache_dir,
    engine_key,
    needs_rebuild,
    parse_workspace,
    plan_path,
)
from device.errors import JetyoloError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory (made by `jetyolo export`)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16",
                        help="engine precision (default fp16)")
    parser.add_argument("--int8-from", choices=INT8_SOURCES, default=None,
                        help="INT8 source: the calibration cache or the Q/DQ model "
                             "(default: qdq on TensorRT >= 10 when the bundle has it, else cache)")
    parser.add_argument("--variant", default="fp32",
                        help="bundle graph to build from: fp32 (default), uint8, nms")
    parser.add_argument("--workspace", default="auto",
                        help="builder workspace: 'auto' (half the free memory, at most 4 GiB) "
                             "or MiB")
    parser.add_argument("--dla", type=int, default=None, metavar="N",
                        help="build for DLA core N with GPU fallback (Xavier, Orin AGX/NX)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"engine cache directory (default {default_cache_dir()})")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cache matches")
    parser.add_argument("--trt-version-check", action="store_true",
                        help="check that the bundle's INT8 inputs fit this device's TensorRT "
                             "(cache header, tensor names) and report the cache state; "
                             "build nothing")


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def request_from_args(args: argparse.Namespace) -> BuildRequest:
    """Flag checks that need no TensorRT, so a typo fails before the (slow) TensorRT import."""
    if args.int8_from and args.precision != "int8":
        raise JetyoloError("--int8-from only applies to --precision int8")
    if args.dla is not None and args.dla < 0:
        raise JetyoloError(f"--dla {args.dla}: a DLA core number is 0 or 1")
    return BuildRequest(
        precision=args.precision,
        int8_from=args.int8_from,
        variant=args.variant,
        workspace_bytes=parse_workspace(args.workspace),
        dla_core=args.dla,
        cache_dir=args.cache_dir,
        force=args.force,
    )


def load_tensorrt_ops() -> Any:
    from device.backends.tensorrt import TensorRTBuildOps, import_pycuda, import_tensorrt

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
        onnx_path = bundle.model_path(request.variant)
        check_int8_cache(inputs, onnx_path, build, facts, ops, print)
    cache_dir = request.cache_dir or default_cache_dir()
    plan = plan_path(cache_dir, bundle.model_id, request.precision, key.int8_source,
                     request.dla_core, request.variant)
    rebuild, reason = needs_rebuild(plan, key)
    print(("a build is needed: " if rebuild else "up to date: ") + reason)
    return 0


def run(args: argparse.Namespace) -> int:
    bundle = Bundle.load(args.bundle, verify=True)
    request = request_from_args(args)
    if request.variant != "fp32":
        bundle.variant(request.variant)  # names the bundle's variants when it lacks this one
    ops = load_tensorrt_ops()
    if args.trt_version_check:
        return check_only(bundle, request, ops)
    from device.engine import ensure_engine

    result = ensure_engine(bundle, request, ops, _log)
    print(result.plan)
    return 0
