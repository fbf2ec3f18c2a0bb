"""`jetyolo service install`: the staged tree, idempotence, dry runs, refusals, the units
checked by systemd-analyze (verify + security score), the first-boot venv script run for real,
and the service's ExecStart run with the staged config."""

from __future__ import annotations

import ensurepip
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from device.bundle import write_new_bundle
from device.cli import main
from host import service

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
EXPOSURE_LIMIT = 3.0  # the bar; the goal is <= 2.5
UNIT_DIR = "etc/systemd/system"


def systemd_version() -> int:
    if SYSTEMD_ANALYZE is None:
        return 0
    out = subprocess.run([SYSTEMD_ANALYZE, "--version"], capture_output=True, text=True).stdout
    match = re.match(r"systemd (\d+)", out)
    return int(match.group(1)) if match else 0


needs_systemd_analyze = pytest.mark.skipif(
    systemd_version() < 250,
    reason="systemd-analyze >= 250 is needed (--offline security); `make install` installs it",
)


# --- Fixtures ---------------------------------------------------------------------------


def fake_wheel(folder: Path, name: str, version: str = "1.0") -> Path:
    """A minimal, installable pure-Python wheel."""
    module = name.replace("-", "_")
    path = folder / f"{module}-{version}-py3-none-any.whl"
    info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": f"VERSION = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
        archive.writestr(f"{info}/RECORD", "".join(f"{m},,\n" for m in [*files, f"{info}/RECORD"]))
    return path


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An offline wheelhouse: pip (from ensurepip's bundled wheel), one tiny dependency and a
    requirements.txt naming it. The real one (`pip download` for aarch64) needs the network."""
    folder = tmp_path_factory.mktemp("wheelhouse")
    bundled = sorted((Path(ensurepip.__file__).parent / "_bundled").glob("pip-*.whl"))
    if not bundled:
        pytest.skip("this Python has no bundled pip wheel (ensurepip/_bundled)")
    shutil.copy(bundled[-1], folder)
    fake_wheel(folder, "jetyolo-fake-dep")
    (folder / "requirements.txt").write_text("# test wheelhouse\njetyolo-fake-dep\n")
    return folder


@pytest.fixture(scope="module")
def project_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The jetyolo wheel, built once for the module by the real code path."""
    out = tmp_path_factory.mktemp("dist")
    return service.build_project_wheel(service.project_root(), out / "dist")


@pytest.fixture()
def cached_wheel(monkeypatch: pytest.MonkeyPatch, project_wheel: Path) -> None:
    """Stage the module's wheel instead of building it again (tests about other things)."""

    def copy(source: Path, out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(project_wheel, out))

    monkeypatch.setattr(service, "build_project_wheel", copy)


@pytest.fixture()
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "usr").mkdir()
    return root


@pytest.fixture()
def small_bundle(tmp_path: Path) -> Path:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not really onnx, staging only copies it")
    manifest = {
        "schema_version": 1, "name": "tiny", "class_names": ["a"],
        "preprocess": {"size": [32, 32]}, "postprocess": {"conf": 0.25},
        "variants": {"fp32": {"file": "model.onnx", "input": {}, "outputs": {}}},
    }
    return write_new_bundle(tmp_path / "tiny", {"model.onnx": model}, manifest).root


def install(*args: object) -> int:
    return main(["service", "install", *map(str, args)])


