"""Check a bundle: manifest schema, the size and sha256 of every file it lists, and every model
in it: ``onnx.checker`` (where the onnx package is installed, as on the host), an ONNX Runtime
load (except TensorRT-only variants), the input and output contract of the manifest, the class
count of the scores output against ``class_names``, and that the calibration and reference data
were made for this model. It prints what it checked.

A manifest is not signed: a model.onnx taken from another bundle, with the hashes rewritten, is
caught when its input, outputs or class count differ from the manifest, or when the bundle's
calibration (``calibration.onnx_sha256``, the cache's tensor names) or reference
(``reference.model_sha256``) name another model; a model with the same contract in a bundle
without calibration or reference cannot be told apart.
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any, Dict, List, Mapping, Optional, Sequence

from device.bundle import Bundle
from device.errors import JetyoloError
from device.postprocess import class_count_problem, model_class_count

ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(uint8)": "uint8"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory (made by `jetyolo export`)")


def run(args: argparse.Namespace) -> int:
    bundle = Bundle.load(args.bundle, verify=True)
    checked = check_models(bundle)
    files = bundle.manifest["files"]
    print(f"bundle {bundle.root}: OK ({len(files)} files, model {bundle.model_id})")
    for relative, entry in sorted(files.items()):
        print(f"  {entry['sha256'][:16]}  {entry['size']:>10}  {relative}")
    print("checked:")
    for line in checked:
        print(f"  {line}")
    return 0


def check_models(bundle: Bundle) -> List[str]:
    """Load every variant's model and check it against the manifest; one line per check done.
    Raises ``JetyoloError`` at the first model that does not match."""
    onnx = _optional("onnx")
    lines = []
    tensor_names: Optional[set] = None
    for name, variant in bundle.manifest["variants"].items():
        path = bundle.path(str(variant["file"]))
        done = []
        if onnx is not None:
            model = _checked_onnx(onnx, bundle, name, path)
            done.append("onnx.checker")
            if name == "fp32":
                tensor_names = _tensor_names(model)
        if "TensorRT" not in str(variant.get("runtime", "")):
            done += _contract(bundle, name, variant, path)
        else:
            done.append("not loaded in ONNX Runtime (TensorRT plugin)")
        lines.append(f"{variant['file']} ({name}): {', '.join(done)}")
    lines += _calibration(bundle, tensor_names)
    lines += _reference(bundle)
    return lines


def _optional(module: str) -> Any:
    if importlib.util.find_spec(module) is None:
        return None
    return importlib.import_module(module)


def _fail(bundle: Bundle, what: str) -> JetyoloError:
    return JetyoloError(f"bundle {bundle.root}: {what}; re-create it with `jetyolo export`")


def _checked_onnx(onnx: Any, bundle: Bundle, name: str, path: Any) -> Any:
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # DecodeError, ValidationError...: one cause, a bad model
        first = (str(exc).strip().splitlines() or [""])[0]
        raise _fail(bundle, f"variant {name!r}: {path.name} is not a valid ONNX model "
                    f"({type(exc).__name__}: {first[:200]})") from exc
    return model


def _tensor_names(model: Any) -> set:
    graph = model.graph
    names = {tensor.name for tensor in [*graph.input, *graph.output, *graph.initializer]}
    return names | {output for node in graph.node for output in node.output}


def _contract(bundle: Bundle, name: str, variant: Mapping[str, Any], path: Any) -> List[str]:
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        first = (str(exc).strip().splitlines() or [""])[0]
        raise _fail(bundle, f"variant {name!r}: ONNX Runtime cannot load {path.name} "
                    f"({first[:200]})") from exc
    done = ["ONNX Runtime load"]
    done += _input_contract(bundle, name, variant.get("input") or {}, session.get_inputs())
    outputs = {output.name: output.shape for output in session.get_outputs()}
    missing = [key for key in variant.get("outputs") or {} if key not in outputs]
    if missing:
        raise _fail(bundle, f"variant {name!r}: the model has no output {missing[0]!r} (it has "
                    f"{sorted(outputs)})")
    done.append(f"outputs {', '.join(sorted(outputs))}")
    problem = class_count_problem(bundle.class_names, outputs)
    if problem is not None:
        raise _fail(bundle, f"variant {name!r}: {problem}")
    if model_class_count(outputs) is not None:
        done.append(f"{len(bundle.class_names)} classes = class_names")
    return done


def _input_contract(
    bundle: Bundle, name: str, declared: Mapping[str, Any], inputs: Sequence[Any]
) -> List[str]:
    if len(inputs) != 1:
        raise _fail(bundle, f"variant {name!r}: the model has {len(inputs)} inputs, not 1")
    actual = inputs[0]
    dtype = ORT_DTYPES.get(actual.type, actual.type)
    wanted: Dict[str, Any] = {"name": actual.name, "dtype": dtype}
    for key, value in wanted.items():
        if key in declared and declared[key] != value:
            raise _fail(bundle, f"variant {name!r}: input {key} is {value!r}, the manifest "
                        f"says {declared[key]!r}")
    shape = declared.get("shape")
    if isinstance(shape, list):
        fixed = [(a, b) for a, b in zip(actual.shape, shape)
                 if isinstance(a, int) and isinstance(b, int)]  # named dims are free
        if len(actual.shape) != len(shape) or any(a != b for a, b in fixed):
            raise _fail(bundle, f"variant {name!r}: input shape is {actual.shape}, the manifest "
                        f"says {shape}")
    return [f"input {actual.name} {actual.shape} {dtype}"]


def _calibration(bundle: Bundle, tensor_names: Optional[set]) -> List[str]:
    from device.calibcache import read_cache

    calibration = bundle.manifest.get("calibration")
    if not isinstance(calibration, Mapping):
        return []
    recorded, model = calibration.get("onnx_sha256"), bundle.model_sha256("fp32")
    if recorded != model:
        raise _fail(bundle, f"its calibration was made for ONNX {str(recorded)[:12]}, the "
                    f"bundle's model is {model[:12]}")
    lines = [f"calibration made for this model ({model[:12]})"]
    caches = calibration.get("caches")
    entries = caches.values() if isinstance(caches, Mapping) else caches or []
    for entry in entries:
        relative = str(entry["file"] if isinstance(entry, Mapping) else entry)
        cache = read_cache(bundle.path(relative))
        if tensor_names is None:
            lines.append(f"{relative}: parsed, {len(cache.scales)} tensors (names not compared: "
                         "no onnx package here)")
            continue
        foreign = sorted(set(cache.scales) - tensor_names)
        if foreign:
            raise _fail(bundle, f"{relative} names {len(foreign)} tensors the model does not "
                        f"have (first {foreign[0]!r}): it belongs to another model")
        lines.append(f"{relative}: {len(cache.scales)} tensors, all in the model")
    return lines


def _reference(bundle: Bundle) -> List[str]:
    section = bundle.manifest.get("reference")
    if not isinstance(section, Mapping):
        return []
    variant = str(section.get("variant", "fp32"))
    recorded, model = section.get("model_sha256"), bundle.model_sha256(variant)
    if recorded != model:
        raise _fail(bundle, f"its reference was recorded for model {str(recorded)[:12]}, the "
                    f"bundle's {variant} model is {model[:12]}")
    return [f"reference recorded with this {variant} model ({model[:12]})"]
