"""Jetson Linux (L4T) facts for the engine key and `jetyolo doctor`: the L4T release from
``/etc/nv_tegra_release``, the JetPack it belongs to, and the memory the GPU may use (a Jetson's
GPU allocates from system RAM). Readings of sensors are in ``device.jetson_stats``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Tuple

from device.errors import JetyoloError

NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")
# L4T major.minor -> JetPack (NOTES.md table; informational, shown by `jetyolo doctor`).
JETPACK_FOR_L4T = {
    (35, 2): "5.1",
    (35, 3): "5.1.1",
    (35, 4): "5.1.2",
    (35, 5): "5.1.3",
    (35, 6): "5.1.4",
    (36, 2): "6.0 DP",
    (36, 3): "6.0",
    (36, 4): "6.1/6.2",
    (38, 2): "7.0",
    (38, 4): "7.1",
    (39, 2): "7.2",
}
_TEGRA = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([0-9.]+)")


def parse_nv_tegra_release(text: str) -> Optional[str]:
    """``# R36 (release), REVISION: 4.0, GCID: ...`` -> ``"R36.4.0"``; None when not L4T."""
    match = _TEGRA.search(text)
    return f"R{match.group(1)}.{match.group(2)}" if match else None


def read_l4t_release(path: Path = NV_TEGRA_RELEASE) -> Optional[str]:
    try:
        return parse_nv_tegra_release(path.read_text(errors="replace"))
    except OSError:
        return None


def jetpack_for_l4t(release: Optional[str]) -> Optional[str]:
    """``"R36.4.0"`` -> ``"6.1/6.2"``; None for unknown releases."""
    match = re.match(r"R(\d+)\.(\d+)", release or "")
    if not match:
        return None
    return JETPACK_FOR_L4T.get((int(match.group(1)), int(match.group(2))))


def parse_meminfo(text: str) -> Tuple[int, int]:
    """``/proc/meminfo`` -> (MemAvailable, MemTotal) in bytes. On a Jetson the GPU allocates from
    this same RAM, so it is what the builder can use."""
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[name.strip()] = int(parts[0]) * 1024
    if "MemAvailable" not in values or "MemTotal" not in values:
        raise JetyoloError("/proc/meminfo has no MemAvailable/MemTotal; pass --workspace MiB")
    return values["MemAvailable"], values["MemTotal"]
