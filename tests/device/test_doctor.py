"""`jetyolo doctor`: runs anywhere, exits 0, and names what is missing with its package."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from device import doctor
from device.cli import main

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_doctor_runs_and_names_missing_tensorrt(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    if HAS_TENSORRT:
        assert "OK       TensorRT (tensorrt)" in out
    else:
        assert "MISSING  TensorRT (tensorrt)" in out
        assert "sudo apt install python3-libnvinfer" in out
        assert "TensorRT backend: not available here" in out


def test_doctor_json_and_strict(capsys):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {check["name"] for check in report["checks"]} >= {"TensorRT (tensorrt)", "pycuda"}
    assert main(["doctor", "--strict"]) == (0 if report["tensorrt_ready"] else 1)


def failing_importer(missing):
    def importer(name):
        if name in missing:
            raise ImportError(f"No module named {name!r}")
        return SimpleNamespace(__version__="1.2.3")

    return importer


@pytest.mark.parametrize(
    ("missing", "dpkg", "status", "fix"),
    [
        # no bindings at all: the apt package
        ({"tensorrt"}, None, "missing", "sudo apt install python3-libnvinfer"),
        # apt package present but the venv cannot see it
        ({"tensorrt"}, "10.3.0.30-1+cuda12.5", "missing", "--system-site-packages"),
        # importable
        (set(), None, "ok", ""),
    ],
)
def test_tensorrt_check(missing, dpkg, status, fix):
    checks = doctor.tensorrt_checks(failing_importer(missing | {"pycuda"}), lambda pkg: dpkg)
    trt = checks[0]
    assert (trt.status, trt.name) == (status, "TensorRT (tensorrt)")
    assert fix in trt.fix
    assert checks[1].status == "missing" and "pip install pycuda" in checks[1].fix


@pytest.mark.parametrize(
    ("release_text", "expected_status", "fragment"),
    [
        ("# R36 (release), REVISION: 4.3, GCID: 1, BOARD: generic\n", "ok", "JetPack 6.1/6.2"),
        ("# R35 (release), REVISION: 5.0\n", "ok", "JetPack 5.1.3"),
        ("# R99 (release), REVISION: 1.0\n", "ok", "JetPack unknown"),
        (None, "info", "not a Jetson"),
    ],
)
def test_jetson_checks(tmp_path, release_text, expected_status, fragment):
    if release_text is not None:
        (tmp_path / "nv_tegra_release").write_text(release_text)
    checks = doctor.jetson_checks(tmp_path, tmp_path, lambda pkg: "36.4.3-20250107")
    assert checks[0].status == expected_status and fragment in checks[0].detail


def test_camera_checks(tmp_path):
    assert doctor.camera_checks(tmp_path)[0].status == "info"
    for name in ("video10", "video0", "video2"):
        (tmp_path / name).write_text("")
    locked = tmp_path / "video2"
    locked.chmod(0)
    checks = doctor.camera_checks(tmp_path)
    assert [check.name for check in checks] == [
        f"camera {tmp_path / n}" for n in ("video0", "video2", "video10")
    ]
    assert checks[0].status == "ok"
    if os.getuid() != 0:  # root can open anything
        assert checks[1].status == "warn" and "usermod -aG video,render" in checks[1].fix


@pytest.mark.parametrize(
    ("gids", "user", "uid", "status", "fix"),
    [
        ([44], "bob", 1000, "ok", ""),  # in the group now
        ([], "bob", 1000, "warn", "usermod -aG video,render"),  # not a member
        ([], "alice", 1000, "warn", "log out and in"),  # added, but this login predates it
        ([], "root", 0, "ok", ""),  # root passes
    ],
)
def test_group_checks(monkeypatch, gids, user, uid, status, fix):
    video = SimpleNamespace(gr_gid=44, gr_mem=["alice"])
    monkeypatch.setattr(doctor.grp, "getgrnam", lambda name: video)
    check = doctor.group_checks(("video",), process_gids=gids, user=user, uid=uid)[0]
    assert check.status == status and fix in check.fix


def test_missing_group_is_information():
    checks = doctor.group_checks(("no-such-group-jetyolo",), process_gids=[], user="x")
    assert checks[0].status == "info"


@pytest.mark.parametrize(
    ("build_info", "status"),
    [
        ("  Video I/O:\n    GStreamer:                   YES (1.20.3)\n", "ok"),
        ("  Video I/O:\n    GStreamer:                   NO\n", "warn"),
        ("no video section at all", "warn"),
    ],
)
def test_opencv_gstreamer_check(build_info, status):
    cv2 = SimpleNamespace(getBuildInformation=lambda: build_info)
    assert doctor.opencv_gstreamer_check(cv2).status == status


@pytest.mark.parametrize(
    ("path", "on_jetson", "status"),
    [
        ("/opt/jetyolo/venv/lib/python3.10/site-packages/cv2/__init__.py", True, "warn"),
        ("/usr/lib/python3/dist-packages/cv2/__init__.py", True, "info"),  # JetPack's
        ("/work/.venv/lib/python3.11/site-packages/cv2/__init__.py", False, "info"),
    ],
)
def test_doctor_says_which_opencv_is_loaded(path, on_jetson, status):
    cv2 = SimpleNamespace(__file__=path, __version__="4.8.0")
    check = doctor.opencv_origin_check(cv2, on_jetson)
    assert check.status == status and "4.8.0 from " + path in check.detail


def test_gpu_nodes(tmp_path):
    assert doctor.gpu_node_checks(tmp_path)[0].status == "info"
    (tmp_path / "nvmap").write_text("")
    (tmp_path / "nvhost-ctrl").write_text("")
    assert doctor.gpu_node_checks(tmp_path)[0].status == "ok"


def test_tensorrt_ready_needs_all_three():
    ok = [doctor.Check(n, "ok", "") for n in ("TensorRT (tensorrt)", "pycuda", "GPU")]
    assert doctor.tensorrt_ready(ok)
    assert not doctor.tensorrt_ready(ok[:2])
    assert not doctor.tensorrt_ready([*ok[:2], doctor.Check("GPU", "missing", "")])


def test_cache_dir_check(tmp_path):
    assert doctor.cache_dir_check(tmp_path / "a" / "b").status == "ok"
    if os.getuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert doctor.cache_dir_check(locked / "x").status == "warn"
    assert isinstance(doctor.cache_dir_check(Path("/")), doctor.Check)
