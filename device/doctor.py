"""Check this machine for running jetyolo: TensorRT, CUDA, pycuda, GPU, JetPack/L4T, cameras,
device permissions and Python packages; for each missing piece, the package that provides it.

Exits 0 and reports (also on machines without a GPU); with --strict it exits 1 when TensorRT
cannot be used, so scripts can gate on it.
"""

from __future__ import annotations

import argparse
import grp
import importlib
import json
import os
import platform
import pwd
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence

from device.engine_cache import default_cache_dir
from device.l4t import jetpack_for_l4t, parse_nv_tegra_release, read_l4t_release

OK, WARN, MISSING, INFO = "ok", "warn", "missing", "info"
APT_TENSORRT = "sudo apt install python3-libnvinfer (from nvidia-jetpack)"
VENV_HINT = "make the venv with `python3 -m venv --system-site-packages` to see JetPack's modules"
PYCUDA_FIX = (
    "export PATH=/usr/local/cuda/bin:$PATH CPATH=/usr/local/cuda/include; "
    "sudo apt install python3-dev; pip install pycuda"
)
GROUP_FIX = "sudo usermod -aG video,render $USER, then log out and in"


@dataclass
class Check:
    name: str
    status: str  # ok | warn | missing | info
    detail: str
    fix: str = ""


def _version(module: object) -> str:
    return str(getattr(module, "__version__", getattr(module, "VERSION_TEXT", "?")))


def _import(name: str) -> object:
    return importlib.import_module(name)


def check_module(
    label: str, module: str, fix: str, status_if_missing: str = MISSING,
    importer: Callable[[str], object] = _import,
) -> Check:
    try:
        return Check(label, OK, _version(importer(module)))
    except Exception as exc:  # ImportError, or a broken install raising OSError at import
        return Check(label, status_if_missing, f"not importable ({exc})", fix)


def dpkg_version(package: str) -> Optional[str]:
    try:
        done = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def jetson_checks(etc: Path = Path("/etc"), proc: Path = Path("/proc"),
                  dpkg: Callable[[str], Optional[str]] = dpkg_version) -> List[Check]:
    try:
        release = parse_nv_tegra_release((etc / "nv_tegra_release").read_text(errors="replace"))
    except OSError:
        release = None
    if release is None:
        return [Check("Jetson / L4T", INFO, "not a Jetson (no /etc/nv_tegra_release)")]
    jetpack = jetpack_for_l4t(release)
    detail = f"L4T {release}" + (f", JetPack {jetpack}" if jetpack else ", JetPack unknown")
    try:
        model = (proc / "device-tree" / "model").read_text(errors="replace").strip("\x00\n ")
        detail += f", {model}"
    except OSError:
        pass
    checks = [Check("Jetson / L4T", OK, detail)]
    core = dpkg("nvidia-l4t-core")
    checks.append(Check("nvidia-l4t-core", OK if core else WARN, core or "not in dpkg",
                        "" if core else "flash or upgrade with NVIDIA's L4T packages"))
    return checks


def tensorrt_checks(
    importer: Callable[[str], object] = _import,
    dpkg: Callable[[str], Optional[str]] = dpkg_version,
) -> List[Check]:
    trt = check_module("TensorRT (tensorrt)", "tensorrt", APT_TENSORRT, importer=importer)
    if trt.status != OK and dpkg("python3-libnvinfer"):
        trt.fix = f"python3-libnvinfer is installed for the system Python: {VENV_HINT}"
    checks = [trt]
    pycuda = check_module("pycuda", "pycuda", PYCUDA_FIX, importer=importer)
    checks.append(pycuda)
    if pycuda.status == OK:
        checks += cuda_device_checks(importer)
    return checks