def tree(root: Path) -> Dict[str, str]:
    """Every file and symlink below ``root`` -> sha256 or link target."""
    result = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            result[key] = "-> " + os.readlink(path)
        elif path.is_file():
            result[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def changed_lines(out: str) -> List[str]:
    return [line for line in out.splitlines()
            if re.match(r"\s+(create|update|remove|run)\s", line)]


# --- Staging ----------------------------------------------------------------------------


def test_stage_tree_symlinks_and_modes(
    rootfs: Path, small_bundle: Path, wheelhouse: Path, capsys: pytest.CaptureFixture
) -> None:
    assert install("--rootfs", rootfs, "--bundle", small_bundle, "--wheelhouse", wheelhouse) == 0
    out = capsys.readouterr().out
    for unit in service.UNITS:
        assert (rootfs / UNIT_DIR / unit).read_bytes() == (
            service.REPO / "systemd" / unit).read_bytes()
    # Enabled the way `systemctl --root enable` does it: an absolute link in the .wants folder.
    link = rootfs / UNIT_DIR / "multi-user.target.wants" / "jetyolo.service"
    assert os.readlink(link) == "/etc/systemd/system/jetyolo.service"
    assert sorted(p.name for p in (rootfs / UNIT_DIR / "multi-user.target.wants").iterdir()) == [
        "jetyolo.service"]  # build and venv units are pulled in by Requires=
    assert (rootfs / "usr/lib/sysusers.d/jetyolo.conf").is_file()
    assert (rootfs / "usr/lib/tmpfiles.d/jetyolo.conf").is_file()
    setup = rootfs / "opt/jetyolo/libexec/jetyolo-venv-setup"
    assert setup.stat().st_mode & 0o777 == 0o755
    config = rootfs / "etc/jetyolo/config.yaml"
    assert config.stat().st_mode & 0o777 == 0o640
    assert "bundle: /opt/jetyolo/bundles/tiny\n" in config.read_text()
    staged_bundle = rootfs / "opt/jetyolo/bundles/tiny"
    assert tree(staged_bundle) == tree(small_bundle)
    wheels = sorted(p.name for p in (rootfs / "opt/jetyolo/wheelhouse").iterdir())
    assert [w for w in wheels if w.startswith("jetyolo-")] == ["jetyolo-0.1.0-py3-none-any.whl"]
    assert "jetyolo_fake_dep-1.0-py3-none-any.whl" in wheels and "requirements.txt" in wheels
    constraints = (rootfs / "opt/jetyolo/wheelhouse/constraints.txt").read_text()
    assert constraints == "jetyolo-fake-dep==1.0\n"  # every dependency wheel pinned, not pip
    assert any(w.startswith("pip-") for w in wheels)
    if shutil.which("systemd-sysusers"):
        passwd = (rootfs / "etc/passwd").read_text()
        assert re.search(r"^jetyolo:x:\d+:\d+:[^:]*:/var/lib/jetyolo:", passwd, re.MULTILINE)
        groups = dict(line.split(":", 1) for line in (rootfs / "etc/group").read_text().split())
        assert groups["video"].endswith(":jetyolo") and groups["render"].endswith(":jetyolo")
    assert "run       user jetyolo" in out or not shutil.which("systemd-sysusers")


@pytest.mark.usefixtures("cached_wheel")
def test_dry_run_writes_nothing_and_a_second_install_changes_nothing(
    rootfs: Path, small_bundle: Path, wheelhouse: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["--rootfs", rootfs, "--bundle", small_bundle, "--wheelhouse", wheelhouse]
    before = tree(rootfs)
    assert install(*args, "--dry-run") == 0
    planned = changed_lines(capsys.readouterr().out)
    assert tree(rootfs) == before, "--dry-run wrote into the rootfs"
    assert any("/etc/systemd/system/jetyolo.service" in line for line in planned)

    assert install(*args) == 0
    assert changed_lines(capsys.readouterr().out) == planned  # the dry run listed every change
    staged = tree(rootfs)
    assert install(*args) == 0
    assert changed_lines(capsys.readouterr().out) == []
    assert tree(rootfs) == staged

    # A hand-edited unit and a stray file in the bundle are reported, then repaired.
    unit = rootfs / UNIT_DIR / "jetyolo.service"
    unit.write_text(unit.read_text() + "# edited\n")
    (rootfs / "opt/jetyolo/bundles/tiny/stale.onnx").write_bytes(b"old")
    assert install(*args, "--dry-run") == 0
    assert changed_lines(capsys.readouterr().out) == [
        "  update    /etc/systemd/system/jetyolo.service  (" + service.describe(
            service.Entry("x", source=service.REPO / "systemd/jetyolo.service")) + ")",
        "  remove    /opt/jetyolo/bundles/tiny/stale.onnx  (no longer staged)",
    ]
    assert install(*args) == 0
    assert tree(rootfs) == staged


@pytest.mark.usefixtures("cached_wheel")
def test_refuses_a_folder_that_is_not_a_rootfs_unless_forced(
    tmp_path: Path, small_bundle: Path, wheelhouse: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "not-a-rootfs"
    folder.mkdir()
    assert install("--rootfs", folder, "--bundle", small_bundle, "--wheelhouse", wheelhouse) == 2
    assert "does not look like a root filesystem" in capsys.readouterr().err
    assert list(folder.iterdir()) == []
    assert install("--rootfs", folder, "--bundle", small_bundle, "--wheelhouse", wheelhouse,
                   "--force", "--dry-run") == 0


@pytest.mark.usefixtures("cached_wheel")
def test_existing_config_is_kept_and_follows_a_new_bundle(
    rootfs: Path, small_bundle: Path, wheelhouse: Path, capsys: pytest.CaptureFixture
) -> None:
    config = rootfs / "etc/jetyolo/config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("# my camera\nbundle: /opt/jetyolo/bundles/old\nsource: rtsp://cam/1\n"
                      "sinks: [stdout]\n")
    assert install("--rootfs", rootfs, "--wheelhouse", wheelhouse) == 0  # no --bundle: kept
    assert config.read_text().startswith("# my camera\nbundle: /opt/jetyolo/bundles/old\n")
    assert install("--rootfs", rootfs, "--bundle", small_bundle, "--wheelhouse", wheelhouse) == 0
    assert config.read_text() == ("# my camera\nbundle: /opt/jetyolo/bundles/tiny\n"
                                  "source: rtsp://cam/1\nsinks: [stdout]\n")
    capsys.readouterr()


@pytest.mark.usefixtures("cached_wheel")
@pytest.mark.parametrize(
    ("config_text", "message"),
    [
        # a typo in a key, caught by the device's own config checks
        ("bundle: /opt/jetyolo/bundles/tiny\nsource: /dev/video0\nsinkz: [stdout]\n",
         "did you mean 'sinks'"),
        # a sink URL the device would refuse at first boot
        ("bundle: /opt/jetyolo/bundles/tiny\nsource: /dev/video0\nsinks: ['mqtt://']\n",
         "bad --sink"),
        # the config runs another bundle than the one being staged
        ("bundle: /data/other\nsource: /dev/video0\nsinks: [stdout]\n",
         "but --bundle is staged at /opt/jetyolo/bundles/tiny"),
    ],
)
def test_bad_configs_are_refused_before_anything_is_written(
    rootfs: Path, small_bundle: Path, wheelhouse: Path, tmp_path: Path, config_text: str,
    message: str, capsys: pytest.CaptureFixture,
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(config_text)
    code = install("--rootfs", rootfs, "--bundle", small_bundle, "--config", config,
                   "--wheelhouse", wheelhouse)
    assert code == 2
    assert message in capsys.readouterr().err
    assert tree(rootfs) == {}


@pytest.mark.usefixtures("cached_wheel")
def test_a_read_only_rootfs_gets_one_line_not_a_traceback(
    rootfs: Path, small_bundle: Path, wheelhouse: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    def refuse(root: Path, entry: service.Entry) -> None:
        raise PermissionError(13, "Permission denied", str(root / entry.path.lstrip("/")))

    monkeypatch.setattr(service, "write_entry", refuse)  # as a non-root user on an L4T rootfs
    assert install("--rootfs", rootfs, "--bundle", small_bundle, "--wheelhouse", wheelhouse) == 2
    assert "permission denied; an L4T rootfs belongs to root, run this with sudo" in (
        capsys.readouterr().err)


def test_a_config_with_relative_paths_matches_the_staged_bundle(rootfs: Path) -> None:
    # Relative to /etc/jetyolo on the device, like device.config resolves them.
    service.check_config("bundle: ../../opt/jetyolo/bundles/tiny\nsource: /dev/video0\n"
                         "sinks: [stdout]\n", "c.yaml", "/opt/jetyolo/bundles/tiny")


@pytest.mark.usefixtures("cached_wheel")
def test_an_incomplete_wheelhouse_is_refused(
    rootfs: Path, small_bundle: Path, tmp_path: Path, wheelhouse: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(wheelhouse, partial)
    (partial / "requirements.txt").write_text("jetyolo-fake-dep\nnumpy\n")
    assert install("--rootfs", rootfs, "--bundle", small_bundle, "--wheelhouse", partial) == 2
    assert "no wheel for numpy" in capsys.readouterr().err
    for pip_wheel in partial.glob("pip-*.whl"):
        pip_wheel.unlink()
    (partial / "requirements.txt").write_text("jetyolo-fake-dep\n")
    assert install("--rootfs", rootfs, "--bundle", small_bundle, "--wheelhouse", partial) == 2
    assert "no wheel for pip" in capsys.readouterr().err


@pytest.mark.usefixtures("cached_wheel")
def test_an_extra_wheel_is_staged_and_required(
    rootfs: Path, small_bundle: Path, wheelhouse: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    # e.g. a pycuda wheel built on a Jetson: PyPI has only its sdist.
    extra = fake_wheel(tmp_path, "pycuda", "2024.1.2")
    assert install("--rootfs", rootfs, "--bundle", small_bundle, "--wheelhouse", wheelhouse,
                   "--extra-wheel", extra) == 0
    staged = rootfs / "opt/jetyolo/wheelhouse"
    assert (staged / extra.name).read_bytes() == extra.read_bytes()
    assert (staged / "requirements.txt").read_text() == "jetyolo-fake-dep\npycuda\n"
    assert "pycuda==2024.1.2" in (staged / "constraints.txt").read_text()
    assert install("--rootfs", rootfs, "--bundle", small_bundle, "--wheelhouse", wheelhouse,
                   "--extra-wheel", tmp_path / "missing.whl") == 2
    assert "missing.whl does not exist" in capsys.readouterr().err


def test_unit_settings_keep_repeated_keys() -> None:
    text = "[Unit]\nA=x\n[Service]\nEnvironment=A=1 B=2\n# Environment=C=3\nEnvironment=D=4\n" \
           "DeviceAllow=/dev/x rw\nDeviceAllow=\nDeviceAllow=/dev/y rw\n[Install]\nWantedBy=a b\n"
    settings = service.unit_settings(text, "Service")
    assert settings == {"Environment": ["A=1 B=2", "D=4"], "DeviceAllow": ["/dev/y rw"]}
    assert service.unit_settings(text, "Install") == {"WantedBy": ["a b"]}


def test_device_requirements_of_the_project_wheel(project_wheel: Path) -> None:
    requirements = service.device_requirements(project_wheel, "3.10", [])
    names = {re.split(r"[<>=!~ ]", line)[0] for line in requirements}
    assert {"numpy", "pyyaml", "paho-mqtt", "onnxruntime"} <= names
    # JetPack's OpenCV (GStreamer) must win on the Jetson: no pip wheel to shadow it
    assert not names & {"torch", "ultralytics", "onnx-graphsurgeon", "pytest",
                        "opencv-python-headless", "opencv-python"}
    without_ort = service.device_requirements(project_wheel, "3.10", ["ONNXRuntime"])
    assert "onnxruntime" not in " ".join(without_ort)
    with pytest.raises(service.JetyoloError, match="not a device requirement"):
        service.device_requirements(project_wheel, "3.10", ["torch"])


def test_the_project_wheel_is_reproducible(tmp_path: Path) -> None:
    # Same sources, same bytes: a re-run of `service install` leaves the staged wheel alone.
    first = service.build_project_wheel(service.project_root(), tmp_path / "one")
    second = service.build_project_wheel(service.project_root(), tmp_path / "two")
    assert first.read_bytes() == second.read_bytes()


def test_staging_never_follows_a_symlink_out_of_the_rootfs(rootfs: Path, tmp_path: Path) -> None:
    outside = tmp_path / "host-opt"
    outside.mkdir()
    (rootfs / "opt").symlink_to(outside)  # an absolute link: would write onto the host
    with pytest.raises(service.JetyoloError, match="resolves outside --rootfs"):
        service.inside(rootfs.resolve(), "/opt/jetyolo/wheelhouse/x.whl")


@pytest.mark.usefixtures("cached_wheel")
@pytest.mark.parametrize("name", ["../../../../etc/cron.d/x", "/etc/cron.d/x"])
def test_a_bundle_entry_outside_the_bundle_is_never_staged(
    rootfs: Path, small_bundle: Path, wheelhouse: Path, name: str,
    capsys: pytest.CaptureFixture,
) -> None:
    manifest_path = small_bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    payload = rootfs / "payload"
    payload.write_text("* * * * * root touch /pwned\n")
    manifest["files"][name] = {"sha256": hashlib.sha256(payload.read_bytes()).hexdigest(),
                               "size": payload.stat().st_size}
    manifest_path.write_text(json.dumps(manifest))
    before = tree(rootfs)
    assert install("--rootfs", rootfs, "--bundle", small_bundle, "--wheelhouse", wheelhouse) == 2
    assert "it could lead outside the bundle" in capsys.readouterr().err
    assert tree(rootfs) == before


@pytest.mark.usefixtures("cached_wheel")
def test_a_symlink_in_the_bundle_is_never_staged(
    rootfs: Path, small_bundle: Path, wheelhouse: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes((small_bundle / "model.onnx").read_bytes())  # hashes still match
    (small_bundle / "model.onnx").unlink()
    (small_bundle / "model.onnx").symlink_to(secret)
    before = tree(rootfs)
    assert install("--rootfs", rootfs, "--bundle", small_bundle, "--wheelhouse", wheelhouse) == 2
    assert "model.onnx is a symbolic link" in capsys.readouterr().err
    assert tree(rootfs) == before


# --- systemd-analyze --------------------------------------------------------------------


def staged_for_analysis(rootfs: Path, small_bundle: Path, wheelhouse: Path) -> Path:
    """A staged rootfs plus what systemd-analyze needs of a real one: systemd's own units and
    executables at the units' command paths (the venv exists only after first boot)."""
    assert install("--rootfs", rootfs, "--bundle", small_bundle, "--wheelhouse", wheelhouse) == 0
    shutil.copytree("/usr/lib/systemd/system", rootfs / "usr/lib/systemd/system", symlinks=True)
    for command in ("opt/jetyolo/venv/bin/jetyolo", "usr/bin/systemd-sysusers",
                    "usr/bin/systemd-tmpfiles"):
        stub = rootfs / command
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    return rootfs


def analyze(*args: object) -> subprocess.CompletedProcess:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run([SYSTEMD_ANALYZE, *map(str, args)], capture_output=True, text=True)


@needs_systemd_analyze
@pytest.mark.usefixtures("cached_wheel")
def test_systemd_analyze_verify_passes_on_the_staged_units(
    rootfs: Path, small_bundle: Path, wheelhouse: Path, capsys: pytest.CaptureFixture
) -> None:
    root = staged_for_analysis(rootfs, small_bundle, wheelhouse)
    done = analyze("verify", f"--root={root}", *service.UNITS)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    # The check can fail: a unit whose ExecStart is missing does not verify.
    (root / "opt/jetyolo/venv/bin/jetyolo").unlink()
    failed = analyze("verify", f"--root={root}", "jetyolo.service")
    assert failed.returncode != 0 and "/opt/jetyolo/venv/bin/jetyolo" in failed.stderr
    capsys.readouterr()


def exposure(root: Path, unit: str) -> float:
    done = analyze("security", "--offline=true", f"--root={root}", "--no-pager", unit)
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    return float(match.group(1))


@needs_systemd_analyze
@pytest.mark.usefixtures("cached_wheel")
def test_security_exposure_of_the_service_is_at_most_3(
    rootfs: Path, small_bundle: Path, wheelhouse: Path, capsys: pytest.CaptureFixture
) -> None:
    root = staged_for_analysis(rootfs, small_bundle, wheelhouse)
    score = exposure(root, "jetyolo.service")
    print(f"systemd-analyze security jetyolo.service: {score}")
    assert score <= EXPOSURE_LIMIT
    for unit in ("jetyolo-build.service", "jetyolo-venv.service"):
        assert exposure(root, unit) <= EXPOSURE_LIMIT
    # The same service without its hardening section scores far above the limit.
    unhardened = (root / UNIT_DIR / "jetyolo.service").read_text().split("# --- Hardening")[0]
    (root / UNIT_DIR / "bare.service").write_text(unhardened + "\n[Install]\n"
                                                  "WantedBy=multi-user.target\n")
    assert exposure(root, "bare.service") > EXPOSURE_LIMIT
    capsys.readouterr()


# --- First boot: the venv script, run for real ------------------------------------------


def base_python() -> str:
    return str(getattr(sys, "_base_executable", sys.executable))


def run_venv_setup(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JETYOLO_PREFIX": str(root / "opt/jetyolo"),
           "JETYOLO_PYTHON": base_python(), "PIP_NO_INDEX": "1"}
    env.pop("VIRTUAL_ENV", None)
    script = root / "opt/jetyolo/libexec/jetyolo-venv-setup"
    return subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.usefixtures("cached_wheel")
def test_venv_setup_creates_the_venv_offline_and_then_does_nothing(
    rootfs: Path, small_bundle: Path, wheelhouse: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    assert install("--rootfs", rootfs, "--bundle", small_bundle, "--wheelhouse", wheelhouse) == 0
    first = run_venv_setup(rootfs)
    assert first.returncode == 0, first.stderr
    venv = rootfs / "opt/jetyolo/venv"
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
    usage = subprocess.run([str(venv / "bin/jetyolo"), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "verbs:" in usage.stdout
    fake = subprocess.run([str(venv / "bin/python"), "-c",
                           "import jetyolo_fake_dep; print(jetyolo_fake_dep.VERSION)"],
                          capture_output=True, text=True)
    assert fake.stdout.strip() == "1.0"
    second = run_venv_setup(rootfs)
    assert second.returncode == 0 and "is up to date" in second.stdout
    # A re-staged wheelhouse with a newer dependency is installed at the next start.
    newer = tmp_path / "newer"
    shutil.copytree(wheelhouse, newer)
    (newer / "jetyolo_fake_dep-1.0-py3-none-any.whl").unlink()
    fake_wheel(newer, "jetyolo-fake-dep", "2.0")
    assert install("--rootfs", rootfs, "--bundle", small_bundle, "--wheelhouse", newer) == 0
    assert not (rootfs / "opt/jetyolo/wheelhouse/jetyolo_fake_dep-1.0-py3-none-any.whl").exists()
    third = run_venv_setup(rootfs)
    assert third.returncode == 0 and "ready" in third.stdout, third.stderr
    fake = subprocess.run([str(venv / "bin/python"), "-c",
                           "import jetyolo_fake_dep; print(jetyolo_fake_dep.VERSION)"],
                          capture_output=True, text=True)
    assert fake.stdout.strip() == "2.0"
    capsys.readouterr()


@pytest.mark.usefixtures("cached_wheel")
def test_venv_setup_bootstraps_pip_from_the_wheelhouse(
    rootfs: Path, small_bundle: Path, wheelhouse: Path, capsys: pytest.CaptureFixture
) -> None:
    # Ubuntu's python3 without python3-pip/python3-venv: a venv with no pip in reach.
    assert install("--rootfs", rootfs, "--bundle", small_bundle, "--wheelhouse", wheelhouse) == 0
    venv = rootfs / "opt/jetyolo/venv"
    subprocess.run([base_python(), "-m", "venv", "--without-pip", str(venv)], check=True)
    done = run_venv_setup(rootfs)
    assert done.returncode == 0, done.stderr
    assert "installing pip from" in done.stdout
    assert (venv / "bin/jetyolo").is_file()
    capsys.readouterr()


def test_venv_setup_without_a_wheelhouse_says_what_to_do(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    script = root / "opt/jetyolo/libexec/jetyolo-venv-setup"
    script.parent.mkdir(parents=True)
    shutil.copy(service.REPO / "systemd/jetyolo-venv-setup", script)
    done = run_venv_setup(root)
    assert done.returncode == 1
    assert "requirements.txt is missing" in done.stderr and "jetyolo service install" in done.stderr


# --- The service's ExecStart, run with the staged config --------------------------------


def unit_service_section(path: Path) -> Dict[str, str]:
    """The [Service] settings, repeated keys joined by spaces (Environment=, ...)."""
    settings = service.unit_settings(path.read_text(), "Service")
    return {key: " ".join(values) for key, values in settings.items()}


def mapped(root: Path, value: str) -> str:
    """A device path -> the same path inside the staged rootfs."""
    for prefix in ("/opt/jetyolo", "/etc/jetyolo", "/var/lib/jetyolo"):
        if value == prefix or value.startswith(prefix + "/"):
            return str(root) + value
    return value


@pytest.fixture()
def notify_socket() -> Iterator[socket.socket]:
    with tempfile.TemporaryDirectory(prefix="sdn") as tmp:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(Path(tmp) / "notify"))
        sock.settimeout(0.2)
        try:
            yield sock
        finally:
            sock.close()


@pytest.mark.slow
def test_execstart_runs_with_the_staged_config(
    rootfs: Path, bundle_dir: Path, synth_video: Path, wheelhouse: Path, tmp_path: Path,
    notify_socket: socket.socket, capsys: pytest.CaptureFixture,
) -> None:
    name = json.loads((bundle_dir / "manifest.json").read_text())["name"]
    config = tmp_path / "config.yaml"
    # Paths relative to /etc/jetyolo, as a portable config may write them: on the device they
    # name /opt/jetyolo/... and /var/lib/jetyolo/..., here the same places in the staged rootfs.
    config.write_text(
        f"bundle: ../../opt/jetyolo/bundles/{name}\nsource: {synth_video}\n"
        "backend: onnxruntime\nthreads: 1\nsinks: ['jsonl:detections.jsonl']\nmax_frames: 8\n"
        "engine_cache_dir: ../../var/lib/jetyolo/engines\nspool_dir: ../../var/lib/jetyolo/spool\n"
    )
    assert install("--rootfs", rootfs, "--bundle", bundle_dir, "--config", config,
                   "--wheelhouse", wheelhouse) == 0
    capsys.readouterr()
    unit = unit_service_section(rootfs / UNIT_DIR / "jetyolo.service")
    argv = [mapped(rootfs, part) for part in shlex.split(unit["ExecStart"])]
    assert argv[0] == str(rootfs / "opt/jetyolo/venv/bin/jetyolo")
    argv[0] = str(Path(sys.executable).parent / "jetyolo")  # the venv is made at first boot
    env: Dict[str, str] = {**os.environ, "NOTIFY_SOCKET": notify_socket.getsockname()}
    for assignment in shlex.split(unit["Environment"]):
        key, value = assignment.split("=", 1)
        env[key] = mapped(rootfs, value)
    assert {"JETYOLO_HOME", "CUDA_CACHE_PATH"} <= set(env) and env["HOME"].startswith(str(rootfs))
    workdir = Path(mapped(rootfs, unit["WorkingDirectory"]))
    workdir.mkdir(parents=True, exist_ok=True)  # StateDirectory= does this on the device
    done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = (workdir / "detections.jsonl").read_text().splitlines()
    messages = [json.loads(line) for line in lines]
    frames = [m["payload"] for m in messages if m["topic"].endswith("/detections")]
    assert [frame["frame_index"] for frame in frames] == list(range(8))
    assert sum(len(frame["detections"]) for frame in frames) > 0
    notified: List[str] = []
    while True:
        try:
            notified.append(notify_socket.recv(4096).decode())
        except socket.timeout:
            break
    assert any(m.startswith("READY=1") for m in notified), notified
    assert any(m.startswith("STOPPING=1") for m in notified), notified


def test_build_unit_command_is_accepted_by_jetyolo_build() -> None:
    import argparse

    from device import build

    unit = unit_service_section(service.REPO / "systemd/jetyolo-build.service")
    argv = shlex.split(unit["ExecStart"])
    assert argv[:2] == ["/opt/jetyolo/venv/bin/jetyolo", "build"]
    parser = argparse.ArgumentParser(prog="jetyolo build")
    build.add_arguments(parser)
    args = parser.parse_args(argv[2:])  # SystemExit(2) on an unknown flag
    assert args.config == "/etc/jetyolo/config.yaml"
