"""A running service updated in place: `jetyolo run --config` as the unit runs it (notify socket,
watchdog armed, the store's active link as bundle, a real mosquitto and subscriber), then
`jetyolo update B` (switch), `jetyolo update C` (fails verify: B keeps running), `--rollback`
(back to A). The subscriber must see every seq and every frame index once, model_id changing
exactly at the switches; the stats and STATUS= say what happened. The same service's guards
(a model that crashes it at start, a model whose detections collapse) roll back by themselves."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from mqtt_broker import MosquittoBroker, Subscriber
from polling import wait_until
from test_sdnotify import received
from update_bundles import renamed, wrong_reference

from device.bundle import MANIFEST, Bundle
from device.cli import main
from device.store import Store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def long_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file source outlasting three updates (a file never drops frames: any index gap in the
    published frames is the switch's)."""
    from host.synth import make_video

    return make_video(tmp_path_factory.mktemp("long") / "long.mp4", 4, (160, 96), 4000, seed=3)


@pytest.fixture(scope="module")
def bundles(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    folder = tmp_path_factory.mktemp("service-bundles")
    return {"A": bundle_dir, "B": renamed(bundle_dir, folder / "b", "synth-b"),
            "C": wrong_reference(bundle_dir, folder / "c", "synth-c")}


def model_id(path: Path) -> str:
    return Bundle.load(path, verify=False).model_id


class Service:
    """`jetyolo run --config` with systemd's environment (NOTIFY_SOCKET, WATCHDOG_USEC)."""

    def __init__(self, config: Path, notify: Tuple[socket.socket, str]) -> None:
        self.sock, path = notify
        env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "device.cli", "run", "--config", str(config)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.notified: List[str] = []

    def poll_notify(self) -> List[str]:
        self.notified += received(self.sock)
        return self.notified

    def wait_ready(self) -> None:
        ok = wait_until(lambda: any(m.startswith("READY=1") for m in self.poll_notify())
                        or self.process.poll() is not None, 120)
        assert ok and self.process.poll() is None, self.stop()

    def alive(self) -> None:
        assert self.process.poll() is None, f"the service exited: {self.stop()}"

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            _, err = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        return err


def write_config(path: Path, device: Path, video: Path, broker: MosquittoBroker) -> Path:
    path.write_text(
        f"bundle: {device / 'active'}\nsource: {video}\nbackend: onnxruntime\nthreads: 1\n"
        f"sinks: ['mqtt://127.0.0.1:{broker.port}']\nspool_dir: {device / 'spool'}\n"
        "device_id: cam\nstats_interval_s: 0.5\n")
    return path


def installed_a(bundles: Dict[str, Path], video: Path, broker: MosquittoBroker,
                tmp_path: Path) -> Tuple[Path, Path]:
    """A device folder with bundle A installed by `jetyolo update`, and the service's config."""
    device = tmp_path / "device"
    config = write_config(tmp_path / "config.yaml", device, video, broker)
    assert update(device, config, bundles["A"]) == 0
    return device, config


def update(device: Path, config: Path, *args: object) -> int:
    return main(["update", "--device-dir", str(device), "--config", str(config), "--nice", "0",
                 "--wait-s", "120", *map(str, args)])


def runs(values: List[Any]) -> List[Any]:
    """[a, a, b, b, a] -> [a, b, a]."""
    return [v for i, v in enumerate(values) if i == 0 or values[i - 1] != v]


def test_update_refuse_and_roll_back_a_running_service(
    bundles: Dict[str, Path], long_video: Path, broker: MosquittoBroker,
    notify_socket: Tuple[socket.socket, str], tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    device, config = installed_a(bundles, long_video, broker, tmp_path)
    subscriber = Subscriber(broker.port)
    service = Service(config, notify_socket)
    ids = {name: model_id(path) for name, path in bundles.items()}

    def frame_models() -> List[str]:
        return [m["model_id"] for m in subscriber.payloads("/detections")]

    try:
        service.wait_ready()
        assert update(device, config, bundles["B"]) == 0
        assert wait_until(lambda: ids["B"] in frame_models(), 30)
        service.alive()
        capsys.readouterr()

        assert update(device, config, bundles["C"]) == 1  # fails verify
        assert "verify failed" in capsys.readouterr().err
        assert wait_until(lambda: any(
            (s.get("last_update") or {}).get("model_id") == ids["C"]
            for s in subscriber.payloads("/stats")), 30)
        assert wait_until(lambda: any("refused" in m for m in service.poll_notify()), 30)
        service.alive()

        assert update(device, config, "--rollback") == 0
        assert wait_until(lambda: runs(frame_models())[-1:] == [ids["A"]], 30)
        # the switch back is reported by the next stats message: wait for it before stopping
        assert wait_until(lambda: any(
            (s.get("model_update") or {}).get("to") == ids["A"]
            and (s.get("model_update") or {}).get("from") == ids["B"]
            for s in subscriber.payloads("/stats")), 30)
        service.alive()
    finally:
        stderr = service.stop()
        time.sleep(1.0)
        subscriber.close()
    assert service.process.returncode == 0, stderr

    frames = subscriber.payloads("/detections")
    every = [json.loads(payload) for topic, payload in subscriber.messages
             if not topic.endswith("/available")]
    seqs = sorted(message["seq"] for message in every)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a message was lost"
    indices = [frame["frame_index"] for frame in frames]
    assert indices == list(range(len(indices))), "a frame was lost or repeated"
    assert runs([frame["model_id"] for frame in frames]) == [ids["A"], ids["B"], ids["A"]]
    assert ids["C"] not in frame_models()
    switches = [s["model_update"] for s in subscriber.payloads("/stats") if "model_update" in s]
    assert {(s["from"], s["to"]) for s in switches} == {(ids["A"], ids["B"]), (ids["B"], ids["A"])}
    assert all(s["frame_indices_skipped"] == 0 for s in switches)
    gaps = sorted({s["gap_ms"] for s in switches})
    usual = sorted({s["usual_frame_interval_ms"] for s in switches})
    print(f"switch gaps {gaps} ms; usual frame interval {usual} ms; load {os.getloadavg()}")


def crashing(source: Path, out: Path) -> Path:
    """A bundle that passes every hash check but whose model ONNX Runtime cannot load: the
    service dies at start, systemd restarts it."""
    bundle = renamed(source, out, "synth-crash")
    manifest = json.loads((bundle / MANIFEST).read_text())
    model = bundle / manifest["variants"]["fp32"]["file"]
    model.write_bytes(b"\x08\x07garbage, not a model")
    from device.bundle import add_files

    add_files(Bundle.load(bundle, verify=False), {model.name: model.read_bytes()})
    return bundle


def test_crash_guard_rolls_back_a_model_that_kills_the_service_at_start(
    bundles: Dict[str, Path], long_video: Path, broker: MosquittoBroker,
    notify_socket: Tuple[socket.socket, str], tmp_path: Path,
) -> None:
    device, config = installed_a(bundles, long_video, broker, tmp_path)
    store = Store(device)
    bad = crashing(bundles["A"], tmp_path / "crash")
    # What `update` would have refused at verify: activated as if it had passed (a model that
    # loads in `verify` but crashes the service on this device's camera, say).
    store.import_bundle(bad, print)
    store.activate(model_id(bad), {"probation_s": 300, "max_restarts": 2})
    for start in (1, 2):  # systemd's Restart=on-failure: each start crashes on the model
        service = Service(config, notify_socket)
        service.process.wait(timeout=120)
        assert service.process.returncode != 0, f"start {start} did not fail"
    service = Service(config, notify_socket)  # start 3: the guard rolls back first
    try:
        service.wait_ready()
        assert store.active_id() == model_id(bundles["A"])
        assert "crash guard" in store.read_state()["last_rollback"]["reason"]
    finally:
        assert service.stop() is not None


def blind(source: Path, out: Path) -> Path:
    """A model that passes verify (its reference was recorded at the usual threshold) but is
    deployed with a confidence threshold that hides nearly every object."""
    bundle = renamed(source, out, "synth-blind")
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["postprocess"]["conf"] = 0.999
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    return bundle


def test_rate_guard_rolls_back_a_model_whose_detections_collapse(
    bundles: Dict[str, Path], long_video: Path, broker: MosquittoBroker,
    notify_socket: Tuple[socket.socket, str], tmp_path: Path,
) -> None:
    device, config = installed_a(bundles, long_video, broker, tmp_path)
    subscriber = Subscriber(broker.port)
    service = Service(config, notify_socket)
    store = Store(device)
    bad = blind(bundles["A"], tmp_path / "blind")
    try:
        service.wait_ready()
        assert wait_until(lambda: len(subscriber.payloads("/detections")) > 60, 60)
        assert update(device, config, bad, "--rate-guard", "0.5") == 0  # verify passes
        assert wait_until(lambda: store.active_id() == model_id(bundles["A"])
                          and "last_rollback" in store.read_state(), 120)
        assert "rate guard" in store.read_state()["last_rollback"]["reason"]
        assert wait_until(lambda: runs([m["model_id"] for m in subscriber.payloads(
            "/detections")])[-1:] == [model_id(bundles["A"])], 30)
    finally:
        service.stop()
        subscriber.close()
    models = runs([m["model_id"] for m in subscriber.payloads("/detections")])
    assert models == [model_id(bundles["A"]), model_id(bad), model_id(bundles["A"])]