def cuda_device_checks(importer: Callable[[str], object] = _import) -> List[Check]:
    try:
        cuda = importer("pycuda.driver")
        cuda.init()  # type: ignore[attr-defined]
        driver = cuda.get_driver_version()  # type: ignore[attr-defined]
        compiled = ".".join(str(part) for part in cuda.get_version())  # type: ignore[attr-defined]
        device = cuda.Device(0)  # type: ignore[attr-defined]
        major, minor = device.compute_capability()
        memory = device.total_memory() // (1 << 20)
    except Exception as exc:
        return [Check("CUDA device", MISSING, f"CUDA cannot start ({exc})",
                      "check the NVIDIA driver and device permissions (below)")]
    return [
        Check("CUDA driver", OK, f"{driver // 1000}.{driver % 1000 // 10} (pycuda built for "
                                 f"CUDA {compiled})"),
        Check("GPU", OK, f"{device.name()}, compute capability {major}.{minor}, {memory} MiB"),
    ]


def cuda_toolkit_check(root: Path = Path("/usr/local/cuda")) -> Check:
    version_file = root / "version.json"
    if version_file.is_file():
        try:
            version = json.loads(version_file.read_text())["cuda"]["version"]
            return Check("CUDA toolkit", OK, f"{version} at {root}")
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if (root / "bin" / "nvcc").is_file():
        return Check("CUDA toolkit", OK, f"nvcc at {root}/bin")
    return Check("CUDA toolkit", WARN, f"not found at {root} (needed to build pycuda)",
                 "sudo apt install nvidia-jetpack (or cuda-toolkit-<version>)")


def camera_checks(dev: Path = Path("/dev")) -> List[Check]:
    cameras = sorted(dev.glob("video*"), key=lambda path: (len(path.name), path.name))
    if not cameras:
        return [Check("cameras", INFO, f"no {dev}/video* devices (CSI cameras use csi://N)")]
    checks = []
    for camera in cameras:
        usable = os.access(camera, os.R_OK | os.W_OK)
        checks.append(Check(f"camera {camera}", OK if usable else WARN,
                            "readable" if usable else "no read/write permission",
                            "" if usable else GROUP_FIX))
    return checks


def group_checks(
    groups: Sequence[str] = ("video", "render"),
    process_gids: Optional[Iterable[int]] = None,
    user: Optional[str] = None,
    uid: Optional[int] = None,
) -> List[Check]:
    gids = set(os.getgroups() if process_gids is None else process_gids)
    uid = os.getuid() if uid is None else uid
    user = user or pwd.getpwuid(uid).pw_name
    checks = []
    for name in groups:
        try:
            group = grp.getgrnam(name)
        except KeyError:
            checks.append(Check(f"group {name}", INFO, "does not exist on this system"))
            continue
        if uid == 0 or group.gr_gid in gids:
            checks.append(Check(f"group {name}", OK, f"{user} is a member"))
        elif user in group.gr_mem:
            checks.append(Check(f"group {name}", WARN, f"{user} was added but this login predates "
                                "it", "log out and in again (or `newgrp " + name + "`)"))
        else:
            checks.append(Check(f"group {name}", WARN, f"{user} is not a member", GROUP_FIX))
    return checks


def gpu_node_checks(dev: Path = Path("/dev")) -> List[Check]:
    nodes = [dev / "nvmap", *sorted(dev.glob("nvhost-*"))[:6]]
    nodes += sorted(dev.glob("nvgpu/igpu0/*"))[:2]
    present = [node for node in nodes if node.exists()]
    if not present:
        return [Check("Jetson GPU nodes", INFO, f"no {dev}/nvmap or {dev}/nvhost-* (not a Jetson)")]
    blocked = [str(node) for node in present if not os.access(node, os.R_OK | os.W_OK)]
    if blocked:
        return [Check("Jetson GPU nodes", WARN, f"no read/write access to {', '.join(blocked)}",
                      GROUP_FIX + "; services: DeviceAllow= these nodes (see systemd/)")]
    return [Check("Jetson GPU nodes", OK, f"{len(present)} node(s) accessible")]


