"""The Jetson acceptance run: one command after installing, one report to attach to a bug report.

    jetyolo selftest BUNDLE [--backend auto|tensorrt|onnxruntime] [--out DIR] [--runs N]

1. doctor (TensorRT, pycuda, GPU, OpenCV, JetPack);
2. for every engine the backend can make of the bundle: build it (TensorRT: fp16, int8 from each
   variant's calibration cache, int8 from the Q/DQ model; TensorRT 11: the fp16 variant and the
   Q/DQ model), verify it against the bundle's reference, and time N inferences; with `trtexec` on
   PATH, its throughput on the same plan as the ceiling;
3. ``DIR/selftest.md`` and ``DIR/selftest.json`` (default ``./selftest-<model_id>``).

Exit 1 when any step failed. Each step is pass, fail or skip, with its reason. See
docs/tensorrt.md, "The acceptance run".
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from device.bundle import Bundle
from device.calibcache import parse_trt_version
from device.errors import JetyoloError
from device.files import atomic_write_bytes

BACKENDS = ("auto", "tensorrt", "onnxruntime")
PASS, FAIL, SKIP = "pass", "fail", "skip"
DEFAULT_RUNS = 50
WARMUP_RUNS = 5
TRTEXEC_PATHS = ("trtexec", "/usr/src/tensorrt/bin/trtexec")
REPORT_MD, REPORT_JSON = "selftest.md", "selftest.json"
# The frame variant's engine is built for one camera frame size (docs/tensorrt.md, "Optimisation
# profiles"); the acceptance run builds and times it for a 1080p camera, the service for its own
# capture size.
SELFTEST_FRAME_SIZE = (1920, 1080)


@dataclass(frozen=True)
class Case:
    """One engine to make and check: a bundle variant at a precision (INT8 from cache or qdq)."""

    variant: str
    precision: str
    int8_from: Optional[str] = None

    @property
    def name(self) -> str:
        return f"{self.variant} {self.precision}" + (f" from {self.int8_from}" if self.int8_from
                                                     else "")


@dataclass
class Step:
    case: str
    stage: str  # doctor, build, verify, bench, trtexec
    status: str
    seconds: float
    detail: str
    figures: Dict[str, Any] = field(default_factory=dict)


# ---- what selftest does to the machine, injectable (tests: the TensorRT stand-in) --------------
class Toolkit:
    """The device operations selftest calls. ``ops`` is the TensorRT build interface
    (``device.engine.TensorRTOps``); None loads the real one when a build is asked for."""

    def __init__(self, ops: Any = None) -> None:
        self.ops = ops

    def doctor(self) -> Tuple[bool, List[Dict[str, Any]]]:
        from device.doctor import collect, tensorrt_ready

        checks = collect()
        return tensorrt_ready(checks), [asdict(check) for check in checks]

    def tensorrt_ops(self) -> Any:
        if self.ops is None:
            from device.build import load_tensorrt_ops

            self.ops = load_tensorrt_ops()
        return self.ops

    def trt_version(self) -> str:
        return str(self.tensorrt_ops().device_facts().trt_version)

    def build(self, bundle: Bundle, case: Case) -> Path:
        from device.engine import BuildRequest, ensure_engine

        request = BuildRequest(precision=case.precision, int8_from=case.int8_from,
                               variant="fp32" if case.variant == "int8-qdq" else case.variant,
                               frame_size=SELFTEST_FRAME_SIZE)
        return Path(ensure_engine(bundle, request, self.tensorrt_ops(), lambda line: None).plan)

    def verify(self, bundle: Bundle, backend: str, case: Case, plan: Optional[Path]) -> Any:
        from device.verify import verify

        if backend == "onnxruntime" and case.precision == "fp16":
            # no FP16 build setting on ONNX Runtime: the fp16 variant's float16 graph is judged
            # by the FP16 gates, the precision the backend says it runs
            return verify(bundle.root, backend, case.variant, None, None)
        return verify(bundle.root, backend, case.variant, case.precision, plan)

    def bench(self, bundle: Bundle, backend: str, case: Case, runs: int) -> Dict[str, Any]:
        """Median and p90 of ``runs`` inferences on a zero input after a short warm-up."""
        from device.backends import open_backend

        opened = open_backend(backend, bundle, case.precision, case.variant,
                              int8_from=case.int8_from, frame_size=lambda: SELFTEST_FRAME_SIZE)
        with opened as active:
            feed = {name: np.zeros(spec.shape, spec.dtype)
                    for name, spec in active.input_specs.items()}
            out = active.allocate_outputs()
            times = []
            for index in range(WARMUP_RUNS + runs):
                started = time.perf_counter()
                active.infer(feed, out)
                if index >= WARMUP_RUNS:
                    times.append((time.perf_counter() - started) * 1000)
        return {"runs": runs, "median_ms": round(float(np.median(times)), 3),
                "p90_ms": round(float(np.percentile(times, 90)), 3), "backend": opened.name}

    def trtexec(self, plan: Path) -> Optional[Dict[str, Any]]:
        """trtexec's throughput on ``plan`` (the ceiling), or None when trtexec is not here."""
        binary = next((path for path in map(shutil.which, TRTEXEC_PATHS) if path), None)
        if binary is None:
            return None
        command = [binary, f"--loadEngine={plan}", "--iterations=200", "--warmUp=500",
                   "--duration=0"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        figures: Dict[str, Any] = {"command": " ".join(command), "exit": done.returncode}
        for line in done.stdout.splitlines():
            if "Throughput:" in line:
                figures["throughput_qps"] = float(line.split("Throughput:")[1].split()[0])
        return figures


# ---- which engines -------------------------------------------------------------------------------
def cache_variants(bundle: Bundle) -> List[str]:
    """Variants with a calibration cache (``calibration.variants``, or the fp32 one)."""
    calibration = bundle.manifest.get("calibration") or {}
    listed = calibration.get("variants") or {}
    if listed:
        return [name for name, entry in listed.items() if entry.get("caches")]
    return ["fp32"] if calibration.get("caches") else []


def tensorrt_cases(bundle: Bundle, trt_version: str) -> List[Case]:
    """fp16 of every float32 graph and int8 from each cache on TensorRT 8.5-10.x; on 11
    (strongly typed: precision from the ONNX) the fp16 variant; int8 from Q/DQ on all."""
    variants = bundle.manifest["variants"]
    graphs = [name for name, v in variants.items()
              if "quantization" not in v and v.get("float_dtype", "float32") == "float32"]
    cases: List[Case] = []
    if parse_trt_version(trt_version)[0] >= 11:
        if "fp16" in variants:
            cases.append(Case("fp16", "fp16"))
    else:
        cases += [Case(name, "fp16") for name in graphs]
        cases += [Case(name, "int8", "cache") for name in cache_variants(bundle)]
    if "int8-qdq" in variants:
        cases.append(Case("int8-qdq", "int8", "qdq"))
    return cases


def onnxruntime_cases(bundle: Bundle) -> List[Case]:
    variants = bundle.manifest["variants"]
    cases = [Case("fp32", "fp32")]
    if "fp16" in variants:
        cases.append(Case("fp16", "fp16"))
    if "int8-qdq" in variants:
        cases.append(Case("int8-qdq", "int8"))
    return cases


def verify_skip_reason(bundle: Bundle, case: Case) -> Optional[str]:
    """Why the reference cannot judge this variant (it feeds float NCHW, compares boxes/scores)."""
    variant = bundle.variant(case.variant)
    if variant["input"] != bundle.variant("fp32")["input"]:
        return (f"the reference feeds the fp32 input; {case.variant} takes "
                f"{variant['input']['dtype']} {variant['input'].get('layout', '')}")
    if sorted(variant["outputs"]) != sorted(bundle.variant("fp32")["outputs"]):
        return (f"{case.variant} has outputs {sorted(variant['outputs'])}, the reference "
                "has boxes/scores")
    return None


# ---- the run -------------------------------------------------------------------------------------
def timed(case: str, stage: str, action: Callable[[], Tuple[str, str, Dict[str, Any]]]) -> Step:
    """Run one step; a JetyoloError (or any error of TensorRT/ONNX Runtime) is a failed step."""
    started = time.perf_counter()
    try:
        status, detail, figures = action()
    except JetyoloError as exc:
        status, detail, figures = FAIL, str(exc), {}
    except Exception as exc:  # a backend's own error types: recorded, the run goes on
        status, detail, figures = FAIL, f"{type(exc).__name__}: {str(exc).strip()[:300]}", {}
    return Step(case, stage, status, round(time.perf_counter() - started, 2), detail, figures)


def run_case(
    bundle: Bundle, backend: str, case: Case, toolkit: Toolkit, runs: int
) -> List[Step]:
    steps: List[Step] = []
    plan: Optional[Path] = None
    if backend == "tensorrt":
        holder: Dict[str, Path] = {}

        def build() -> Tuple[str, str, Dict[str, Any]]:
            holder["plan"] = toolkit.build(bundle, case)
            return PASS, str(holder["plan"]), {}

        steps.append(timed(case.name, "build", build))
        if steps[-1].status == FAIL:
            return steps
        plan = holder["plan"]
    reason = verify_skip_reason(bundle, case)

    def check() -> Tuple[str, str, Dict[str, Any]]:
        if reason:
            return SKIP, reason, {}
        report = toolkit.verify(bundle, backend, case, plan)
        summary = report.format_text().splitlines()
        return (PASS if report.passed else FAIL), " / ".join(summary[:3]), report.to_dict()

    steps.append(timed(case.name, "verify", check))
    steps.append(timed(case.name, "bench", lambda: (
        PASS, "", toolkit.bench(bundle, backend, case, runs))))
    if plan is not None:
        steps.append(timed(case.name, "trtexec", lambda: _trtexec_step(toolkit, plan)))
    return steps


def _trtexec_step(toolkit: Toolkit, plan: Path) -> Tuple[str, str, Dict[str, Any]]:
    figures = toolkit.trtexec(plan)
    if figures is None:
        return SKIP, "trtexec is not on PATH (JetPack: /usr/src/tensorrt/bin/trtexec)", {}
    ok = figures.get("exit") == 0 and "throughput_qps" in figures
    return (PASS if ok else FAIL), figures.get("command", ""), figures


def resolve_backend(asked: str, ready: bool) -> Tuple[str, Optional[str]]:
    """(backend, problem): auto takes TensorRT when doctor says it is usable."""
    if asked == "auto":
        return ("tensorrt" if ready else "onnxruntime"), None
    if asked == "tensorrt" and not ready:
        return asked, "--backend tensorrt, but doctor finds TensorRT, pycuda or the GPU unusable"
    return asked, None


def selftest(
    bundle_root: Path, backend: str = "auto", toolkit: Optional[Toolkit] = None,
    runs: int = DEFAULT_RUNS,
) -> Dict[str, Any]:
    """Every step of the acceptance run; the report as a dict (``passed`` False on any fail)."""
    if backend not in BACKENDS:
        raise JetyoloError(f"--backend {backend!r} is not one of {list(BACKENDS)}")
    toolkit = toolkit or Toolkit()
    bundle = Bundle.load(bundle_root, verify=True)
    ready, checks = toolkit.doctor()
    chosen, problem = resolve_backend(backend, ready)
    missing = [c["name"] for c in checks if c.get("status") == "missing"]
    steps = [Step("", "doctor", FAIL if problem else PASS, 0.0,
                  problem or f"TensorRT {'ready' if ready else 'not usable'}; backend {chosen}",
                  {"missing": missing})]
    trt_version = None
    if not problem:
        if chosen == "tensorrt":
            trt_version = toolkit.trt_version()
            cases = tensorrt_cases(bundle, trt_version)
        else:
            cases = onnxruntime_cases(bundle)
        for case in cases:
            steps += run_case(bundle, chosen, case, toolkit, runs)
    return {
        "schema": 1,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "bundle": str(bundle.root), "model_id": bundle.model_id, "backend": chosen,
        "tensorrt": trt_version, "machine": f"{platform.node()} {platform.machine()} "
                                            f"{platform.platform()}",
        "passed": all(step.status != FAIL for step in steps),
        "doctor": checks, "steps": [asdict(step) for step in steps],
    }


def markdown(report: Dict[str, Any]) -> str:
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines = [f"# jetyolo selftest: {verdict}", "",
             f"- bundle: `{report['bundle']}` ({report['model_id']})",
             f"- backend: {report['backend']}" + (f", TensorRT {report['tensorrt']}"
                                                  if report["tensorrt"] else ""),
             f"- machine: {report['machine']}", f"- date: {report['created']}", "",
             "| engine | step | result | s | detail |", "|---|---|---|---|---|"]
    for step in report["steps"]:
        figures = step["figures"]
        detail = step["detail"].replace("|", "/")
        if step["stage"] == "bench" and "median_ms" in figures:
            detail = f"median {figures['median_ms']} ms, p90 {figures['p90_ms']} ms " \
                     f"({figures['runs']} runs)"
        if step["stage"] == "trtexec" and "throughput_qps" in figures:
            detail = f"{figures['throughput_qps']} qps"
        lines.append(f"| {step['case'] or '-'} | {step['stage']} | {step['status']} | "
                     f"{step['seconds']} | {detail[:200]} |")
    lines += ["", "## doctor", ""]
    lines += [f"- {c['status']}: {c['name']}: {c['detail']}" for c in report["doctor"]]
    return "\n".join(lines) + "\n"


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise JetyoloError(f"--out {out} is a file; pass a folder for the report")


def write_report(report: Dict[str, Any], out: Path) -> Tuple[Path, Path]:
    check_out(out)
    md, js = out / REPORT_MD, out / REPORT_JSON
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(js, (json.dumps(report, indent=2) + "\n").encode())
        atomic_write_bytes(md, markdown(report).encode())
    except OSError as exc:
        raise JetyoloError(
            f"cannot write the report to {out} ({exc}); pass a writable --out"
        ) from exc
    return md, js


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="bundle directory (with its reference)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="auto: TensorRT when doctor finds it usable, else ONNX Runtime")
    parser.add_argument("--out", type=Path, help="report folder (default ./selftest-<model_id>)")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS,
                        help=f"timed inferences per engine ({DEFAULT_RUNS})")


def run(args: argparse.Namespace, toolkit: Optional[Toolkit] = None) -> int:
    if args.runs < 1:
        raise JetyoloError(f"--runs must be at least 1, got {args.runs}")
    if args.out is not None:
        check_out(args.out)  # before minutes of work
    report = selftest(args.bundle, args.backend, toolkit, args.runs)
    out = args.out or Path(f"selftest-{report['model_id'].replace('@', '-')}")
    md, js = write_report(report, out)
    for step in report["steps"]:
        print(f"{step['status'].upper():5} {step['case'] or '-':24} {step['stage']:8} "
              f"{step['detail'][:100]}")
    print(f"selftest {'passed' if report['passed'] else 'FAILED'}: {md} and {js} "
          "(attach both to a bug report)")
    return 0 if report["passed"] else 1
