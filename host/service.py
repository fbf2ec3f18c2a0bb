"""Stage jetyolo as a systemd service into a Jetson root filesystem.

Into an L4T ``Linux_for_Tegra/rootfs`` before ``flash.sh``, or into ``/`` on a running Jetson::

    jetyolo service install --rootfs Linux_for_Tegra/rootfs --bundle runs/bundle [--dry-run]

Writes, relative to the rootfs (docs/service.md has the whole flash workflow):
  /opt/jetyolo/wheelhouse/        the jetyolo wheel, pip, the device dependencies (aarch64),
                                  requirements.txt: installed offline at first boot
  /opt/jetyolo/libexec/           jetyolo-venv-setup (creates /opt/jetyolo/venv)
  /opt/jetyolo/bundles/NAME/      the bundle (manifest + the files it lists)
  /opt/jetyolo/docs/service.md
  /etc/jetyolo/config.yaml        from --config, or systemd/config.example.yaml + --bundle;
                                  an existing one is kept (only its `bundle:` line follows
                                  --bundle)
  /etc/systemd/system/            jetyolo.service, jetyolo-build.service, jetyolo-venv.service
                                  and the multi-user.target.wants symlink(s) `systemctl enable`
                                  makes
  /usr/lib/sysusers.d/jetyolo.conf, /usr/lib/tmpfiles.d/jetyolo.conf
and creates the `jetyolo` user with `systemd-sysusers --root` when that tool is here.

Idempotent: unchanged files are left alone, files that left a bundle or the wheelhouse are
removed. --dry-run prints the same list of changes and writes nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from device.bundle import Bundle
from device.errors import JetyoloError
from device.files import sha256_file

LOG = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
PREFIX = "/opt/jetyolo"
WHEELHOUSE = f"{PREFIX}/wheelhouse"
BUNDLES = f"{PREFIX}/bundles"
CONFIG = "/etc/jetyolo/config.yaml"
UNIT_DIR = "/etc/systemd/system"
UNITS = ("jetyolo.service", "jetyolo-build.service", "jetyolo-venv.service")
SYSUSERS = "/usr/lib/sysusers.d/jetyolo.conf"
TMPFILES = "/usr/lib/tmpfiles.d/jetyolo.conf"
SERVICE_USER = "jetyolo"
# Target Python -> the newest glibc of its JetPack (Ubuntu 20.04 / 22.04 / 24.04).
TARGET_GLIBC = {"3.8": 31, "3.10": 35, "3.12": 39}
# JetPack 5/6 ship TensorRT bindings and OpenCV built against NumPy 1.x; a NumPy 2 in the venv
# would shadow the system's and break `import tensorrt` / `import cv2`. PIP_CONSTRAINT adds more.
TARGET_CONSTRAINTS = {"3.8": ["numpy<2"], "3.10": ["numpy<2"], "3.12": []}
WHEEL_EPOCH = "315532800"  # SOURCE_DATE_EPOCH: the same sources give the same wheel bytes
SOURCE_FILES = ("pyproject.toml", "README.md", "LICENSE", "setup.cfg")
SOURCE_PACKAGES = ("device", "host")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rootfs", required=True, type=Path,
                        help="root filesystem to stage into: Linux_for_Tegra/rootfs, or /")
    parser.add_argument("--bundle", type=Path, help="bundle to stage (made by `jetyolo export`)")
    parser.add_argument("--config", type=Path,
                        help="config to stage as /etc/jetyolo/config.yaml (default: keep the "
                             "existing one, or systemd/config.example.yaml for a new install)")
    parser.add_argument("--wheelhouse", type=Path,
                        help="prepared folder of aarch64 wheels (with pip-*.whl) to stage "
                             "instead of running `pip download` (offline installs, tests)")
    parser.add_argument("--python-version", default="3.10", choices=sorted(TARGET_GLIBC),
                        help="Python on the Jetson: 3.8 JetPack 5, 3.10 JetPack 6, 3.12 JetPack 7")
    parser.add_argument("--exclude", action="append", default=[], metavar="PACKAGE",
                        help="leave a dependency out, e.g. onnxruntime on a TensorRT-only "
                             "device (OpenCV is JetPack's already: the device extra installs "
                             "no OpenCV wheel on aarch64); repeatable")
    parser.add_argument("--extra-wheel", action="append", default=[], type=Path, metavar="WHL",
                        help="also stage and install this wheel, e.g. a pycuda wheel built on "
                             "a Jetson of the same JetPack; repeatable")
    parser.add_argument("--dry-run", action="store_true", help="list the changes, write nothing")
    parser.add_argument("--force", action="store_true",
                        help="stage into a folder that does not look like a rootfs")


def run(args: argparse.Namespace) -> int:
    rootfs = check_rootfs(args.rootfs, args.force)
    with tempfile.TemporaryDirectory(prefix="jetyolo-stage-") as tmp:
        plan = build_plan(rootfs, args, Path(tmp))
        changes = plan.changes(rootfs)
        print_changes(changes, rootfs, args.dry_run)
        if args.dry_run:
            return 0
        try:
            plan.apply(rootfs, changes)
        except PermissionError as exc:
            raise JetyoloError(f"cannot write {exc.filename}: permission denied; an L4T rootfs "
                               "belongs to root, run this with sudo") from exc
    finish(rootfs)
    return 0


# --- What goes where ------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One file or symlink at ``path`` (absolute, as on the device)."""

    path: str
    data: Optional[bytes] = None  # content, or
    source: Optional[Path] = None  # a file to copy, or
    link: Optional[str] = None  # a symlink target
    mode: int = 0o644


