"""TensorRT calibration cache: round trip, header ints, parse errors, device checks."""

from __future__ import annotations

import numpy as np
import pytest

from device import calibcache
from device.calibcache import (
    CalibrationCache,
    check_cache_for_device,
    format_cache,
    parse_cache,
    read_cache,
    trt_version_int,
    write_cache,
)
from device.errors import JetyoloError

NETWORK = ["images", "/model.0/conv/Conv_output_0", "/model.0/act/Mul_output_0", "boxes"]


def make_cache(names=NETWORK, version=100300, algorithm="EntropyCalibration2"):
    return CalibrationCache(version, algorithm, {name: 0.01 for name in names}, "calib.cache")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8.5.2", 8502),  # JetPack 5.1.x
        ("8.5.2.2", 8502),  # tensorrt.__version__ carries a build number
        ("8.6.2", 8602),  # JetPack 6.0
        ("10.3.0", 100300),  # JetPack 6.1/6.2
        ("10.3", 100300),  # patch defaults to 0
        ("10.13.0", 101300),  # two-digit minor
        ("10.13.3.9", 101303),  # JetPack 7.0's TensorRT 10.13.3 writes TRT-101303-...
        ("10.16.1", 101601),
    ],
)
def test_header_version_int(text, expected):
    assert trt_version_int(text) == expected
    major, minor, patch = [*text.split("."), "0"][:3]
    assert calibcache.version_text(expected) == f"{major}.{minor}.{patch}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("11.0.0", "removed in TensorRT 11"),  # implicit INT8 removed: Q/DQ only
        ("11.2", "Q/DQ model"),
        ("7.2.3", "not supported"),  # too old: no set_tensor_address / cache contract
        ("8.4.1", "not supported"),
        ("9.3.0", "not supported"),  # never shipped in JetPack
        ("ten", "MAJOR.MINOR"),
        ("", "MAJOR.MINOR"),
    ],
)
def test_unsupported_versions_are_refused(text, message):
    with pytest.raises(JetyoloError, match=message):
        trt_version_int(text)


@pytest.mark.parametrize("version", [8502, 8602, 100300, 101300, 101601])
def test_version_text_inverts_version_int(version):
    assert trt_version_int(calibcache.version_text(version)) == version


def test_round_trip_gives_back_the_same_scales(tmp_path):
    rng = np.random.default_rng(0)
    ranges = rng.uniform(0, 50, 40)
    amax = {f"/model.{i}/conv/Conv_output_0": float(a) for i, a in enumerate(ranges)}
    amax["images"] = 1.0
    amax["zero: range"] = 0.0  # a name with ': ' and TensorRT's bare "0"
    path = write_cache(tmp_path / "calib.cache", amax, "10.3.0")
    cache = read_cache(path)
    assert cache.header == "TRT-100300-EntropyCalibration2"
    assert list(cache.scales) == list(amax)
    for name, value in amax.items():
        assert cache.scales[name] == np.float32(value / 127.0)
        assert cache.amax(name) == pytest.approx(value, rel=1e-6)
    assert "zero: range: 0\n" in path.read_text()


def test_scales_are_written_verbatim_with_kind_scale():
    text = format_cache({"t": 0.5}, "8.6.2", "MinMaxCalibration", kind="scale")
    assert text == "TRT-8602-MinMaxCalibration\nt: 3f000000\n"


def test_known_tensorrt_line_decodes():
    # 0x3c010a14 is a scale TensorRT wrote for an input in [0, 1] (about 1/127).
    cache = parse_cache("TRT-8502-EntropyCalibration2\nimages: 3c010a14\n")
    assert cache.scales["images"] == pytest.approx(1 / 127, rel=1e-3)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "empty"),
        ({"t": float("nan")}, "finite amax"),
        ({"t": -1.0}, "finite amax"),
        ({"bad\nname": 1.0}, "cannot be written"),
    ],
)
def test_writer_refuses_bad_values(tmp_path, values, message):
    with pytest.raises(JetyoloError, match=message):
        write_cache(tmp_path / "c.cache", values, "10.3.0")
    assert list(tmp_path.iterdir()) == []  # nothing partial on disk


