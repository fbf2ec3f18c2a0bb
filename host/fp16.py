"""The bundle's fp16 variant: float16 weights and activations, float32 input and outputs, the head's
post-processing (DFL, sigmoid, box decode) kept in float32.

TensorRT 11 builds strongly typed networks only: each layer runs in the type its ONNX tensors
have, and there is no FP16 builder flag. A half-precision engine on TensorRT 11 therefore needs a
half-precision graph; this is it. The conversion is ONNX Runtime's
``onnxruntime.transformers.float16.convert_float_to_float16`` (keep_io_types + node_block_list).
onnxconverter-common 1.16's function of the same name was tried first and left the outputs
float16 when the nodes producing them were blocked (boxes/scores typed tensor(float16)), which
breaks the float32 output contract; ONNX Runtime's copy keeps them float32.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import numpy as np

from device.errors import JetyoloError
from host import parity, surgeon
from host._env import require

log = logging.getLogger(__name__)
FP16_FILE = "model_fp16.onnx"


@dataclass(frozen=True)
class Fp16Tolerance:
    """fp16 against fp32 on ONNX Runtime, on the parity frames. float16 has an 11-bit
    significand: a box coordinate near 320 px is stored to 0.25 px, near 640 px to 0.5 px, and
    the backbone's rounding adds up. Measured on the fixture model at 320 px, 16 synthetic parity
    frames: boxes <= 0.49 px, scores <= 2.0e-3, 58 of 58 detections matched; the limits leave 4x
    and 5x headroom; halving the first Conv's weights moves boxes by 200 px and scores by 0.88
    (tests/host/test_fp16.py)."""

    boxes_atol: float = 2.0  # input pixels
    scores_atol: float = 1e-2


def fp16_model(model: Any, keep_float_nodes: Iterable[str]) -> Any:
    """``model`` in float16 except ``keep_float_nodes`` (Casts inserted around them), float32 I/O,
    topologically sorted and checked like every export pass."""
    float16 = require("onnxruntime.transformers.float16", "export")
    with warnings.catch_warnings():  # per-weight "truncated to 5.96e-08" notices
        warnings.simplefilter("ignore")
        converted = float16.convert_float_to_float16(
            model, keep_io_types=True, node_block_list=sorted(set(keep_float_nodes))
        )
    converted = surgeon.export_model(surgeon.import_graph(converted))  # the converter's Casts
    surgeon.check_model(converted, "float16")  # come after their consumers: toposort
    return converted


def fp16_problems(difference: Dict[str, Any], tolerance: Fp16Tolerance) -> List[str]:
    problems = []
    if not difference["boxes"] <= tolerance.boxes_atol:
        problems.append(f"boxes differ by {difference['boxes']:.3g} px > {tolerance.boxes_atol:g}")
    if not difference["scores"] <= tolerance.scores_atol:
        problems.append(f"scores differ by {difference['scores']:.3g} > {tolerance.scores_atol:g}")
    # detection agreement is recorded, not gated: a detection at the confidence threshold flips
    # in fp16 (YOLOv8n fixture: 0.933 with scores within the limit); the tensors decide
    return problems


def checked_fp16(
    fp32_path: Path,
    fp16_path: Path,
    frames: Sequence[np.ndarray],
    input_size: Tuple[int, int],
    batch: int = 1,
    tolerance: Fp16Tolerance = Fp16Tolerance(),
) -> Dict[str, Any]:
    """The fp16-vs-fp32 parity record for the manifest; over tolerance, one JetyoloError line."""
    difference = parity.variant_difference(fp32_path, fp16_path, frames, input_size, batch)
    log.info("  fp16 vs fp32: boxes max abs %.3g px, scores max abs %.3g, agreement %.4f",
             difference["boxes"], difference["scores"], difference["detections"]["agreement"])
    problems = fp16_problems(difference, tolerance)
    if problems:
        raise JetyoloError(
            f"the fp16 variant is not at parity with fp32 on ONNX Runtime: {'; '.join(problems)}; "
            "nothing was written"
        )
    return dict(difference, tolerance=asdict(tolerance))


def fp16_variant(fp32: Dict[str, Any]) -> Dict[str, Any]:
    return dict(
        fp32,
        file=FP16_FILE,
        passes=[*fp32["passes"], "float16"],
        float_dtype="float16",
        note="float16 weights and activations; float32 input and outputs; the head's "
             "post-processing in float32 (for TensorRT 11's strongly typed FP16 engines)",
    )
