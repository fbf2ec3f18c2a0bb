"""`jetyolo update` on the CPU backend: store, verify gate, switch, rollback, --list, and
SIGKILL at each phase (the store stays complete, a rerun succeeds)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
from update_bundles import renamed, wrong_reference  # tests/ is on sys.path (conftest)

from device.bundle import Bundle
from device.cli import main
from device.store import Store, engine_folder


@pytest.fixture(scope="module")
def bundles(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("update-bundles")
    return {
        "A": bundle_dir,
        "B": renamed(bundle_dir, folder / "b", "synth-b"),
        "C": wrong_reference(bundle_dir, folder / "c", "synth-c"),
    }


def update(device: Path, *args: object) -> int:
    return main(["update", "--device-dir", str(device), "--nice", "0", *map(str, args)])


def model_id(path: Path) -> str:
    return Bundle.load(path, verify=False).model_id


def test_update_verify_gate_rollback_and_list(
    bundles: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    engines = tmp_path / "engines"
    monkeypatch.setenv("JETYOLO_ENGINE_CACHE", str(engines))
    device = tmp_path / "device"
    store = Store(device)
    assert update(device, bundles["A"]) == 0
    assert update(device, bundles["B"]) == 0
    assert store.active_id() == model_id(bundles["B"])
    capsys.readouterr()

    assert update(device, bundles["C"]) == 1  # fails verify: B stays active
    err = capsys.readouterr().err
    assert "was not activated: verify failed" in err and "RESULT: FAIL" in err
    assert store.active_id() == model_id(bundles["B"])
    state = store.read_state()
    assert state["last_update"]["ok"] is False and state["last_update"]["phase"] == "verify"
    assert state["models"][model_id(bundles["C"])]["status"] == "verify failed"

    plan = engine_folder(engines, model_id(bundles["A"])) / "fp16.plan"  # as `build` names it
    plan.parent.mkdir(parents=True)
    plan.write_bytes(b"plan")
    assert update(device, "--list") == 0
    listing = capsys.readouterr().out
    lines = {line.split()[1] if line.startswith("*") else line.split()[0]: line
             for line in listing.splitlines()[1:-1]}
    assert lines[model_id(bundles["B"])].startswith("* ")
    assert "PASS fp32" in lines[model_id(bundles["A"])]
    assert lines[model_id(bundles["A"])].endswith("fp16.plan")
    assert lines[model_id(bundles["B"])].endswith("-")
    assert "FAIL fp32" in lines[model_id(bundles["C"])]

    assert update(device, "--rollback") == 0
    assert store.active_id() == model_id(bundles["A"])
    assert capsys.readouterr().out.strip() == model_id(bundles["A"])


def test_keep_prunes_old_models(bundles: dict, tmp_path: Path, bundle_dir: Path) -> None:
    device = tmp_path / "device"
    third = renamed(bundle_dir, tmp_path / "d", "synth-d")
    for path in (bundles["A"], bundles["B"], third):
        assert update(device, path, "--keep", "2") == 0
    assert sorted(Store(device).stored_ids()) == sorted([model_id(bundles["B"]), model_id(third)])


def test_a_config_that_does_not_run_the_store_is_refused(
    bundles: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"bundle: {bundles['A']}\nsource: x.mp4\n")
    assert update(tmp_path / "device", bundles["B"], "--config", config) == 2
    assert "would not follow an update" in capsys.readouterr().err
    assert not (tmp_path / "device" / "bundles").exists() or not any(
        (tmp_path / "device" / "bundles").iterdir())


def check_complete(store: Store) -> None:
    """Every listed model is a whole, hash-verified bundle; ``active`` names one of them."""
    for model in store.stored_ids():
        Bundle.load(store.path_of(model), verify=True)
    active = store.active_id()
    assert active is None or active in store.stored_ids()


def kill_at(command: List[str], phase: str) -> None:
    """Run ``command`` and SIGKILL it as soon as it announces ``phase`` on stderr."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    seen: List[str] = []
    assert process.stderr is not None
    for line in process.stderr:
        seen.append(line)
        if line.startswith(f"update: {phase}"):
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, seen


@pytest.mark.slow
def test_sigkill_at_each_phase_leaves_a_complete_store_and_a_rerun_succeeds(
    bundles: dict, tmp_path: Path
) -> None:
    device = tmp_path / "device"
    assert update(device, bundles["A"]) == 0
    store = Store(device)
    command = [sys.executable, "-m", "device.cli", "update", str(bundles["B"]),
               "--device-dir", str(device)]
    # Each kill interrupts the rerun of the previous one (on the CPU backend "building" finds
    # nothing to build: the kill lands between copy and verify).
    for phase in ("copying", "building", "verifying", "switching"):
        kill_at(command, phase)
        check_complete(store)
        assert store.active_id() in (model_id(bundles["A"]), model_id(bundles["B"])), phase
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert store.active_id() == model_id(bundles["B"])
    assert not [p for p in store.bundles.iterdir() if p.name.startswith(".")]
    check_complete(store)
    assert store.rollback_target() == model_id(bundles["A"])


def test_sigkill_mid_copy_of_a_large_file(bundles: dict, tmp_path: Path) -> None:
    """The copy itself interrupted: a folder-in-progress is never listed nor activated."""
    device = tmp_path / "device"
    big = renamed(bundles["A"], tmp_path / "big", "synth-big")
    manifest = json.loads((big / "manifest.json").read_text())
    model = big / manifest["variants"]["fp32"]["file"]
    store = Store(device)
    store.prepare()
    command = [sys.executable, "-c",
               "import sys, device.store as s; s.COPY_CHUNK = 4096; "
               "import time; real = s._copy_checked\n"
               "def slow(*a): time.sleep(0.5); real(*a)\n"
               "s._copy_checked = slow; from device.cli import main; "
               f"sys.exit(main(['update', {str(big)!r}, '--device-dir', {str(device)!r}]))"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(store.bundles.glob(".incoming-*")):
        time.sleep(0.02)
    assert list(store.bundles.glob(".incoming-*")), "the copy never started"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert store.stored_ids() == [] and store.active_id() is None
    assert model.is_file()
    assert update(device, big) == 0
    assert store.active_id() == model_id(big)
    assert os.listdir(store.bundles) == [store.path_of(model_id(big)).name]