@dataclass(frozen=True)
class Change:
    verb: str  # create | update | remove | unchanged | run
    path: str
    note: str = ""


@dataclass
class Plan:
    entries: List[Entry] = field(default_factory=list)
    managed_dirs: List[str] = field(default_factory=list)  # stale files here are removed

    def changes(self, rootfs: Path) -> List[Change]:
        result = [entry_change(rootfs, entry) for entry in self.entries]
        wanted = {entry.path for entry in self.entries}
        for directory in self.managed_dirs:
            result += [Change("remove", path, "no longer staged")
                       for path in files_below(rootfs, directory) if path not in wanted]
        result.append(user_change(rootfs))
        return result

    def apply(self, rootfs: Path, changes: Sequence[Change]) -> None:
        todo = {change.path: change.verb for change in changes}
        for entry in self.entries:
            if todo[entry.path] in ("create", "update"):
                write_entry(rootfs, entry)
        for change in changes:
            if change.verb == "remove":
                inside(rootfs, change.path).unlink()
            elif change.verb == "run":
                create_user(rootfs)


def build_plan(rootfs: Path, args: argparse.Namespace, tmp: Path) -> Plan:
    source = project_root()
    plan = Plan()
    plan.entries += unit_entries(source)
    config_text = staged_config(rootfs, args.config, args.bundle)
    if config_text is not None:
        plan.entries.append(Entry(CONFIG, data=config_text.encode(), mode=0o640))
    if args.bundle:
        bundle_dir, entries = bundle_entries(args.bundle)
        plan.entries += entries
        plan.managed_dirs.append(bundle_dir)
    plan.entries += wheelhouse_entries(source, args, tmp)
    plan.managed_dirs.append(WHEELHOUSE)
    return plan


def project_root() -> Path:
    if not (REPO / "pyproject.toml").is_file() or not (REPO / "systemd").is_dir():
        raise JetyoloError(f"`jetyolo service install` needs the jetyolo source tree (pyproject"
                           f".toml and systemd/ next to {REPO / 'host'}); run it from a checkout "
                           "installed with `pip install -e .`")
    return REPO


def unit_entries(source: Path) -> List[Entry]:
    systemd = source / "systemd"
    entries = [Entry(f"{UNIT_DIR}/{unit}", source=systemd / unit) for unit in UNITS]
    entries += [
        Entry(f"{PREFIX}/libexec/jetyolo-venv-setup", source=systemd / "jetyolo-venv-setup",
              mode=0o755),
        Entry(SYSUSERS, source=systemd / "jetyolo.sysusers"),
        Entry(TMPFILES, source=systemd / "jetyolo.tmpfiles"),
    ]
    docs = source / "docs" / "service.md"
    if docs.is_file():
        entries.append(Entry(f"{PREFIX}/docs/service.md", source=docs))
    for unit in UNITS:
        for target in wanted_by(systemd / unit):
            link = f"{UNIT_DIR}/{target}.wants/{unit}"
            entries.append(Entry(link, link=f"{UNIT_DIR}/{unit}"))
    return entries


