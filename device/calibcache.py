"""TensorRT's native INT8 calibration cache: written on the host, read and checked on the device.

Format (what TensorRT itself writes from ``IInt8Calibrator.write_calibration_cache``)::

    TRT-<version int>-<Algorithm>
    <tensor name>: <hex>
    ...

``<version int>`` is ``major*1000 + minor*100 + patch`` for TensorRT 8 (8.5.2 -> 8502) and
``major*10000 + minor*100 + patch`` for TensorRT 10 (10.3.0 -> 100300). ``<hex>`` is the bit
pattern of the float32 ``scale = amax / 127`` in big-endian order, without leading zeros (TensorRT
writes ``0`` for a zero scale). Names may contain ``:``, so a line splits on its last ``": "``.

TensorRT silently ignores a cache whose header does not match its own version and algorithm and
then calibrates with whatever data the calibrator gives (on the device: none). So the device checks
the header and the tensor names itself (``check_cache_for_device``) and refuses a foreign cache.
Implicit INT8 (calibration caches) exists in TensorRT 8.5-10.x only; TensorRT 11 takes INT8 from
Q/DQ nodes alone.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Tuple, Union

from device.errors import JetyoloError
from device.files import atomic_write_bytes

ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration")
INT8_QMAX = 127.0
SUPPORTED_RANGE = "8.5-10.x"
_HEADER = re.compile(r"^TRT-(\d+)-([A-Za-z0-9]+)$")
_VERSION = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?(?:\.\d+)*$")
_HEX = re.compile(r"^[0-9a-fA-F]{1,8}$")
LISTED_NAMES = 8  # how many missing/extra tensor names a message lists before "and N more"


def parse_trt_version(text: str) -> Tuple[int, int, int]:
    """``"8.5.2"``, ``"8.5.2.2"`` (``tensorrt.__version__`` on JetPack 5), ``"10.3"`` ->
    (major, minor, patch)."""
    match = _VERSION.match(str(text).strip())
    if not match:
        raise JetyoloError(
            f"TensorRT version {text!r} is not MAJOR.MINOR[.PATCH]; "
            f"pass e.g. --trt-version 10.3.0 (JetPack 6.1/6.2) or 8.5.2 (JetPack 5.1)"
        )
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def check_supported(version: Tuple[int, int, int]) -> None:
    """Refuse TensorRT versions without implicit (calibration-cache) INT8 or not tried here."""
    major, minor, patch = version
    text = f"{major}.{minor}.{patch}"
    if major >= 11:
        raise JetyoloError(
            f"TensorRT {text} has no implicit INT8: calibration caches were removed in "
            "TensorRT 11; use the Q/DQ model instead "
            "(`jetyolo build BUNDLE --precision int8 --int8-from qdq`)"
        )
    if (major, minor) < (8, 5) or major == 9:
        raise JetyoloError(
            f"TensorRT {text} is not supported for calibration caches (supported: "
            f"{SUPPORTED_RANGE}, i.e. JetPack 5.1, 6.x, 7.x); update JetPack or use the FP16 engine"
        )
    if minor > 99 or patch > 99:
        raise JetyoloError(f"TensorRT version {text} does not fit TensorRT's cache header")


def trt_version_int(text: str) -> int:
    """The number TensorRT writes into the cache header: 8.5.2 -> 8502, 10.3.0 -> 100300."""
    version = parse_trt_version(text)
    check_supported(version)
    major, minor, patch = version
    base = 1000 if major < 10 else 10000
    return major * base + minor * 100 + patch


def version_text(version_int: int) -> str:
    """Inverse of ``trt_version_int`` for messages: 8502 -> "8.5.2", 100300 -> "10.3.0"."""
    major = version_int // 10000 if version_int >= 100000 else version_int // 1000
    rest = version_int % 10000 if version_int >= 100000 else version_int % 1000
    return f"{major}.{rest // 100}.{rest % 100}"


def scale_to_hex(scale: float) -> str:
    """float32 bit pattern, big-endian, as TensorRT prints it (lower case, no leading zeros)."""
    (bits,) = struct.unpack(">I", struct.pack(">f", scale))
    return format(bits, "x")


def hex_to_scale(text: str) -> float:
    (scale,) = struct.unpack(">f", struct.pack(">I", int(text, 16)))
    return float(scale)


@dataclass
class CalibrationCache:
    """A parsed cache: header version int, algorithm, and ``scale`` (= amax/127) per tensor."""

    version_int: int
    algorithm: str
    scales: Dict[str, float] = field(default_factory=dict)
    source: str = "<memory>"

    @property
    def trt_version(self) -> str:
        return version_text(self.version_int)

    @property
    def header(self) -> str:
        return f"TRT-{self.version_int}-{self.algorithm}"

    def amax(self, name: str) -> float:
        return self.scales[name] * INT8_QMAX


def format_cache(
    values: Mapping[str, float],
    trt_version: str,
    algorithm: str = "EntropyCalibration2",
    kind: str = "amax",
) -> str:
    """The cache text. ``values`` are per-tensor ``amax`` (``kind="amax"``, scale = amax/127) or
    ready scales (``kind="scale"``); the order of ``values`` is kept."""
    if algorithm not in ALGORITHMS:
        raise JetyoloError(f"calibration algorithm {algorithm!r} is not one of {list(ALGORITHMS)}")
    if kind not in ("amax", "scale"):
        raise ValueError(f"kind must be 'amax' or 'scale', got {kind!r}")
    if not values:
        raise JetyoloError("refusing to write an empty calibration cache (no tensor ranges)")
    lines = [f"TRT-{trt_version_int(trt_version)}-{algorithm}"]
    for name, value in values.items():
        _check_entry(name, value)
        scale = value / INT8_QMAX if kind == "amax" else value
        lines.append(f"{name}: {scale_to_hex(scale)}")
    return "\n".join(lines) + "\n"


def _check_entry(name: str, value: float) -> None:
    if not name or "\n" in name or name != name.strip():
        raise JetyoloError(f"tensor name {name!r} cannot be written to a calibration cache")
    if not math.isfinite(value) or value < 0:
        raise JetyoloError(
            f"tensor {name!r} has range {value!r}; a cache needs a finite amax >= 0 "
            "(re-run calibration with images that reach this tensor)"
        )


def write_cache(
    path: Union[str, Path],
    values: Mapping[str, float],
    trt_version: str,
    algorithm: str = "EntropyCalibration2",
    kind: str = "amax",
) -> Path:
    """Write the cache atomically (temp file + rename); see ``format_cache``."""
    path = Path(path)
    atomic_write_bytes(path, format_cache(values, trt_version, algorithm, kind).encode())
    return path


def parse_cache(text: str, source: str = "<memory>") -> CalibrationCache:
    """Parse cache text; every malformed line is a ``JetyoloError`` naming ``source:line``."""
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise JetyoloError(
            f"{source}:1: calibration cache is empty (expected a TRT-<ver>-<algo> line)"
        )
    header = _HEADER.match(lines[0].strip())
    if not header:
        raise JetyoloError(
            f"{source}:1: {lines[0][:60]!r} is not a TensorRT cache header like "
            "'TRT-100300-EntropyCalibration2'; regenerate it with `jetyolo calibrate`"
        )
    cache = CalibrationCache(int(header.group(1)), header.group(2), {}, source)
    first_line: Dict[str, int] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        name, scale = _parse_line(line, f"{source}:{number}")
        if name in first_line:
            raise JetyoloError(
                f"{source}:{number}: tensor {name!r} repeats line {first_line[name]}; "
                "a cache lists each tensor once"
            )
        first_line[name] = number
        cache.scales[name] = scale
    if not cache.scales:
        raise JetyoloError(f"{source}: calibration cache has a header but no tensor lines")
    return cache


def _parse_line(line: str, where: str) -> Tuple[str, float]:
    name, sep, hex_text = line.rstrip("\r").rpartition(": ")
    if not sep or not name:
        raise JetyoloError(f"{where}: {line[:80]!r} is not '<tensor name>: <hex scale>'")
    if not _HEX.match(hex_text):
        raise JetyoloError(f"{where}: scale {hex_text[:20]!r} of {name!r} is not 1-8 hex digits")
    scale = hex_to_scale(hex_text)
    if not math.isfinite(scale) or scale < 0:
        raise JetyoloError(f"{where}: scale of {name!r} decodes to {scale!r}; expected >= 0")
    return name, scale


def read_cache(path: Union[str, Path]) -> CalibrationCache:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise JetyoloError(f"cannot read calibration cache {path}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JetyoloError(f"{path}: calibration cache is not text ({exc.reason})") from exc
    return parse_cache(text, str(path))


def _listed(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(repr(name) for name in names[:LISTED_NAMES])
    more = len(names) - LISTED_NAMES
    return shown + (f" (and {more} more)" if more > 0 else "")


def check_cache_for_device(
    cache: CalibrationCache,
    device_trt_version: str,
    network_tensor_names: Iterable[str],
    allowed_missing: Iterable[str] = (),
    known_tensor_names: Iterable[str] = (),
) -> List[str]:
    """Problems that make ``cache`` unusable on this device; empty when it can be used.

    ``network_tensor_names`` are the tensors TensorRT calibrates in the parsed network (input and
    float layer outputs); ``allowed_missing`` are the tensors the host left out on purpose (the
    detection head kept in FP16, recorded in the bundle's calibration metadata);
    ``known_tensor_names`` are other tensors of the network (constants, shape tensors) whose
    entries TensorRT ignores, so they are not counted as foreign.
    """
    regenerate = "regenerate it on the host with `jetyolo calibrate BUNDLE --trt-version {}`"
    problems: List[str] = []
    try:
        expected = trt_version_int(device_trt_version)
    except JetyoloError as exc:
        return [str(exc)]
    fix = regenerate.format(version_text(expected))
    if cache.version_int != expected:
        problems.append(
            f"calibration cache {cache.source} is for TensorRT {cache.trt_version} (header "
            f"{cache.header}) but this device runs TensorRT {version_text(expected)} "
            f"(TRT-{expected}-...); TensorRT would ignore it and calibrate on no data: {fix}"
        )
    if cache.algorithm not in ALGORITHMS:
        problems.append(
            f"calibration cache {cache.source} names algorithm {cache.algorithm!r}, not one of "
            f"{list(ALGORITHMS)}: {fix}"
        )
    network = set(network_tensor_names)
    missing = network - set(cache.scales) - set(allowed_missing)
    extra = set(cache.scales) - network - set(known_tensor_names)
    if missing:
        problems.append(
            f"calibration cache {cache.source} lacks {len(missing)} network tensor(s): "
            f"{_listed(missing)}; it was made for another ONNX model: {fix}"
        )
    if extra:
        problems.append(
            f"calibration cache {cache.source} has {len(extra)} tensor(s) the network does not: "
            f"{_listed(extra)}; it was made for another ONNX model: {fix}"
        )
    return problems


def header_version(path: Union[str, Path]) -> int:
    """The header version int of a cache file (cheap: reads one line, for picking the right
    cache among several in a bundle); a file without a TensorRT header is one error naming it."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            first = handle.readline().strip()
    except OSError as exc:
        raise JetyoloError(f"cannot read calibration cache {path}: {exc.strerror or exc}") from exc
    match = _HEADER.match(first)
    if not match:
        raise JetyoloError(
            f"{path}:1: {first[:60]!r} is not a TensorRT cache header like "
            "'TRT-100300-EntropyCalibration2'; regenerate the cache with `jetyolo calibrate`"
        )
    return int(match.group(1))
