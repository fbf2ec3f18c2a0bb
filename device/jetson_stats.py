"""Jetson health readings from sysfs for the stats message: temperatures, GPU load, rail power.

``jetson_readings(root)`` reads the files below ``root`` (``/`` on the device; a fake tree in
tests) and returns only what it found, so a missing sensor is an absent key and a machine that
is not a Jetson (no ``/etc/nv_tegra_release``) gets ``{}`` and no ``jetson`` block at all:

- ``temperatures_c``: ``/sys/devices/virtual/thermal/thermal_zone*/{type,temp}`` (m°C -> °C)
- ``gpu_load_pct``: ``.../gpu.0/load`` or the Orin ``ga10b`` node (per-mille -> %)
- ``power_mw``: INA3221 rails below ``/sys/bus/i2c/drivers/ina3221*/<i2c device>/``, whichever
  interface this L4T has: the iio driver (``iio:deviceN/in_powerN_input`` mW, ``rail_name_N``),
  hwmon ``hwmon/hwmonN/powerN_input`` (µW, ``powerN_label``) or the JetPack 5/6 hwmon driver
  (``inN_input`` mV x ``currN_input`` mA, ``inN_label``).

No tegrastats: it is a separate process that prints text at its own rate; sysfs is what it reads.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Union

TEGRA_RELEASE = "etc/nv_tegra_release"
THERMAL_ZONES = "sys/devices/virtual/thermal/thermal_zone*"
GPU_LOAD_FILES = (
    "sys/devices/platform/gpu.0/load",  # Nano, TX2, Xavier
    "sys/devices/gpu.0/load",
    "sys/devices/platform/bus@0/17000000.gpu/load",  # Orin, JetPack 6
    "sys/devices/17000000.ga10b/load",  # Orin, JetPack 5
    "sys/devices/platform/17000000.ga10b/load",
)
INA3221_DRIVERS = "sys/bus/i2c/drivers/ina3221*"  # ina3221x (iio, L4T 32) or ina3221 (hwmon)
INA3221_FOLDERS = ("*/iio:device*", "*/hwmon/hwmon*")  # below the driver's i2c device entries


def _read_text(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):  # a sensor that is off or busy reads as an error
        return None


def _read_number(path: Path) -> Optional[float]:
    text = _read_text(path)
    try:
        return float(text) if text else None
    except ValueError:
        return None


def temperatures_c(root: Path) -> Dict[str, float]:
    readings: Dict[str, float] = {}
    for zone in sorted(root.glob(THERMAL_ZONES)):
        name = _read_text(zone / "type") or zone.name
        millidegrees = _read_number(zone / "temp")
        if millidegrees is not None and name not in readings:
            readings[name] = round(millidegrees / 1000.0, 1)
    return readings


def gpu_load_pct(root: Path) -> Optional[float]:
    for relative in GPU_LOAD_FILES:
        per_mille = _read_number(root / relative)
        if per_mille is not None:
            return round(per_mille / 10.0, 1)
    return None


def _label(folder: Path, candidates: Iterable[str], fallback: str) -> str:
    for name in candidates:
        text = _read_text(folder / name)
        if text:
            return text
    return fallback


def _channel(path: Path, pattern: str) -> str:
    match = re.fullmatch(pattern, path.name)
    return match.group(1) if match else ""


def _iio_rails(folder: Path) -> Dict[str, float]:
    rails = {}
    for path in folder.glob("in_power*_input"):
        channel = _channel(path, r"in_power(\d+)_input")
        milliwatts = _read_number(path)
        if channel and milliwatts is not None:
            rails[_label(folder, [f"rail_name_{channel}"], f"rail{channel}")] = milliwatts
    return rails


def _hwmon_rails(folder: Path) -> Dict[str, float]:
    rails = {}
    for path in folder.glob("power*_input"):
        channel = _channel(path, r"power(\d+)_input")
        microwatts = _read_number(path)
        if channel and microwatts is not None:
            name = _label(folder, [f"power{channel}_label"], f"power{channel}")
            rails[name] = microwatts / 1000.0
    for path in folder.glob("curr*_input"):  # JetPack 5/6: bus voltage and current per channel
        channel = _channel(path, r"curr(\d+)_input")
        milliamps, millivolts = _read_number(path), _read_number(folder / f"in{channel}_input")
        if channel and milliamps is not None and millivolts is not None:
            name = _label(folder, [f"in{channel}_label", f"curr{channel}_label"], f"in{channel}")
            rails.setdefault(name, millivolts * milliamps / 1000.0)
    return rails


def power_mw(root: Path) -> Dict[str, float]:
    """Milliwatts per INA3221 rail (``VDD_IN``, ``VDD_CPU_GPU_CV``, ...)."""
    rails: Dict[str, float] = {}
    for driver in sorted(root.glob(INA3221_DRIVERS)):
        # Fixed depths: the device entries are symlinks, which a recursive glob would not follow
        # (and sysfs has loops that it must not follow).
        for pattern in INA3221_FOLDERS:
            for folder in sorted(driver.glob(pattern)):
                found = _iio_rails(folder)
                found.update({k: v for k, v in _hwmon_rails(folder).items() if k not in found})
                for name, value in found.items():
                    rails.setdefault(name, round(value, 1))
    return rails


def jetson_readings(root: Union[str, Path] = "/") -> Dict[str, Any]:
    """What this Jetson's sysfs exposes (see the module docstring); ``{}`` elsewhere."""
    root = Path(root)
    if not (root / TEGRA_RELEASE).exists():
        return {}
    readings: Dict[str, Any] = {}
    temperatures = temperatures_c(root)
    if temperatures:
        readings["temperatures_c"] = temperatures
    load = gpu_load_pct(root)
    if load is not None:
        readings["gpu_load_pct"] = load
    rails = power_mw(root)
    if rails:
        readings["power_mw"] = rails
    return readings