def wanted_by(unit: Path) -> List[str]:
    """The unit's ``[Install] WantedBy=`` targets: where ``systemctl enable`` links it."""
    return [target for value in unit_settings(unit.read_text(), "Install").get("WantedBy", [])
            for target in value.split()]


def unit_settings(text: str, section: str) -> Dict[str, List[str]]:
    """``key -> [values]`` of one section of a unit file; repeated keys keep every value (an
    empty assignment resets the list, as in systemd)."""
    settings: Dict[str, List[str]] = {}
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
        elif current == section and "=" in line:
            key, value = (part.strip() for part in line.split("=", 1))
            settings[key] = [*settings.get(key, []), value] if value else []
    return settings


# --- Config -----------------------------------------------------------------------------


def staged_config(rootfs: Path, given: Optional[Path], bundle: Optional[Path]) -> Optional[str]:
    """The text for /etc/jetyolo/config.yaml, or None to leave the existing file alone."""
    bundle_path = f"{BUNDLES}/{bundle_name(bundle)}" if bundle else None
    if given is not None:
        text = given.read_text() if given.is_file() else None
        if text is None:
            raise JetyoloError(f"--config {given} does not exist")
        check_config(text, str(given), bundle_path)
        return text
    existing = inside(rootfs, CONFIG)
    if existing.is_file():
        text = existing.read_text()
        return None if bundle_path is None else with_bundle(text, bundle_path, str(existing))
    if bundle_path is None:
        raise JetyoloError(f"{existing} does not exist yet: pass --bundle (the config is made "
                           "from systemd/config.example.yaml) or --config FILE")
    example = project_root() / "systemd" / "config.example.yaml"
    return with_bundle(example.read_text(), bundle_path, str(example))


def with_bundle(text: str, bundle_path: str, origin: str) -> str:
    """``text`` with its ``bundle:`` line pointing at ``bundle_path`` (comments kept)."""
    line = f"bundle: {bundle_path}"
    new, count = re.subn(r"^bundle:.*$", line, text, count=1, flags=re.MULTILINE)
    if count == 0:
        new = f"{line}\n{text}"
    check_config(new, origin, bundle_path)
    return new


def check_config(text: str, origin: str, bundle_path: Optional[str]) -> None:
    """The device's own checks (device.config, sink URLs), so a bad config fails here, not at
    first boot; with --bundle, the config must run the staged bundle."""
    import yaml

    from device.config import config_from_mapping
    from device.sinks.urls import parse_sink_url

    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise JetyoloError(f"{origin} is not valid YAML: {exc}".replace("\n", " ")) from exc
    if not isinstance(values, dict):
        raise JetyoloError(f"{origin} must be a mapping of keys to values")
    config = config_from_mapping(values, origin)
    for sink in config.sinks:
        parse_sink_url(sink)
    # Relative paths are relative to the config's folder on the device (device.config).
    staged = posixpath.normpath(posixpath.join(posixpath.dirname(CONFIG), config.bundle))
    if bundle_path is not None and staged != bundle_path:
        raise JetyoloError(f"{origin}: bundle: is {config.bundle!r} but --bundle is staged at "
                           f"{bundle_path}; set `bundle: {bundle_path}` or leave out --config")


# --- Bundle -----------------------------------------------------------------------------


def bundle_name(bundle: Path) -> str:
    name = str(Bundle.load(bundle, verify=False).manifest.get("name") or bundle.name)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise JetyoloError(f"bundle {bundle}: name {name!r} is not usable as a folder name; "
                           "re-export it with a name of letters, digits, '.', '_' or '-'")
    return name


def bundle_entries(bundle: Path) -> Tuple[str, List[Entry]]:
    """The bundle's manifest and listed files (verified) below /opt/jetyolo/bundles/NAME."""
    loaded = Bundle.load(bundle, verify=True)  # refuses names outside it, links, special files
    target = f"{BUNDLES}/{bundle_name(bundle)}"
    names = ["manifest.json", *sorted(loaded.manifest["files"])]
    return target, [Entry(f"{target}/{name}", source=loaded.path(name)) for name in names]


# --- Wheelhouse -------------------------------------------------------------------------


