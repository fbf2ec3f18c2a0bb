"""Jetson sysfs readings against fake sysfs trees laid out as on L4T 32 (iio INA3221) and
JetPack 5/6 (hwmon INA3221), device entries as symlinks like the real /sys/bus; the stats
message that carries them validates against docs/message.schema.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import jsonschema
import pytest

from device.jetson_stats import jetson_readings
from device.message import build_stats_message, encode
from device.sinks import SinkOptions

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "docs/message.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())
SINK_DEPTHS = {"intake": 0, "intake_dropped": 0, "frames_reported": 3, "frames_skipped": 0,
               "per_sink": {"stdout": {"queue": 0, "dropped": 0}}}


def put(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def i2c_device(root: Path, driver: str) -> Path:
    """The INA3221's device folder, reached through the driver's symlink as in real sysfs."""
    device = root / "sys/devices/platform/3160000.i2c/i2c-1/1-0040"
    device.mkdir(parents=True)
    link = root / f"sys/bus/i2c/drivers/{driver}/1-0040"
    link.parent.mkdir(parents=True)
    link.symlink_to(device)
    return device


def jetson_tree(root: Path) -> Path:
    put(root, "etc/nv_tegra_release", "# R35 (release), REVISION: 4.1")
    for index, (name, millidegrees) in enumerate([("CPU-therm", "45500"), ("GPU-therm", "43250"),
                                                  ("Tboard_tegra", "oops")]):
        put(root, f"sys/devices/virtual/thermal/thermal_zone{index}/type", name)
        put(root, f"sys/devices/virtual/thermal/thermal_zone{index}/temp", millidegrees)
    broken = root / "sys/devices/virtual/thermal/thermal_zone3"
    (broken / "temp").mkdir(parents=True)  # reading it fails (EISDIR), like a sensor that is off
    put(root, "sys/devices/virtual/thermal/thermal_zone3/type", "PMIC-Die")
    return root


def test_l4t32_layout_iio_ina3221_and_gpu_load(tmp_path: Path) -> None:
    root = jetson_tree(tmp_path)
    put(root, "sys/devices/gpu.0/load", "372")
    iio = i2c_device(root, "ina3221x") / "iio:device0"
    for channel, (rail, milliwatts) in enumerate([("POM_5V_IN", "4123"), ("POM_5V_GPU", "812")]):
        put(iio, f"rail_name_{channel}", rail)
        put(iio, f"in_power{channel}_input", milliwatts)
    assert jetson_readings(root) == {
        "temperatures_c": {"CPU-therm": 45.5, "GPU-therm": 43.2},  # unreadable zones left out
        "gpu_load_pct": 37.2,
        "power_mw": {"POM_5V_IN": 4123.0, "POM_5V_GPU": 812.0},
    }


def test_jetpack6_layout_hwmon_ina3221_volts_times_amps(tmp_path: Path) -> None:
    root = jetson_tree(tmp_path)
    put(root, "sys/devices/platform/bus@0/17000000.gpu/load", "1000")
    hwmon = i2c_device(root, "ina3221") / "hwmon/hwmon3"
    put(hwmon, "in1_label", "VDD_IN")
    put(hwmon, "in1_input", "5072")  # mV
    put(hwmon, "curr1_input", "1024")  # mA
    put(hwmon, "in4_label", "sum of shunt voltages")  # no current: not a rail
    put(hwmon, "in4_input", "12")
    readings = jetson_readings(root)
    assert readings["gpu_load_pct"] == 100.0
    assert readings["power_mw"] == {"VDD_IN": round(5072 * 1024 / 1000, 1)}


def test_hwmon_power_files_are_microwatts(tmp_path: Path) -> None:
    root = jetson_tree(tmp_path)
    hwmon = i2c_device(root, "ina3221") / "hwmon/hwmon1"
    put(hwmon, "power1_input", "2500000")
    put(hwmon, "power1_label", "VDD_SOC")
    assert jetson_readings(root)["power_mw"] == {"VDD_SOC": 2500.0}


def test_only_what_is_exposed_and_nothing_off_a_jetson(tmp_path: Path) -> None:
    root = jetson_tree(tmp_path)
    assert set(jetson_readings(root)) == {"temperatures_c"}  # no GPU load, no INA3221
    (root / "etc/nv_tegra_release").unlink()
    assert jetson_readings(root) == {}  # thermal zones of a PC are not a Jetson block
    assert jetson_readings(tmp_path / "empty") == {}


def stats_message(tmp_path: Path, **extra: Any) -> Dict[str, Any]:
    root = jetson_tree(tmp_path)
    put(root, "sys/devices/gpu.0/load", "372")
    stats = {"fps": 29.5, "uptime_s": 12.5, "backend": "tensorrt", "precision": "fp16",
             "queues": {"captured": 1, "preprocessed": 0, "inferred": 2},
             "jetson": jetson_readings(root), "sinks": SINK_DEPTHS, **extra}
    options = SinkOptions(class_names=["a"], model_id="m", device_id="jetson-01")
    return json.loads(encode(build_stats_message(stats, 5, options, now=1.7e9)))


def test_stats_message_with_jetson_block_validates(tmp_path: Path) -> None:
    message = stats_message(tmp_path)
    assert message["jetson"]["gpu_load_pct"] == 37.2
    assert list(VALIDATOR.iter_errors(message)) == []


@pytest.mark.parametrize(
    "extra",
    [
        {"jetson": {}},  # an empty block is omitted, never sent
        {"jetson": {"gpu_load_pct": 137.2}},
        {"jetson": {"gpu_temp": 40}},  # unknown reading
        {"precision": "FP16"},
        {"uptime_s": -1},
        {"queues": {"captured": -1}},
    ],
)
def test_schema_rejects_bad_stats_fields(tmp_path: Path, extra: Dict[str, Any]) -> None:
    assert list(VALIDATOR.iter_errors(stats_message(tmp_path, **extra))) != []
