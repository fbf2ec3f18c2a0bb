"""SIGHUP: switch the running pipeline to the model ``bundle:`` names now (``jetyolo update``).

``jetyolo run`` builds one ``Reloader`` and hands it to ``device.setup.run_configured`` (as an
extension and a sink wrapper). On SIGHUP its thread re-reads the configured bundle path (the
store's ``active`` link), loads and hash-checks the bundle, opens its backend (a TensorRT engine
``jetyolo update`` built beforehand) while frames keep flowing on the old one, and asks the
pipeline to swap between two frames (``Pipeline.swap_backend``). The frame hook sees the first
frame of the new model: the switch's gap (ms since the last frame of the old model, frame
indices skipped) goes into ``service.json`` (which ``jetyolo update`` waits for), the stats
message (``model_update``) and ``STATUS=``.

A bundle that fails to load, or a backend the pipeline refuses, leaves the old model running
and is reported the same way. With a store, the last update's outcome (``last_update`` in
state.json: a refused model) is carried in the stats too, and the rate guard of a new model's
probation (``jetyolo update --rate-guard``) is checked here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Deque, Dict, Optional, Sequence

from device.bundle import Bundle
from device.config import RunConfig
from device.detections import FrameResult
from device.errors import JetyoloError
from device.pipeline import FrameSink, ModelInfo, Pipeline
from device.sdnotify import Notifier
from device.store import Store, now_iso, store_of

LOG = logging.getLogger(__name__)
SWAP_TIMEOUT_S = 120.0  # activation of the new backend on the inference thread
FIRST_FRAME_TIMEOUT_S = 30.0
RATE_WINDOW = 300  # frames per model over which detections/frame is averaged
RATE_MIN_FRAMES = 50  # frames of each model before the rate guard judges
TICK_S = 1.0


@dataclass
class _Published:
    """What the frame hook saw last, and detections per frame of each model."""

    model_id: str = ""
    at: float = 0.0
    frame_index: int = -1
    intervals_ms: Deque[float] = field(default_factory=lambda: deque(maxlen=RATE_WINDOW))
    rates: Dict[str, Deque[int]] = field(default_factory=dict)


class _StatsSinks:
    """The pipeline's sinks with the reload fields added to every stats message."""

    def __init__(self, inner: FrameSink, reloader: Reloader) -> None:
        self.inner = inner
        self.reloader = reloader

    def publish_frame(self, result: FrameResult) -> Any:
        return self.inner.publish_frame(result)

    def publish_stats(self, stats: Dict[str, Any]) -> Any:
        return self.inner.publish_stats({**stats, **self.reloader.stats_fields()})

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Reloader:
    """Switch models on SIGHUP; see the module docstring."""

    def __init__(self, config: RunConfig, notifier: Notifier) -> None:
        self.config = config
        self.notifier = notifier
        store_root = store_of(config.bundle)
        self.store = Store(store_root) if store_root is not None else None
        self.pipeline: Optional[Pipeline] = None
        self.current: Optional[ModelInfo] = None
        self.last_switch: Optional[Dict[str, Any]] = None
        self.last_update: Optional[Dict[str, Any]] = None
        self._requested = threading.Event()
        self._requested_at = 0.0
        self._stopping = threading.Event()
        self._first_new_frame = threading.Event()
        self._published = _Published()
        self._baseline: Optional[float] = None
        self._last_reload: Optional[Dict[str, Any]] = None
        self._previous_handler: Any = None
        if threading.current_thread() is threading.main_thread():
            # Now, not at attach: SIGHUP's default action ends the process, and systemd counts
            # that as a clean stop (no restart) -- a reload sent during start-up must not.
            self._previous_handler = signal.signal(signal.SIGHUP, self._on_sighup)

    # ---- wiring into device.setup ----------------------------------------------------------
    def wrap_sinks(self, sinks: FrameSink) -> FrameSink:
        return _StatsSinks(sinks, self)

    def attach(self, pipeline: Pipeline, config: RunConfig, stack: contextlib.ExitStack) -> None:
        """``device.setup`` extension: the frame hook, the SIGHUP handler, the thread."""
        self.pipeline = pipeline
        self.current = pipeline.model
        pipeline.add_frame_hook(self.on_frame)
        if self._previous_handler is not None:
            stack.callback(signal.signal, signal.SIGHUP, self._previous_handler)
        thread = threading.Thread(target=self._loop, name="jetyolo-reload", daemon=True)
        thread.start()
        stack.callback(thread.join, 5.0)
        stack.callback(self._stopping.set)
        self._register()

    def _on_sighup(self, _signum: int, _frame: Optional[FrameType]) -> None:
        self._requested_at = time.time()
        self._requested.set()

    def request(self) -> None:
        """What SIGHUP does, callable from any thread (tests, the rate guard)."""
        self._on_sighup(signal.SIGHUP, None)

    # ---- the publishing thread -------------------------------------------------------------
    def on_frame(self, result: FrameResult) -> FrameResult:
        now = time.perf_counter()
        seen = self._published
        model_id = result.model_id
        if seen.model_id and model_id != seen.model_id:
            self._note_switch(seen, result, now)
        elif seen.at:
            seen.intervals_ms.append((now - seen.at) * 1000.0)
        rate = seen.rates.setdefault(model_id, deque(maxlen=RATE_WINDOW))
        rate.append(len(result.detections))
        seen.model_id, seen.at, seen.frame_index = model_id, now, result.frame_index
        return result

    def _note_switch(self, seen: _Published, result: FrameResult, now: float) -> None:
        old_rate = seen.rates.get(seen.model_id)
        self._baseline = sum(old_rate) / len(old_rate) if old_rate else None
        usual = statistics.median(seen.intervals_ms) if seen.intervals_ms else None
        self.last_switch = {
            "at": now_iso(), "from": seen.model_id, "to": result.model_id,
            "gap_ms": round((now - seen.at) * 1000.0, 1),
            "usual_frame_interval_ms": round(usual, 1) if usual is not None else None,
            "frame_indices_skipped": max(0, result.frame_index - seen.frame_index - 1),
            "last_old_frame": seen.frame_index, "first_new_frame": result.frame_index,
        }
        seen.rates.pop(result.model_id, None)  # a model switched back to starts afresh
        self._first_new_frame.set()

    # ---- the reload thread -----------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                if self._requested.wait(TICK_S):
                    self._requested.clear()
                    self._reload(self._requested_at)
                self._check_rate_guard()
            except Exception:  # the detector must outlive a reload that went wrong
                LOG.exception("reload: failed")

    def _reload(self, requested_at: float) -> None:
        if self.store is not None:
            self.last_update = self.store.read_state().get("last_update")
        current = self.current.model_id if self.current else ""
        try:
            bundle = Bundle.load(os.path.realpath(self.config.bundle), verify=True)
        except JetyoloError as exc:
            self._finish(requested_at, current, "", ok=False, error=str(exc))
            return
        if bundle.model_id == current:
            LOG.info("reload: %s already runs", current)
            self._finish(requested_at, current, current, ok=True, error=None)
            return
        LOG.info("reload: switching from %s to %s", current, bundle.model_id)
        self.notifier.status(f"switching from {current} to {bundle.model_id}")
        error = self._swap(bundle)
        self._finish(requested_at, current, bundle.model_id, ok=error is None, error=error)

    def _swap(self, bundle: Bundle) -> Optional[str]:
        """Open the new backend and hand it to the pipeline; None, or why it was refused."""
        from device.setup import model_info, open_configured_backend

        pipeline = self.pipeline
        if pipeline is None:
            return "the pipeline is not running"
        try:
            check_tracking_classes(self.config, pipeline.source_name.split(","), bundle)
            backend = open_configured_backend(self.config, bundle)
        except JetyoloError as exc:
            return str(exc)
        model = model_info(self.config, bundle)
        self._first_new_frame.clear()
        pipeline.swap_backend(backend, model)
        deadline = time.monotonic() + SWAP_TIMEOUT_S
        while pipeline.swap_result() == "pending" and time.monotonic() < deadline:
            time.sleep(0.02)
        result = pipeline.swap_result()
        if not result.startswith("swapped"):
            return result
        self.current = model
        if not self._first_new_frame.wait(FIRST_FRAME_TIMEOUT_S):
            LOG.warning("reload: no frame of %s within %.0f s", model.model_id,
                        FIRST_FRAME_TIMEOUT_S)
        return None

    def _finish(self, requested_at: float, old: str, new: str, ok: bool,
                error: Optional[str]) -> None:
        reload: Dict[str, Any] = {"requested_at": requested_at, "from": old, "to": new,
                                  "ok": ok, "at": now_iso()}
        if ok and self.last_switch and self.last_switch.get("to") == new:
            reload.update(gap_ms=self.last_switch["gap_ms"],
                          frame_indices_skipped=self.last_switch["frame_indices_skipped"])
        if error:
            reload["error"] = error
            LOG.error("reload: keeping %s: %s", old, error)
        else:
            LOG.info("reload: now running %s (gap %s ms)", new, reload.get("gap_ms"))
        self._last_reload = reload
        self._register()
        self._status()

    def _register(self) -> None:
        if self.store is None or self.current is None:
            return
        fields = {"reload": self._last_reload} if self._last_reload else {}
        self.store.register_service(self.current.model_id, **fields)

    # ---- reporting and the rate guard ------------------------------------------------------
    def stats_fields(self) -> Dict[str, Any]:
        fields: Dict[str, Any] = {}
        if self.last_switch:
            fields["model_update"] = dict(self.last_switch)
        if self.last_update:
            fields["last_update"] = dict(self.last_update)
        return fields

    def status_note(self) -> str:
        parts = [f"model {self.current.model_id}" if self.current else ""]
        update = self.last_update
        if update and not update.get("ok"):
            parts.append(f"update to {update.get('model_id')} refused "
                         f"({update.get('phase')} failed)")
        elif self.last_switch:
            parts.append(f"switched from {self.last_switch['from']} "
                         f"({self.last_switch['gap_ms']:.0f} ms)")
        return ", ".join(part for part in parts if part)

    def _status(self) -> None:
        note = self.status_note()
        self.notifier.progress.note = f"; {note}" if note else ""
        self.notifier.status(f"running; {note}")

    def _check_rate_guard(self) -> None:
        if self.store is None or self.current is None or self._baseline is None:
            return
        probation = self.store.read_state().get("probation") or {}
        guard = probation.get("rate_guard")
        if not guard or probation.get("model_id") != self.current.model_id:
            return
        if time.time() - float(probation.get("since", 0)) > float(probation.get("probation_s",
                                                                                0)):
            return
        rate = self._published.rates.get(self.current.model_id)
        if not rate or len(rate) < RATE_MIN_FRAMES or self._baseline <= 0:
            return
        new_rate = sum(rate) / len(rate)
        if new_rate >= float(guard) * self._baseline:
            return
        reason = (f"rate guard: {new_rate:.2f} detections/frame over {len(rate)} frames, below "
                  f"{float(guard):g} x {self._baseline:.2f} of the previous model")
        LOG.error("reload: %s; rolling back %s", reason, self.current.model_id)
        self._baseline = None
        self.store.rollback(reason)
        self.request()


def check_tracking_classes(config: RunConfig, sources: Sequence[str], bundle: Bundle) -> None:
    """Refuse a model lacking a class that a zone or line of ``sources`` filters on (the
    tracking step maps the others by name at the swap)."""
    from device.tracking_stage import source_tracking_config

    for source in sources:
        source_tracking_config(config.tracker, config.tracking, source, bundle.class_names,
                               "config", sources)


def crash_guard(config: RunConfig) -> None:
    """Before the service loads ``active``: roll back a model that keeps crashing it."""
    root = store_of(config.bundle)
    if root is None:
        return
    rolled = Store(root).service_starting()
    if rolled:
        LOG.error("update: crash guard: rolled back to %s", rolled)