def wheelhouse_entries(source: Path, args: argparse.Namespace, tmp: Path) -> List[Entry]:
    project_wheel = build_project_wheel(source, tmp / "dist")
    requirements = device_requirements(project_wheel, args.python_version, args.exclude)
    if args.wheelhouse is not None:
        wheels, requirements = prepared_wheelhouse(args.wheelhouse, requirements)
    else:
        wheels = download_wheelhouse(requirements, args.python_version, tmp / "wheelhouse")
    wheels, requirements = with_extra_wheels(wheels, requirements, args.extra_wheel)
    check_wheelhouse(wheels, requirements)
    entries = [Entry(f"{WHEELHOUSE}/requirements.txt", data=lines(requirements)),
               Entry(f"{WHEELHOUSE}/constraints.txt", data=lines(pins(wheels)))]
    entries += [Entry(f"{WHEELHOUSE}/{wheel.name}", source=wheel)
                for wheel in [project_wheel, *wheels]]
    return entries


def lines(items: Iterable[str]) -> bytes:
    return "".join(f"{item}\n" for item in items).encode()


def pins(wheels: Iterable[Path]) -> List[str]:
    """``name==version`` for every dependency wheel: the venv ends up with exactly these
    (upgraded or downgraded), not whatever an older install or the system had."""
    from packaging.utils import parse_wheel_filename

    parsed = (parse_wheel_filename(wheel.name) for wheel in wheels)
    return sorted(f"{name}=={version}" for name, version, _, _ in parsed if name != "pip")


def build_project_wheel(source: Path, out: Path) -> Path:
    """``pip wheel`` of a clean copy of the sources (no stale build/), reproducibly."""
    LOG.info("building the jetyolo wheel from %s", source)
    copy = out.parent / f"{out.name}-src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for package in SOURCE_PACKAGES:
        shutil.copytree(source / package, copy / package, ignore=ignore)
    for name in SOURCE_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, copy / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
               "--disable-pip-version-check", "--quiet", "--wheel-dir", str(out), str(copy)]
    env = {**os.environ, "SOURCE_DATE_EPOCH": WHEEL_EPOCH}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wheels = sorted(out.glob("jetyolo-*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise JetyoloError(f"building the jetyolo wheel failed ({' | '.join(tail)}); try "
                           f"`pip wheel --no-deps {source}` to see the whole error")
    return wheels[0]


def device_requirements(wheel: Path, python_version: str, exclude: Iterable[str]) -> List[str]:
    """The wheel's base and ``[device]`` requirements for the Jetson, markers resolved."""
    import zipfile
    from email.parser import Parser

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    with zipfile.ZipFile(wheel) as archive:
        metadata_name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
    target = {"python_version": python_version, "python_full_version": f"{python_version}.0",
              "platform_machine": "aarch64", "sys_platform": "linux", "os_name": "posix",
              "platform_system": "Linux", "implementation_name": "cpython"}
    dropped = {canonicalize_name(name) for name in exclude}
    result: Dict[str, str] = {}
    for line in metadata.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None or marker.evaluate({**target, "extra": "device"}):
            requirement.marker = None
            result.setdefault(canonicalize_name(requirement.name), str(requirement))
    unknown = dropped - set(result)
    if unknown:
        raise JetyoloError(f"--exclude {', '.join(sorted(unknown))}: not a device requirement; "
                           f"the requirements are {', '.join(sorted(result))}")
    return sorted(text for name, text in result.items() if name not in dropped)


def prepared_wheelhouse(folder: Path, requirements: List[str]) -> Tuple[List[Path], List[str]]:
    """Wheels from ``--wheelhouse`` (its own requirements.txt wins when it has one)."""
    if not folder.is_dir():
        raise JetyoloError(f"--wheelhouse {folder} is not a folder")
    wheels = sorted(p for p in folder.glob("*.whl") if not p.name.startswith("jetyolo-"))
    listed = folder / "requirements.txt"
    if listed.is_file():
        requirements = [line.strip() for line in listed.read_text().splitlines()
                        if line.strip() and not line.lstrip().startswith("#")]
    return wheels, requirements


def with_extra_wheels(
    wheels: List[Path], requirements: List[str], extra: Sequence[Path]
) -> Tuple[List[Path], List[str]]:
    """``--extra-wheel`` files join the wheelhouse and, by name, the requirements."""
    from packaging.utils import parse_wheel_filename

    for wheel in extra:
        if not wheel.is_file():
            raise JetyoloError(f"--extra-wheel {wheel} does not exist")
        try:
            name = parse_wheel_filename(wheel.name)[0]
        except ValueError as exc:
            raise JetyoloError(f"--extra-wheel {wheel}: not a wheel file name ({exc})") from exc
        wheels = [w for w in wheels if parse_wheel_filename(w.name)[0] != name] + [wheel]
        if name not in requirements:
            requirements = [*requirements, str(name)]
    return wheels, requirements


def download_wheelhouse(requirements: List[str], python_version: str, out: Path) -> List[Path]:
    """``pip download`` of the requirements (and pip) as aarch64 wheels for the Jetson."""
    glibc = TARGET_GLIBC[python_version]
    platforms = ["manylinux2014_aarch64"]
    platforms += [f"manylinux_2_{minor}_aarch64" for minor in range(17, glibc + 1)]
    command = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
               "--dest", str(out), "--only-binary=:all:", "--implementation", "cp",
               "--python-version", python_version]
    for platform in platforms:
        command += ["--platform", platform]
    constraints = out.parent / "constraints.txt"
    constraints.write_text("".join(f"{line}\n" for line in TARGET_CONSTRAINTS[python_version]))
    command += ["--constraint", str(constraints), "pip", *requirements]
    LOG.info("downloading wheels for CPython %s aarch64 (glibc 2.%d): %s",
             python_version, glibc, " ".join(requirements))
    done = subprocess.run(command, check=False, stdout=sys.stderr)
    if done.returncode != 0:
        raise JetyoloError(f"pip download of the Jetson wheels failed (exit {done.returncode}, "
                           "output above); without network, pass --wheelhouse DIR with "
                           "prepared aarch64 wheels (docs/service.md)")
    return sorted(out.glob("*.whl"))


