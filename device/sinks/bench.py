"""How fast the MQTT sink goes, and what the spool costs: ``python -m device.sinks.bench``.

Measures, as medians over ``--runs``:

- MQTT sink throughput (messages/s) to a broker at QoS 1 with the spool on: from the first
  ``publish_frame`` to the moment the last message was acknowledged (PUBACK) and deleted from
  the spool. Includes building and encoding the messages.
- paho alone, same payloads, QoS 1, no spool: the ceiling the sink works under.
- the spool's cost per message (append + delete after the ack), one transaction per message
  (a 30 fps camera) and in batches of 100 (a replay or a burst).
- the ``seq`` counter: per message with a durable write vs one write per block.
- ``publish_frame`` as the inference loop pays for it (µs per call).

Without ``--broker HOST:PORT`` a private ``mosquitto -p <free port>`` is started and stopped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from device.detections import Detections, FrameResult
from device.errors import JetyoloError
from device.sinks.base import Outgoing, SinkOptions
from device.sinks.sinkset import SinkSet, open_sinks
from device.sinks.spool import SeqCounter, Spool, prepare_spool_dir

WAIT_S = 120.0


def sample_result(index: int) -> FrameResult:
    """A 1280x720 frame with five detections: a message of about 700 bytes."""
    boxes = np.array([[100 + 50 * i, 80, 220 + 50 * i, 300] for i in range(5)], np.float32)
    detections = Detections(boxes, np.linspace(0.9, 0.5, 5), np.arange(5) % 3)
    latency = {"capture": 1.2, "preprocess": 2.1, "infer": 8.4, "postprocess": 0.9}
    return FrameResult("cam0", index, time.time(), (1280, 720), detections, latency)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_broker() -> Tuple[subprocess.Popen, int]:
    """``mosquitto -p PORT`` (loopback only without a config file); waits until it listens."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).is_file():
        raise JetyoloError("mosquitto not found: install it (apt install mosquitto) or --broker")
    port = _free_port()
    process = subprocess.Popen([binary, "-p", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise JetyoloError(f"mosquitto did not start listening on port {port}")


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise JetyoloError(f"benchmark stuck: {what} after {WAIT_S:.0f} s")
        time.sleep(0.002)


def sink_throughput(host: str, port: int, messages: int, work: Path) -> Tuple[float, float]:
    """(messages/s through the MQTT sink until all acknowledged, µs per publish_frame call)."""
    options = SinkOptions(device_id="bench", model_id="bench", spool_dir=work,
                          queue_size=messages + 10)
    sinks: SinkSet = open_sinks([f"mqtt://{host}:{port}"], options)
    mqtt_sink = sinks.sinks[0]
    try:
        _wait(lambda: bool(mqtt_sink.depth()["connected"]), "no connection to the broker")
        results = [sample_result(i) for i in range(messages)]
        start = time.perf_counter()
        for result in results:
            sinks.publish_frame(result)
        call_us = (time.perf_counter() - start) / messages * 1e6
        _wait(lambda: sinks.frames_reported == messages and mqtt_sink.handled == messages
              and mqtt_sink.depth()["spool"] == 0, "messages not acknowledged")
        elapsed = time.perf_counter() - start
    finally:
        sinks.close(timeout=5)
    return messages / elapsed, call_us


def paho_throughput(host: str, port: int, messages: int) -> float:
    """messages/s of a bare paho client, QoS 1, same payload size, no spool."""
    import paho.mqtt.client as mqtt

    payload = json.dumps({"seq": 1, "pad": "x" * 650}).encode()
    acked = threading.Semaphore(0)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-paho")
    client.max_inflight_messages_set(128)
    client.on_publish = lambda *_args: acked.release()
    client.connect(host, port)
    client.loop_start()
    try:
        start = time.perf_counter()
        for _ in range(messages):
            client.publish("bench/paho", payload, qos=1)
        for _ in range(messages):
            if not acked.acquire(timeout=WAIT_S):
                raise JetyoloError("paho baseline: PUBACKs stopped arriving")
        return messages / (time.perf_counter() - start)
    finally:
        client.disconnect()
        client.loop_stop()


def spool_cost_us(work: Path, messages: int, batch: int) -> float:
    """µs per message to append it to the spool and delete it again, ``batch`` per transaction."""
    spool = Spool(prepare_spool_dir(work), f"bench-{batch}", 10**6)
    payload = json.dumps({"seq": 1, "pad": "x" * 650}).encode()
    batches = [[Outgoing("bench/spool", payload, i * batch + j) for j in range(batch)]
               for i in range(messages // batch)]
    start = time.perf_counter()
    for group in batches:
        spool.append(group)
        spool.remove([row.row_id for row in spool.pending(0, batch)])
    elapsed = time.perf_counter() - start
    spool.close()
    return elapsed / (len(batches) * batch) * 1e6


def seq_cost_us(work: Path, numbers: int, block: int) -> float:
    path = prepare_spool_dir(work)
    counter = SeqCounter(path, block=block)
    start = time.perf_counter()
    for _ in range(numbers):
        counter.next()
    elapsed = time.perf_counter() - start
    counter.close()
    return elapsed / numbers * 1e6


def _median(measure: Callable[[], float], runs: int, label: str) -> float:
    values = []
    for run in range(runs):
        values.append(measure())
        print(f"  {label} run {run + 1}/{runs}: {values[-1]:,.1f}", flush=True)
    return statistics.median(values)


def run_all(host: str, port: int, messages: int, runs: int) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="jetyolo-bench-") as tmp:
        work = Path(tmp)
        counter = iter(range(10**6))

        def fresh() -> Path:
            return work / f"run{next(counter)}"

        sink_rates, paho_rates, calls = [], [], []
        for run in range(runs):  # interleaved, so load from other jobs hits both alike
            rate, call_us = sink_throughput(host, port, messages, fresh())
            sink_rates.append(rate)
            calls.append(call_us)
            paho_rates.append(paho_throughput(host, port, messages))
            print(f"  run {run + 1}/{runs}: MQTT sink {rate:,.0f} msg/s, "
                  f"paho alone {paho_rates[-1]:,.0f} msg/s", flush=True)
        results = {
            "sink_msgs_per_s": statistics.median(sink_rates),
            "paho_msgs_per_s": statistics.median(paho_rates),
            "sink_msgs_per_s_range": [min(sink_rates), max(sink_rates)],
            "paho_msgs_per_s_range": [min(paho_rates), max(paho_rates)],
            "spool_us_per_msg_batch1": _median(lambda: spool_cost_us(fresh(), 2000, 1), runs,
                                               "spool µs/msg, 1 per transaction"),
            "spool_us_per_msg_batch100": _median(lambda: spool_cost_us(fresh(), 20000, 100),
                                                 runs, "spool µs/msg, 100 per transaction"),
            "seq_us_durable_each": _median(lambda: seq_cost_us(fresh(), 500, 1), runs,
                                           "seq µs, durable write per number"),
            "seq_us_block": _median(lambda: seq_cost_us(fresh(), 100000, 1024), runs,
                                    "seq µs, one durable write per 1024"),
        }
        results["publish_frame_us"] = statistics.median(calls)
    return results


def report(results: Dict[str, Any], messages: int, runs: int) -> str:
    ratio = results["sink_msgs_per_s"] / results["paho_msgs_per_s"]
    sink_low, sink_high = results["sink_msgs_per_s_range"]
    paho_low, paho_high = results["paho_msgs_per_s_range"]
    rows = [
        ("MQTT sink, QoS 1, spool on (msg/s)", f"{results['sink_msgs_per_s']:,.0f}"),
        ("  range over the runs", f"{sink_low:,.0f}-{sink_high:,.0f}"),
        ("paho alone, QoS 1, no spool (msg/s)", f"{results['paho_msgs_per_s']:,.0f}"),
        ("  range over the runs", f"{paho_low:,.0f}-{paho_high:,.0f}"),
        ("sink / paho", f"{ratio:.2f}"),
        ("spool append+delete, 1 msg per transaction (µs/msg)",
         f"{results['spool_us_per_msg_batch1']:.1f}"),
        ("spool append+delete, 100 msgs per transaction (µs/msg)",
         f"{results['spool_us_per_msg_batch100']:.1f}"),
        ("seq, durable write per message (µs)", f"{results['seq_us_durable_each']:.1f}"),
        ("seq, durable write per 1024 (µs per number)", f"{results['seq_us_block']:.2f}"),
        ("publish_frame, caller's cost (µs/call)", f"{results['publish_frame_us']:.1f}"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"medians of {runs} runs, {messages} messages of ~700 bytes per throughput run"]
    lines += [f"{name:<{width}}  {value:>10}" for name, value in rows]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m device.sinks.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", help="HOST:PORT of a broker (default: start mosquitto)")
    parser.add_argument("--messages", type=int, default=5000, help="messages per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    broker: Optional[subprocess.Popen] = None
    if args.broker:
        host, _, port_text = args.broker.rpartition(":")
        host, port = host or "127.0.0.1", int(port_text)
    else:
        broker, port = start_broker()
        host = "127.0.0.1"
        print(f"started mosquitto pid {broker.pid} on 127.0.0.1:{port}", flush=True)
    try:
        results = run_all(host, port, args.messages, args.runs)
    finally:
        if broker is not None:
            broker.terminate()
            broker.wait(timeout=10)
    print(report(results, args.messages, args.runs))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
