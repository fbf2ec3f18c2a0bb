"""Update the model of a running detector without stopping it: ``jetyolo update BUNDLE``.

Copies the bundle into the device's versioned store (``DEVICE_DIR/bundles/<model_id>/``, every
file checked against its sha256, renamed into place only when complete), builds its TensorRT
engine beside the running one (niced), runs ``verify`` against the bundle's reference at the
precision the service uses, then points ``DEVICE_DIR/active`` at it and sends SIGHUP to the
running ``jetyolo run``, which switches between two frames. A failed build or verify leaves
the old model running, says why (here, in the service's stats message and STATUS=) and exits 1.

The service's config must name ``bundle: DEVICE_DIR/active`` (docs/service.md).

examples:
  jetyolo update new-bundle/                           # /var/lib/jetyolo, /etc/jetyolo/config.yaml
  jetyolo update new-bundle/ --rate-guard 0.5          # roll back if detections/frame halve
  jetyolo update --list
  jetyolo update --rollback
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from device.argtypes import finite_float
from device.bundle import Bundle
from device.config import RunConfig, load_config, optional_path
from device.errors import JetyoloError
from device.sdnotify import Notifier
from device.store import (
    DEFAULT_KEEP,
    DEFAULT_MAX_RESTARTS,
    DEFAULT_PROBATION_S,
    Store,
    engine_folder,
)

LOG = logging.getLogger(__name__)
DEFAULT_DEVICE_DIR = "/var/lib/jetyolo"
DEFAULT_CONFIG = "/etc/jetyolo/config.yaml"
POLL_S = 0.1


class UpdateRefused(JetyoloError):
    """The new model failed a check (build, verify, the service's switch); the old one runs."""

    exit_code = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", nargs="?", type=Path, help="the new bundle folder")
    parser.add_argument("--device-dir", type=Path, default=None,
                        help=f"the store (default $JETYOLO_DEVICE_DIR, else {DEFAULT_DEVICE_DIR})")
    parser.add_argument("--config", type=Path, default=None,
                        help=f"the service's `jetyolo run` config (default {DEFAULT_CONFIG} "
                             "when it exists): backend, precision and engine cache to build "
                             "and verify for")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--list", action="store_true",
                        help="list the stored models, their engines and verify results")
    action.add_argument("--rollback", action="store_true",
                        help="return to the model that was active before the current one")
    parser.add_argument("--keep", type=int, default=DEFAULT_KEEP,
                        help=f"models (and their engines) kept in the store (default "
                             f"{DEFAULT_KEEP})")
    parser.add_argument("--wait-s", type=finite_float, default=120.0,
                        help="how long to wait for the running service to switch (default 120)")
    parser.add_argument("--nice", type=int, default=10,
                        help="niceness of the copy, build and verify (default 10)")
    guard = parser.add_argument_group("guards of the new model's first minutes")
    guard.add_argument("--probation-s", type=finite_float, default=DEFAULT_PROBATION_S,
                       help=f"how long the guards watch (default {DEFAULT_PROBATION_S:g})")
    guard.add_argument("--max-restarts", type=int, default=DEFAULT_MAX_RESTARTS,
                       help="service starts within the probation beyond which the model is "
                            f"rolled back (default {DEFAULT_MAX_RESTARTS})")
    guard.add_argument("--rate-guard", type=finite_float, default=None, metavar="RATIO",
                       help="roll back when the new model's detections per frame fall below "
                            "RATIO x the old model's (off by default; e.g. 0.5)")


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def device_dir(args: argparse.Namespace) -> Path:
    if args.device_dir is not None:
        return Path(args.device_dir)
    return Path(os.environ.get("JETYOLO_DEVICE_DIR") or DEFAULT_DEVICE_DIR)


def config_path(args: argparse.Namespace) -> Optional[Path]:
    if args.config is not None:
        return Path(args.config)
    return Path(DEFAULT_CONFIG) if Path(DEFAULT_CONFIG).is_file() else None


def service_config(path: Optional[Path], bundle: Path) -> RunConfig:
    """The service's settings with ``bundle`` in place of its own."""
    return load_config(path, {"bundle": str(bundle)}, required_keys=("bundle",))


def check_config_follows(path: Optional[Path], store: Store) -> None:
    """Refuse before any work when the service's config does not run ``store``'s active link:
    the update would switch nothing."""
    if path is None:
        return
    configured = Path(load_config(path, {}, required_keys=("bundle",)).bundle)
    if configured.absolute() != store.active_link.absolute():
        raise JetyoloError(
            f"{path} runs bundle {configured}, not the store's {store.active_link}: the service "
            f"would not follow an update; set `bundle: {store.active_link}` there (docs/service.md)"
        )