def check_wheelhouse(wheels: Sequence[Path], requirements: Sequence[str]) -> None:
    """Every requirement and pip must have a wheel: the Jetson installs with --no-index."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename

    names = set()
    for wheel in wheels:
        try:
            names.add(parse_wheel_filename(wheel.name)[0])
        except ValueError as exc:
            raise JetyoloError(f"wheelhouse file {wheel} is not a wheel name: {exc}") from exc
    wanted = ["pip", *(Requirement(line).name for line in requirements)]
    missing = [name for name in wanted if canonicalize_name(name) not in names]
    if missing:
        raise JetyoloError(f"the wheelhouse has no wheel for {', '.join(missing)}; the Jetson "
                           "installs offline, so add them (pip download --platform "
                           "manylinux2014_aarch64 --only-binary=:all: -d DIR ...) or --exclude "
                           "them")


# --- Comparing and writing --------------------------------------------------------------


def check_rootfs(rootfs: Path, force: bool) -> Path:
    if not rootfs.is_dir():
        raise JetyoloError(f"--rootfs {rootfs} is not a folder")
    if not force and not ((rootfs / "etc").is_dir() and (rootfs / "usr").is_dir()):
        raise JetyoloError(f"--rootfs {rootfs} does not look like a root filesystem (no etc/ "
                           "and usr/); give Linux_for_Tegra/rootfs (after apply_binaries.sh) "
                           "or /, or --force to stage into it anyway")
    return rootfs.resolve()


def inside(rootfs: Path, path: str) -> Path:
    """``rootfs/path``, refusing paths that escape the rootfs through a symlink."""
    target = rootfs / path.lstrip("/")
    parent = target.parent.resolve()
    if parent != rootfs and rootfs not in parent.parents:
        raise JetyoloError(f"{target} resolves outside --rootfs {rootfs} (through a symlink); "
                           "fix the rootfs or stage into a fresh one")
    return parent / target.name


def entry_change(rootfs: Path, entry: Entry) -> Change:
    target = inside(rootfs, entry.path)
    if not target.exists() and not target.is_symlink():
        return Change("create", entry.path, describe(entry))
    if entry.link is not None:
        same = target.is_symlink() and os.readlink(target) == entry.link
    elif target.is_symlink() or not target.is_file():
        same = False
    else:
        same = same_content(target, entry) and (target.stat().st_mode & 0o7777) == entry.mode
    return Change("unchanged" if same else "update", entry.path, describe(entry))


def same_content(target: Path, entry: Entry) -> bool:
    if entry.data is not None:
        return target.stat().st_size == len(entry.data) and target.read_bytes() == entry.data
    source = entry.source
    if source is None:
        return False
    return (target.stat().st_size == source.stat().st_size
            and sha256_file(target) == sha256_file(source))


def describe(entry: Entry) -> str:
    if entry.link is not None:
        return f"-> {entry.link}"
    size = len(entry.data) if entry.data is not None else entry.source.stat().st_size if \
        entry.source else 0
    return f"{size} bytes, mode {entry.mode:04o}"


def write_entry(rootfs: Path, entry: Entry) -> None:
    """Write through a temp name in the same folder and a rename: never half a file."""
    target = inside(rootfs, entry.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / f".{target.name}.jetyolo-tmp"
    if temp.exists() or temp.is_symlink():
        temp.unlink()
    if entry.link is not None:
        os.symlink(entry.link, temp)
    else:
        if entry.data is not None:
            temp.write_bytes(entry.data)
        elif entry.source is not None:
            shutil.copyfile(entry.source, temp)
        os.chmod(temp, entry.mode)
    os.replace(temp, target)


def files_below(rootfs: Path, directory: str) -> List[str]:
    root = inside(rootfs, directory)
    if not root.is_dir():
        return []
    return sorted("/" + str(p.relative_to(rootfs)) for p in root.rglob("*")
                  if p.is_file() or p.is_symlink())


# --- The service user -------------------------------------------------------------------


def user_change(rootfs: Path) -> Change:
    missing = missing_memberships(rootfs)
    if not missing:
        return Change("unchanged", f"user {SERVICE_USER}", "in groups video, render")
    if shutil.which("systemd-sysusers") is None:
        return Change("unchanged", f"user {SERVICE_USER}",
                      "no systemd-sysusers here: jetyolo-venv.service creates it at first boot")
    return Change("run", f"user {SERVICE_USER}",
                  f"systemd-sysusers --root ({', '.join(missing)})")


def missing_memberships(rootfs: Path) -> List[str]:
    """What the sysusers file asks for that rootfs/etc/passwd and etc/group lack."""
    passwd = read_db(rootfs, "/etc/passwd")
    groups = read_db(rootfs, "/etc/group")
    missing = [] if SERVICE_USER in passwd else [f"user {SERVICE_USER}"]
    for group in ("video", "render"):
        members = groups.get(group, ["", "", "", ""])[3].split(",")
        if SERVICE_USER not in members:
            missing.append(f"member of {group}")
    return missing


def read_db(rootfs: Path, path: str) -> Dict[str, List[str]]:
    file = inside(rootfs, path)
    if not file.is_file():
        return {}
    rows = (line.split(":") for line in file.read_text().splitlines() if line.strip())
    return {row[0]: row + [""] * (4 - len(row)) for row in rows}


def create_user(rootfs: Path) -> None:
    command = ["systemd-sysusers", f"--root={rootfs}", str(inside(rootfs, SYSUSERS))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise JetyoloError(f"{' '.join(command)} failed: {done.stderr.strip()}; the files are "
                           "staged and jetyolo-venv.service creates the user at first boot")


# --- Reporting --------------------------------------------------------------------------


def print_changes(changes: Sequence[Change], rootfs: Path, dry_run: bool) -> None:
    counts: Dict[str, int] = {}
    for change in changes:
        counts[change.verb] = counts.get(change.verb, 0) + 1
        print(f"  {change.verb:<9} {change.path}  ({change.note})")
    summary = ", ".join(f"{count} {verb}" for verb, count in sorted(counts.items()))
    prefix = "dry run, nothing written" if dry_run else "staged"
    print(f"{prefix}: {summary} in {rootfs}")


def finish(rootfs: Path) -> None:
    if rootfs == Path("/") and Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "daemon-reload"], check=False)
        print("next: sudo systemctl start jetyolo   (first start builds the venv and engine; "
              "follow with journalctl -fu jetyolo-venv -u jetyolo-build -u jetyolo)")
    else:
        print("next: flash this rootfs (docs/service.md); the first boot builds the venv and "
              "the engine, then starts jetyolo.service")
