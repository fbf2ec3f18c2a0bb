"""device.store: the versioned bundle store (copies checked file by file, atomic switch,
history, rollback, the crash guard, pruning, the registered service)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from device.bundle import MANIFEST, Bundle, write_new_bundle
from device.errors import JetyoloError
from device.store import Store, engine_folder, store_dir_name, store_of


def tiny_bundle(folder: Path, name: str, payload: bytes = b"onnx bytes") -> Path:
    model = folder / f"{name}.src"
    model.write_bytes(payload)
    manifest = {
        "schema_version": 1, "name": name, "class_names": ["a"],
        "preprocess": {"size": [32, 32]}, "postprocess": {"conf": 0.25},
        "variants": {"fp32": {"file": "model.onnx", "input": {}, "outputs": {}}},
    }
    return write_new_bundle(folder / name, {"model.onnx": model}, manifest).root


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "device")


def quiet(_line: str) -> None:
    pass


def stored(store: Store, tmp_path: Path, name: str) -> str:
    return store.import_bundle(tiny_bundle(tmp_path, name, name.encode()), quiet).model_id


def test_import_copies_the_listed_files_into_a_folder_named_by_model_id(
    store: Store, tmp_path: Path
) -> None:
    source = tiny_bundle(tmp_path, "a")
    (source / "stray.bin").write_bytes(b"not in the manifest")
    bundle = store.import_bundle(source, quiet)
    assert bundle.root == store.bundles / store_dir_name(bundle.model_id)
    assert sorted(p.name for p in bundle.root.iterdir()) == [MANIFEST, "model.onnx"]
    assert Bundle.load(bundle.root).model_id == bundle.model_id
    assert store.stored_ids() == [bundle.model_id]
    # Again: the intact copy is reused, not copied twice.
    lines: List[str] = []
    assert store.import_bundle(source, lines.append).root == bundle.root
    assert any("already in the store" in line for line in lines)


def test_a_damaged_bundle_leaves_nothing_in_the_store(store: Store, tmp_path: Path) -> None:
    source = tiny_bundle(tmp_path, "a")
    (source / "model.onnx").write_bytes(b"changed after export")
    with pytest.raises(JetyoloError, match="does not match the sha256"):
        store.import_bundle(source, quiet)
    assert store.stored_ids() == [] and list(store.bundles.iterdir()) == []


def test_a_manifest_path_outside_the_bundle_is_refused(store: Store, tmp_path: Path) -> None:
    source = tiny_bundle(tmp_path, "a")
    secret = tmp_path / "secret"
    secret.write_bytes(b"x")
    manifest = json.loads((source / MANIFEST).read_text())
    manifest["files"]["../secret"] = {"sha256": "0" * 64, "size": 1}
    (source / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(JetyoloError, match="outside the bundle"):
        store.import_bundle(source, quiet)
    assert not store.bundles.exists() or list(store.bundles.iterdir()) == []  # refused at load


def test_an_untrusted_name_cannot_escape_the_store() -> None:
    assert store_dir_name("../../etc@abc") == "etc@abc"
    assert "/" not in store_dir_name("a/b@c")


def test_activate_history_and_rollback(store: Store, tmp_path: Path) -> None:
    first, second = stored(store, tmp_path, "a"), stored(store, tmp_path, "b")
    assert store.active_id() is None and store.rollback_target() is None
    store.activate(first)
    store.activate(second)
    assert store.active_id() == second
    assert not os.path.isabs(os.readlink(store.active_link))  # relative: the store can move
    assert store_of(store.active_link) == store.root and store_of(store.path_of(first)) is None
    assert store.rollback_target() == first
    assert store.rollback("test") == first
    assert store.active_id() == first
    state = store.read_state()
    assert state["history"] == [first]
    assert state["models"][second]["status"] == "rolled back"
    with pytest.raises(JetyoloError, match="nothing to roll back to"):
        store.rollback("again")


def test_a_kill_between_switch_and_history_is_repaired(store: Store, tmp_path: Path) -> None:
    first, second = stored(store, tmp_path, "a"), stored(store, tmp_path, "b")
    store.activate(first)
    store._point_active(second)  # the link switched, the history write never happened
    store.repair_history()
    assert store.read_state()["history"] == [first, second]
    assert store.rollback_target() == first


def test_leftovers_of_an_interrupted_copy_are_removed(store: Store, tmp_path: Path) -> None:
    first = stored(store, tmp_path, "a")
    half = store.bundles / ".incoming-x1"
    half.mkdir()
    (half / "model.onnx").write_bytes(b"hal")
    assert store.stored_ids() == [first]  # never listed
    assert store.remove_incoming() == [half] and not half.exists()


def test_crash_guard_rolls_back_after_too_many_starts(store: Store, tmp_path: Path) -> None:
    first, second = stored(store, tmp_path, "a"), stored(store, tmp_path, "b")
    store.activate(first)
    store.activate(second, {"probation_s": 300, "max_restarts": 2})
    assert store.service_starting() is None  # start 1
    assert store.service_starting() is None  # start 2
    assert store.service_starting() == first  # start 3: more than 2 -> rolled back
    assert store.active_id() == first
    assert "crash guard" in store.read_state()["last_rollback"]["reason"]
    assert store.service_starting() is None  # the old model has no probation


def test_crash_guard_ends_with_the_probation(store: Store, tmp_path: Path) -> None:
    first, second = stored(store, tmp_path, "a"), stored(store, tmp_path, "b")
    store.activate(first)
    store.activate(second, {"probation_s": 0.0, "max_restarts": 0})
    assert store.service_starting() is None  # the window is over: starts are not crashes
    assert store.active_id() == second


def test_keep_set_and_removal(store: Store, tmp_path: Path) -> None:
    ids = [stored(store, tmp_path, name) for name in "abcd"]
    for model_id in ids:
        store.activate(model_id)
    engines = tmp_path / "engines"
    engine_folder(engines, ids[0]).mkdir(parents=True)
    assert store.keep_set(2) == [ids[3], ids[2]]
    store.remove_bundle(ids[0], [engines])
    assert ids[0] not in store.stored_ids()
    assert not engine_folder(engines, ids[0]).exists()
    assert ids[0] not in store.read_state()["models"]


def test_service_registration_and_a_reused_pid(store: Store) -> None:
    store.prepare()
    store.register_service("m@1")
    assert store.service_pid() == os.getpid()
    data = json.loads((store.root / "service.json").read_text())
    data["start_ticks"] += 1  # the same pid, another process
    (store.root / "service.json").write_text(json.dumps(data))
    assert store.service_pid() is None
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (store.root / "service.json").write_text(json.dumps({"pid": int(gone), "model_id": "m"}))
    assert store.service_pid() is None


def test_one_update_at_a_time(store: Store) -> None:
    with store.update_lock():
        child = subprocess.run(
            [sys.executable, "-c", "import sys; from device.store import Store; "
             f"Store({str(store.root)!r}).update_lock().__enter__()"],
            capture_output=True, text=True)
    assert child.returncode != 0 and "another `jetyolo update` is running" in child.stderr