# ---- phases --------------------------------------------------------------------------------------
@dataclass
class Progress:
    """One line per phase to stderr, and to systemd's STATUS= when run as a unit."""

    notifier: Notifier

    def __call__(self, line: str) -> None:
        _log(line)
        self.notifier.status(line)


def service_backend(config: RunConfig) -> str:
    """The backend kind the service runs for ``config`` (auto: TensorRT when importable)."""
    from device.backends import tensorrt_missing

    if config.backend == "auto":
        return "onnxruntime" if tensorrt_missing() else "tensorrt"
    return config.backend


def build_engine(bundle: Bundle, config: RunConfig, log: Any) -> Optional[Path]:
    """The service's engine for ``bundle`` through ``jetyolo build``'s functions (cached plans
    are reused); None when the service's backend needs none."""
    from device import build

    reason = build.no_engine_reason(config)
    if reason:
        log(f"update: no engine to build: {reason}")
        return None
    flags = argparse.Namespace(int8_from=None, dla=None, workspace="auto", force=False)
    request = build.request_from_args(flags, config)
    from device.engine import ensure_engine

    return ensure_engine(bundle, request, build.load_tensorrt_ops(), log).plan


def verify_model(bundle: Bundle, config: RunConfig, plan: Optional[Path]) -> Dict[str, Any]:
    """``jetyolo verify`` at the service's backend and precision; its summary for state.json."""
    from device.choice import QDQ_VARIANT, BackendChoice
    from device.verify import verify_choice

    kind = "tensorrt" if plan is not None else "onnxruntime"
    choice = BackendChoice.from_config(config).with_kind(kind)
    variant = QDQ_VARIANT if choice.is_qdq else "fp32"  # the reference feeds the float input
    # the service's engine: same choice, same key, the plan build_engine just wrote or reused
    report = verify_choice(bundle.root, dataclasses.replace(choice, variant=variant))
    precision = report.gates.precision
    failed = [gate for gate, ok, gated in report.gate_results() if gated and not ok]
    return {
        "passed": report.passed, "backend": kind, "precision": precision, "variant": variant,
        "agreement": round(report.detections.agreement, 4),
        "map50_95": report.detections.map_vs_reference["map50_95"],
        "failed": failed, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "text": report.format_text(),
    }


def signal_service(store: Store, log: Any) -> Optional[int]:
    """SIGHUP to the registered `jetyolo run`; its pid, or None when none is running."""
    pid = store.service_pid()
    if pid is None:
        log(f"update: no running `jetyolo run` is registered in {store.root}; its next start "
            f"runs {store.active_id()}")
        return None
    os.kill(pid, signal.SIGHUP)
    return pid