def package_checks(importer: Callable[[str], object] = _import) -> List[Check]:
    checks = [
        check_module("numpy", "numpy", "pip install numpy", importer=importer),
        check_module("onnxruntime (CPU backend)", "onnxruntime", "pip install onnxruntime",
                     status_if_missing=WARN, importer=importer),
        check_module("paho-mqtt (mqtt:// sink)", "paho.mqtt", "pip install 'paho-mqtt>=2'",
                     status_if_missing=WARN, importer=importer),
        check_module("PyYAML (--config)", "yaml", "pip install pyyaml", importer=importer),
    ]
    opencv = check_module("OpenCV (cv2)", "cv2", "sudo apt install python3-opencv "
                          "(JetPack's build has GStreamer) or pip install opencv-python-headless",
                          importer=importer)
    checks.append(opencv)
    if opencv.status == OK:
        cv2 = importer("cv2")
        checks += [opencv_origin_check(cv2), opencv_gstreamer_check(cv2)]
    return checks


def opencv_origin_check(cv2: object, on_jetson: Optional[bool] = None) -> Check:
    """Which OpenCV is loaded: a pip wheel on a Jetson shadows JetPack's (the one with
    GStreamer) when it sits in the venv."""
    where = str(getattr(cv2, "__file__", "?"))
    version = str(getattr(cv2, "__version__", "?"))
    on_jetson = read_l4t_release() is not None if on_jetson is None else on_jetson
    wheel = "site-packages" in where and not where.startswith("/usr/lib/python3/")
    if on_jetson and wheel:
        return Check("OpenCV loaded", WARN, f"{version} from {where}: a pip wheel, which hides "
                     "JetPack's OpenCV", "pip uninstall opencv-python-headless opencv-python "
                     "in this venv (JetPack's python3-opencv, with GStreamer, is then used)")
    return Check("OpenCV loaded", INFO, f"{version} from {where}")


def opencv_gstreamer_check(cv2: object) -> Check:
    info = cv2.getBuildInformation()  # type: ignore[attr-defined]
    match = re.search(r"GStreamer:\s*(\S+)", info)
    if match and match.group(1).upper().startswith("YES"):
        return Check("OpenCV GStreamer", OK, "yes (csi://, rtsp://, pipelines)")
    return Check("OpenCV GStreamer", WARN, "OpenCV was built without GStreamer: csi:// and "
                 "GStreamer pipelines will not open", "use JetPack's python3-opencv "
                 "(venv --system-site-packages) instead of the pip wheel")


def cache_dir_check(path: Optional[Path] = None) -> Check:
    path = path or default_cache_dir()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if os.access(probe, os.W_OK):
        return Check("engine cache", OK, f"{path} (writable)")
    return Check("engine cache", WARN, f"{path} is not writable",
                 "pass --cache-dir or set JETYOLO_ENGINE_CACHE")


def collect() -> List[Check]:
    checks = [Check("Python", INFO, f"{platform.python_version()} on {platform.machine()}, "
                    f"{sys.executable}")]
    checks += jetson_checks()
    checks += tensorrt_checks()
    checks.append(cuda_toolkit_check())
    checks += camera_checks()
    checks += group_checks()
    checks += gpu_node_checks()
    checks += package_checks()
    checks.append(cache_dir_check())
    return checks


def tensorrt_ready(checks: Sequence[Check]) -> bool:
    names = {"TensorRT (tensorrt)", "pycuda", "GPU"}
    return all(any(c.name == n and c.status == OK for c in checks) for n in names)


def render(checks: Sequence[Check]) -> List[str]:
    width = max(len(check.name) for check in checks)
    lines = []
    for check in checks:
        lines.append(f"{check.status.upper():8} {check.name:{width}}  {check.detail}")
        if check.fix and check.status in (MISSING, WARN):
            lines.append(f"{'':8} {'':{width}}  fix: {check.fix}")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when TensorRT, pycuda or the GPU is not usable")


def run(args: argparse.Namespace) -> int:
    checks = collect()
    ready = tensorrt_ready(checks)
    if args.json:
        print(json.dumps({"tensorrt_ready": ready, "checks": [asdict(c) for c in checks]},
                         indent=2))
    else:
        print("\n".join(render(checks)))
        print("TensorRT backend: " + ("ready" if ready else
              "not available here; `jetyolo run --backend auto` uses ONNX Runtime on the CPU"))
    return 1 if args.strict and not ready else 0