def test_writer_refuses_unknown_algorithm(tmp_path):
    with pytest.raises(JetyoloError, match="EntropyCalibration2"):
        write_cache(tmp_path / "c.cache", {"t": 1.0}, "10.3.0", algorithm="Percentile")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("", ":1: calibration cache is empty"),
        ("TRT-8502\nx: 3c010a14\n", ":1:"),  # header without algorithm
        ("TensorRT cache\n", ":1:"),
        ("TRT-8502-EntropyCalibration2\n", "no tensor lines"),
        ("TRT-8502-EntropyCalibration2\na: 3c010a14\nb 3c010a14\n", ":3:"),  # no ': '
        ("TRT-8502-EntropyCalibration2\na: 3c010a14\n\nb: xyz\n", ":4:"),  # blank line counted
        ("TRT-8502-EntropyCalibration2\na: 123456789\n", ":2:"),  # 9 hex digits
        ("TRT-8502-EntropyCalibration2\na: 7fc00000\n", ":2: scale of 'a' decodes"),  # NaN
        ("TRT-8502-EntropyCalibration2\na: bf800000\n", ":2: scale of 'a'"),  # -1.0
        ("TRT-8502-EntropyCalibration2\na: 1\nb: 2\na: 3\n", ":4: tensor 'a' repeats line 2"),
    ],
)
def test_parse_errors_name_the_line(text, where):
    with pytest.raises(JetyoloError, match=where.replace("(", r"\(")):
        parse_cache(text, "calib.cache")


def test_read_cache_reports_missing_and_binary_files(tmp_path):
    with pytest.raises(JetyoloError, match="cannot read"):
        read_cache(tmp_path / "none.cache")
    binary = tmp_path / "b.cache"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(JetyoloError, match="not text"):
        read_cache(binary)


@pytest.mark.parametrize(
    ("cache", "device", "network", "allowed", "expected"),
    [
        # matching version, algorithm and names: usable
        (make_cache(), "10.3.0", NETWORK, (), []),
        # a build number in the device's version string does not matter
        (make_cache(version=8502), "8.5.2.2", NETWORK, (), []),
        # head tensors left out on purpose are allowed to be missing
        (make_cache(NETWORK[:-1]), "10.3.0", NETWORK, ("boxes",), []),
        # cache for JetPack 5 on a JetPack 6.1 device
        (
            make_cache(version=8502),
            "10.3.0",
            NETWORK,
            (),
            ["TensorRT 8.5.2", "--trt-version 10.3.0"],
        ),
        # cache for 10.3 on JetPack 7.1
        (make_cache(), "10.13.0", NETWORK, (), ["TRT-101300-", "--trt-version 10.13.0"]),
        # unknown algorithm in the header
        (make_cache(algorithm="Percentile"), "10.3.0", NETWORK, (), ["'Percentile'"]),
        # tensors of the network that the cache does not have
        (make_cache(NETWORK[:2]), "10.3.0", NETWORK, (), ["lacks 2", "'boxes'"]),
        # tensors the network does not have (cache of another model)
        (
            make_cache([*NETWORK, "other"]),
            "10.3.0",
            NETWORK,
            (),
            ["1 tensor(s) the network", "'other'"],
        ),
        # a device with TensorRT 11 cannot use a cache at all
        (make_cache(), "11.0.0", NETWORK, (), ["removed in TensorRT 11"]),
    ],
)
def test_check_cache_for_device(cache, device, network, allowed, expected):
    problems = check_cache_for_device(cache, device, network, allowed)
    if not expected:
        assert problems == []
    else:
        joined = " | ".join(problems)
        for fragment in expected:
            assert fragment in joined


def test_entries_for_known_constant_tensors_are_not_foreign():
    cache = make_cache([*NETWORK, "(Unnamed Layer* 3) [Constant]_output", "other"])
    known = ["(Unnamed Layer* 3) [Constant]_output"]
    problems = check_cache_for_device(cache, "10.3.0", NETWORK, known_tensor_names=known)
    assert len(problems) == 1 and "'other'" in problems[0] and "Constant" not in problems[0]


def test_check_lists_many_names_briefly():
    network = [f"t{i:02d}" for i in range(30)]
    problems = check_cache_for_device(make_cache(["t00"]), "10.3.0", network)
    assert len(problems) == 1
    assert "lacks 29" in problems[0] and "(and 21 more)" in problems[0]


def test_header_version_reads_only_the_header(tmp_path):
    path = write_cache(tmp_path / "c.cache", {"t": 1.0}, "8.6.2")
    assert calibcache.header_version(path) == 8602
    (tmp_path / "x.cache").write_text("TRT-100300-Entropy Calibration2\nimages: 3c000000\n")
    with pytest.raises(JetyoloError, match=r"x.cache:1: 'TRT-100300-Entropy Calibration2' is not"):
        calibcache.header_version(tmp_path / "x.cache")  # garbled: named, not invisible
    with pytest.raises(JetyoloError, match=r"cannot read calibration cache .*missing.cache"):
        calibcache.header_version(tmp_path / "missing.cache")