def wait_for_switch(store: Store, model_id: str, since: float, timeout_s: float) -> Dict[str, Any]:
    """service.json once the service reports a reload (to ``model_id`` or a failed one) newer
    than ``since``; raises UpdateRefused on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        service = store.service()
        reload = service.get("reload") or {}
        if reload.get("requested_at", 0) >= since and reload.get("to") == model_id:
            return service
        if store.service_pid() is None:
            raise UpdateRefused(f"the service exited while switching to {model_id}; "
                                "see `journalctl -u jetyolo`")
        time.sleep(POLL_S)
    raise UpdateRefused(f"the service did not switch to {model_id} within {timeout_s:g} s "
                        "(--wait-s); `journalctl -u jetyolo` says why")


def switch(store: Store, model_id: str, timeout_s: float, log: Any) -> None:
    """Signal the service and wait for it to run ``model_id``. A service that cannot load it
    keeps the old model; then ``active`` goes back too and this raises."""
    since = time.time()
    if signal_service(store, log) is None:
        return
    service = wait_for_switch(store, model_id, since, timeout_s)
    reload = service["reload"]
    if not reload.get("ok"):
        store.rollback(f"the service could not load {model_id}: {reload.get('error')}")
        raise UpdateRefused(f"the service could not load {model_id} ({reload.get('error')}); it "
                            f"keeps running {service.get('model_id')}")
    log(f"update: the service switched from {reload.get('from')} to {model_id} "
        f"(gap {reload.get('gap_ms', 0):.0f} ms)")


def refuse(store: Store, model_id: str, phase: str, reason: str, log: Any) -> UpdateRefused:
    """Record why ``model_id`` was refused, tell the service (stats + STATUS=), the error."""
    store.record(model_id, status=f"{phase} failed", reason=reason)
    store.note_update({"model_id": model_id, "ok": False, "phase": phase, "reason": reason})
    if store.service_pid() is not None:
        signal_service(store, log)  # the service re-reads last_update: stats and STATUS=
    return UpdateRefused(f"{model_id} was not activated: {phase} failed: {reason}; "
                         f"{store.active_id() or 'the old model'} keeps running")


def prune(store: Store, keep: int, engine_dirs: List[Path], log: Any) -> None:
    kept = store.keep_set(keep)
    for model_id in store.stored_ids():
        if model_id not in kept:
            log(f"update: removing {model_id} and its engines (--keep {keep})")
            store.remove_bundle(model_id, engine_dirs)


def engine_dirs(config: RunConfig) -> List[Path]:
    from device.engine_cache import default_cache_dir

    return [optional_path(config.engine_cache_dir) or default_cache_dir()]


def update(args: argparse.Namespace, store: Store, progress: Progress) -> int:
    cfg_path = config_path(args)
    check_config_follows(cfg_path, store)
    if args.keep < 1:
        raise JetyoloError(f"--keep {args.keep}: keep at least the active model (1)")
    if args.rate_guard is not None and not 0.0 < args.rate_guard <= 1.0:
        raise JetyoloError(f"--rate-guard {args.rate_guard}: a ratio in (0, 1], e.g. 0.5")
    with store.update_lock():
        for leftover in store.remove_incoming():
            progress(f"update: removed {leftover.name}, left by an interrupted update")
        store.repair_history()
        os.nice(max(0, args.nice))
        progress(f"update: copying {args.bundle} into {store.bundles}")
        bundle = store.import_bundle(args.bundle, progress)
        model_id = bundle.model_id
        config = service_config(cfg_path, bundle.root)
        try:
            progress(f"update: building the engine of {model_id}")
            plan = build_engine(bundle, config, progress)
            store.record(model_id, engines=[str(plan)] if plan else [])
        except JetyoloError as exc:
            raise refuse(store, model_id, "build", str(exc), progress) from exc
        progress(f"update: verifying {model_id} against its reference")
        try:
            result = verify_model(bundle, config, plan)
        except JetyoloError as exc:
            raise refuse(store, model_id, "verify", str(exc), progress) from exc
        _log(result.pop("text"))
        store.record(model_id, verify=result)
        if not result["passed"]:
            reason = (f"failed gates {', '.join(result['failed'])} (agreement "
                      f"{result['agreement']}, {result['backend']} {result['precision']})")
            raise refuse(store, model_id, "verify", reason, progress)
        previous = store.active_id()
        progress(f"update: switching from {previous} to {model_id}")
        store.activate(model_id, {"probation_s": args.probation_s,
                                  "max_restarts": args.max_restarts,
                                  "rate_guard": args.rate_guard, "previous": previous})
        store.note_update({"model_id": model_id, "ok": True, "phase": "switch", "from": previous})
        switch(store, model_id, args.wait_s, progress)
        prune(store, args.keep, engine_dirs(config), progress)
    progress(f"update: {model_id} is active")
    print(model_id)
    return 0


def rollback(args: argparse.Namespace, store: Store, progress: Progress) -> int:
    with store.update_lock():
        store.repair_history()
        current = store.active_id()
        target = store.rollback("asked for (`jetyolo update --rollback`)")
        progress(f"update: rolling back from {current} to {target}")
        switch(store, target, args.wait_s, progress)
    print(target)
    return 0


def engines_of(model_id: str, folders: List[Path]) -> List[str]:
    return sorted(plan.name for folder in folders
                  for plan in engine_folder(folder, model_id).glob("*.plan"))


def list_models(args: argparse.Namespace, store: Store) -> int:
    state = store.read_state()
    cfg_path = config_path(args)
    folders = engine_dirs(load_config(cfg_path, {"bundle": "-"}, required_keys=()))
    active, running = store.active_id(), store.service().get("model_id")
    models = store.stored_ids()
    if not models:
        print(f"no models in {store.bundles}; add one with `jetyolo update BUNDLE`")
        return 0
    print(f"{'':2}{'model_id':<34} {'status':<16} {'verify':<24} engines")
    for model_id in models:
        record = state["models"].get(model_id, {})
        checked = record.get("verify") or {}
        verdict = "-" if not checked else (
            f"{'PASS' if checked.get('passed') else 'FAIL'} {checked.get('precision')} "
            f"{checked.get('agreement')}")
        mark = "*" if model_id == active else " "
        status = record.get("status", "stored") + (" (running)" if model_id == running else "")
        engines = ", ".join(engines_of(model_id, folders)) or "-"
        print(f"{mark} {model_id:<34} {status:<16} {verdict:<24} {engines}")
    print("* active (what the service runs after its next reload or start)")
    return 0


def run(args: argparse.Namespace) -> int:
    store = Store(device_dir(args))
    progress = Progress(Notifier.from_env())
    if args.list:
        return list_models(args, store)
    if args.rollback:
        return rollback(args, store, progress)
    if args.bundle is None:
        raise JetyoloError("give the new BUNDLE folder, or --list / --rollback")
    return update(args, store, progress)
