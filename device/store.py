"""The versioned bundle store on the device: what ``jetyolo update`` writes and the service runs.

::

    DEVICE_DIR/                     (/var/lib/jetyolo under systemd: the unit's StateDirectory=)
      bundles/<model_id>/           complete, hash-verified bundle copies, one per model
      bundles/.incoming-*           a copy in progress (never read; removed by the next update)
      active -> bundles/<model_id>  the model the service runs (a symlink replaced by rename)
      state.json                    activation history, per-model records, last update outcome
      service.json                  the running `jetyolo run`: pid, start time, model_id
      update.lock, state.lock       flock(2) locks: one update at a time; short state edits

The service's config names ``bundle: DEVICE_DIR/active``; ``jetyolo run`` re-reads that link on
SIGHUP. Every change is a rename (a copy is renamed into ``bundles/`` only once every file
matches its sha256; ``active`` is a new symlink renamed over the old one; ``state.json`` is
written through a temp file), so a process killed at any point leaves the store with complete
bundles only and ``active`` naming one of them.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Union

from device.bundle import MANIFEST, Bundle, read_manifest
from device.errors import JetyoloError
from device.files import atomic_write_json

BUNDLES = "bundles"
ACTIVE = "active"
STATE = "state.json"
SERVICE = "service.json"
INCOMING_PREFIX = ".incoming-"
DEFAULT_KEEP = 3
# Crash guard defaults: when the service starts more than MAX_RESTARTS times within PROBATION_S
# of a model's activation (systemd's Restart= after crashes), that start rolls the model back.
DEFAULT_PROBATION_S = 300.0
DEFAULT_MAX_RESTARTS = 2
COPY_CHUNK = 1 << 20
_UNSAFE = re.compile(r"[^A-Za-z0-9._@+-]+")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def store_dir_name(model_id: str) -> str:
    """``model_id`` as one safe folder name (a bundle's name is untrusted: no ``/``, no ``..``)."""
    return _UNSAFE.sub("_", model_id).strip("._") or "model"


def engine_folder(cache_dir: Path, model_id: str) -> Path:
    """Where ``jetyolo build`` keeps this model's plans (engine_cache.plan_path's naming)."""
    from device.engine_cache import plan_path

    return plan_path(cache_dir, model_id, "fp32").parent


def store_of(bundle_path: Union[str, Path]) -> Optional[Path]:
    """The store whose ``active`` link ``bundle_path`` is, or None for a plain bundle folder."""
    path = Path(bundle_path)
    if path.name == ACTIVE and path.is_symlink() and (path.parent / BUNDLES).is_dir():
        return path.parent
    return None


def process_start_ticks(pid: int) -> Optional[int]:
    """Field 22 of /proc/PID/stat (start time in clock ticks): tells a pid from a reused one."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()
    return int(fields[19]) if len(fields) > 19 else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_checked(source: Path, target: Path, expected_sha256: str, relative: str) -> None:
    """Copy ``source`` to ``target`` hashing the bytes as they are written; a mismatch raises."""
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as reader, open(target, "wb") as writer:
        for chunk in iter(lambda: reader.read(COPY_CHUNK), b""):
            digest.update(chunk)
            writer.write(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    if digest.hexdigest() != expected_sha256:
        raise JetyoloError(
            f"bundle {source.parent}: {relative} does not match the sha256 in its manifest; "
            "the bundle is damaged or was changed after export: copy it again"
        )


def _checked_relative(root: Path, relative: str) -> Path:
    """A manifest's file name as a path inside ``root``: not absolute, no ``..``, no symlink."""
    parts = Path(relative).parts
    if Path(relative).is_absolute() or ".." in parts or not parts:
        raise JetyoloError(
            f"bundle {root}: manifest lists {relative!r}, a path outside the bundle; "
            "re-create the bundle with `jetyolo export`"
        )
    path = root / relative
    if path.is_symlink() or not path.is_file():
        what = "a symlink" if path.is_symlink() else "missing"
        raise JetyoloError(f"bundle {root}: {relative} is {what}; copy the bundle again")
    return path


class Store:
    """One device directory's bundle store (see the module doc for the layout)."""

    def __init__(self, root: Union[str, Path]) -> None:
        self.root = Path(root)
        self.bundles = self.root / BUNDLES
        self.active_link = self.root / ACTIVE

    # ---- locks and state -----------------------------------------------------------------------
    def prepare(self) -> None:
        try:
            self.bundles.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JetyoloError(
                f"cannot create the bundle store in {self.root} ({exc.strerror or exc}); "
                "run as the service user (sudo -u jetyolo) or pass a writable --device-dir"
            ) from exc

    @contextmanager
    def _flock(self, name: str, blocking: bool) -> Iterator[None]:
        self.prepare()
        with open(self.root / name, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise JetyoloError(
                        f"another `jetyolo update` is running on {self.root} ({name} is held); "
                        "wait for it to finish"
                    ) from None
                raise
            yield  # the kernel drops the lock if the process dies

    def update_lock(self) -> Any:
        """Held by update and rollback for their whole run (one at a time; not blocking)."""
        return self._flock("update.lock", blocking=False)

    def read_state(self) -> Dict[str, Any]:
        path = self.root / STATE
        if not path.is_file():
            return {"history": [], "models": {}}
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise JetyoloError(
                f"{path} is unreadable ({exc}); move it aside to start over"
            ) from exc
        if not isinstance(state, dict):
            raise JetyoloError(f"{path} is not a JSON object; move it aside to start over")
        state.setdefault("history", [])
        state.setdefault("models", {})
        return state

    def edit_state(self, change: Callable[[Dict[str, Any]], Any]) -> Any:
        """Read, ``change`` in place, write atomically, under the short state lock."""
        with self._flock("state.lock", blocking=True):
            state = self.read_state()
            result = change(state)
            atomic_write_json(self.root / STATE, state)
            return result

    def record(self, model_id: str, **fields: Any) -> None:
        """Merge ``fields`` into the model's record in state.json."""

        def change(state: Dict[str, Any]) -> None:
            state["models"].setdefault(model_id, {}).update(fields)

        self.edit_state(change)

    def note_update(self, outcome: Mapping[str, Any]) -> None:
        """The last update's outcome, which the service's stats message and STATUS= carry."""

        def change(state: Dict[str, Any]) -> None:
            state["last_update"] = dict(outcome, at=now_iso())

        self.edit_state(change)

    # ---- bundles -------------------------------------------------------------------------------
    def path_of(self, model_id: str) -> Path:
        return self.bundles / store_dir_name(model_id)

    def stored_ids(self) -> List[str]:
        """model_ids of the complete bundles in the store (never the incoming copies)."""
        ids = []
        for folder in sorted(self.bundles.glob("*")) if self.bundles.is_dir() else []:
            if folder.name.startswith(".") or not (folder / MANIFEST).is_file():
                continue
            try:
                ids.append(Bundle.load(folder, verify=False).model_id)
            except JetyoloError:
                continue
        return ids

    def remove_incoming(self) -> List[Path]:
        """Delete copies left by an interrupted update (call with the update lock held)."""
        leftovers = [p for p in self.bundles.glob(".*") if p.is_dir()] if self.bundles.is_dir() \
            else []
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
        for link in self.root.glob(f".{ACTIVE}.*"):
            link.unlink(missing_ok=True)
        return leftovers

    def import_bundle(self, source: Union[str, Path], log: Callable[[str], None]) -> Bundle:
        """Copy the bundle at ``source`` into ``bundles/<model_id>/``: the files its manifest
        lists, each checked against its sha256 while copied, into a temp folder renamed into
        place when complete. An intact copy already in the store is reused."""
        source = Path(source)
        manifest = read_manifest(source)
        incoming_id = Bundle(source, manifest).model_id
        target = self.path_of(incoming_id)
        if target.is_dir():
            try:
                existing = Bundle.load(target, verify=True)
                if existing.model_id == incoming_id:
                    log(f"update: {incoming_id} is already in the store ({target})")
                    return existing
            except JetyoloError as exc:
                log(f"update: the stored copy of {incoming_id} is damaged ({exc}); copying again")
        self.prepare()
        staging = Path(tempfile.mkdtemp(prefix=INCOMING_PREFIX, dir=self.bundles))
        try:
            total = len(manifest["files"])
            for number, (relative, entry) in enumerate(sorted(manifest["files"].items()), 1):
                log(f"update: copying {relative} ({number}/{total})")
                _copy_checked(_checked_relative(source, relative), staging / relative,
                              str(entry["sha256"]), relative)
            shutil.copyfile(source / MANIFEST, staging / MANIFEST)
            copied = Bundle.load(staging, verify=True)  # sizes too, and the manifest as copied
            staging.chmod(0o750)
            _fsync_dir(staging)
            if target.exists():
                shutil.rmtree(target)
            os.rename(staging, target)
            _fsync_dir(self.bundles)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.record(incoming_id, dir=target.name, source=str(source), added=now_iso(),
                    status="staged")
        return Bundle(target, copied.manifest)

    def remove_bundle(self, model_id: str, engine_dirs: List[Path]) -> None:
        """Delete a stored bundle (renamed aside first, so no half-deleted bundle is listed)
        and its engines, and forget its record."""
        folder = self.path_of(model_id)
        if folder.is_dir():
            doomed = self.bundles / f".removing-{folder.name}"
            shutil.rmtree(doomed, ignore_errors=True)
            os.rename(folder, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        for engines in engine_dirs:
            shutil.rmtree(engine_folder(engines, model_id), ignore_errors=True)

        def change(state: Dict[str, Any]) -> None:
            state["models"].pop(model_id, None)

        self.edit_state(change)

    # ---- the active model ----------------------------------------------------------------------
    def active_id(self) -> Optional[str]:
        """The model_id ``active`` points at, or None (no link, or a link to nothing)."""
        if not self.active_link.is_symlink():
            return None
        try:
            return Bundle.load(self.active_link, verify=False).model_id
        except JetyoloError:
            return None

    def _point_active(self, model_id: str) -> None:
        target = self.path_of(model_id)
        if not (target / MANIFEST).is_file():
            raise JetyoloError(f"{model_id} is not in the store {self.bundles}; "
                               "`jetyolo update --list` shows what is")
        temporary = self.root / f".{ACTIVE}.{os.getpid()}"
        temporary.unlink(missing_ok=True)
        os.symlink(Path(BUNDLES) / target.name, temporary)  # relative: the store can move
        os.replace(temporary, self.active_link)
        _fsync_dir(self.root)

    def activate(self, model_id: str, probation: Optional[Mapping[str, Any]] = None) -> None:
        """Point ``active`` at ``model_id`` and append it to the history. ``probation`` (the
        guards of this activation) is what ``service_starting`` and the rate guard read."""
        self._point_active(model_id)

        def change(state: Dict[str, Any]) -> None:
            history: List[str] = state["history"]
            if not history or history[-1] != model_id:
                history.append(model_id)
            state["models"].setdefault(model_id, {}).update(status="active",
                                                             activated=now_iso())
            state["probation"] = dict(probation or {}, model_id=model_id, since=time.time(),
                                      starts=0)

        self.edit_state(change)

    def repair_history(self) -> None:
        """After a kill between the switch and the history write: the link is the truth."""
        active = self.active_id()
        if active is None:
            return

        def change(state: Dict[str, Any]) -> None:
            if not state["history"] or state["history"][-1] != active:
                state["history"].append(active)

        self.edit_state(change)

    def rollback_target(self) -> Optional[str]:
        """The model active before the current one that is still in the store."""
        state = self.read_state()
        active = self.active_id()
        stored = set(self.stored_ids())
        history = [model for model in state["history"] if model in stored]
        while history and history[-1] == active:
            history.pop()
        return history[-1] if history else None

    def rollback(self, reason: str) -> str:
        """Activate ``rollback_target()``; the rolled-back model leaves the history. Returns
        the model now active."""
        target = self.rollback_target()
        current = self.active_id()
        if target is None:
            raise JetyoloError(
                f"nothing to roll back to in {self.root}: no earlier model is in the store "
                "(`jetyolo update --list`)"
            )
        self._point_active(target)

        def change(state: Dict[str, Any]) -> None:
            history: List[str] = state["history"]
            while history and history[-1] != target:
                history.pop()
            if not history:
                history.append(target)
            if current is not None:
                state["models"].setdefault(current, {}).update(
                    status="rolled back", rolled_back=now_iso(), rollback_reason=reason)
            state["models"].setdefault(target, {}).update(status="active", activated=now_iso())
            state.pop("probation", None)
            state["last_rollback"] = {"from": current, "to": target, "reason": reason,
                                      "at": now_iso()}

        self.edit_state(change)
        return target

    def keep_set(self, keep: int) -> List[str]:
        """The models pruning keeps: the last ``keep`` distinct ones activated, plus the active
        one and the one the service runs."""
        state = self.read_state()
        recent: List[str] = []
        for model in reversed(state["history"]):
            if model not in recent:
                recent.append(model)
        kept = recent[:keep]
        for extra in (self.active_id(), self.service().get("model_id")):
            if extra and extra not in kept:
                kept.append(extra)
        return kept

    # ---- the running service -------------------------------------------------------------------
    def register_service(self, model_id: str, **fields: Any) -> None:
        """Called by `jetyolo run` at start and after each reload: who to SIGHUP, what it runs."""
        pid = os.getpid()
        atomic_write_json(self.root / SERVICE, dict(
            fields, pid=pid, start_ticks=process_start_ticks(pid), model_id=model_id,
            updated=now_iso()))

    def service(self) -> Dict[str, Any]:
        """service.json as written by the running service ({} when absent or unreadable)."""
        try:
            data = json.loads((self.root / SERVICE).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def service_pid(self) -> Optional[int]:
        """The pid of the `jetyolo run` registered here, when that process still lives."""
        data = self.service()
        pid = data.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return None
        ticks = process_start_ticks(pid)
        if ticks is None or (data.get("start_ticks") is not None and ticks != data["start_ticks"]):
            return None  # gone, or the pid now belongs to another process
        return pid

    def service_starting(self) -> Optional[str]:
        """Called by `jetyolo run` before it loads ``active``. Counts the starts of a model still
        in probation; past its restart limit the model is rolled back and the model now active
        is returned (None: carry on)."""

        def count(state: Dict[str, Any]) -> Optional[Dict[str, Any]]:
            probation = state.get("probation")
            if not isinstance(probation, dict):
                return None
            window = float(probation.get("probation_s", DEFAULT_PROBATION_S))
            if time.time() - float(probation.get("since", 0)) > window:
                state.pop("probation", None)
                return None
            probation["starts"] = int(probation.get("starts", 0)) + 1
            return dict(probation)

        probation = self.edit_state(count)
        if probation is None or probation.get("model_id") != self.active_id():
            return None
        limit = int(probation.get("max_restarts", DEFAULT_MAX_RESTARTS))
        if probation["starts"] <= limit:
            return None
        return self.rollback(
            f"the service started {probation['starts']} times within "
            f"{float(probation.get('probation_s', DEFAULT_PROBATION_S)):.0f} s of activating "
            f"{probation['model_id']} (crash guard: more than {limit})"
        )
