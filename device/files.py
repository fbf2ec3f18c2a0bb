"""Generic file helpers: hashing, atomic writes (temp file + rename), writable and output
folders, replacing a folder by renames. Used by bundles, engines, the spool, benches and every
host writer; nothing here knows what a bundle is."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

from device.errors import JetyoloError


def sha256_file(path: Union[str, Path]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


PRIVATE_FILE = 0o600  # engines, timing caches, spool: the service user's alone, whatever the umask
PRIVATE_DIR = 0o700


def atomic_write_bytes(path: Union[str, Path], data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` (permissions ``mode``, whatever the umask) through a temp file
    in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Union[str, Path], obj: Any, mode: int = 0o644) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), mode)


def make_writable_dir(path: Path, mode: Optional[int] = None) -> None:
    """Create ``path`` (and its parents) and prove this user can create files in it with a probe
    file (``os.access`` says yes to root even on read-only mounts). A folder this call creates
    gets ``mode`` whatever the umask (an existing one is left as it is). Raises ``OSError``."""
    created = not path.is_dir()
    path.mkdir(parents=True, exist_ok=True)
    if created and mode is not None:
        os.chmod(path, mode)
    fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
    os.close(fd)
    os.unlink(probe)


def check_output_dir(out_dir: Path, force: bool) -> None:
    """Refuse a bad output directory before any work: a file, a non-empty folder without
    ``force``, or a place this user cannot create files in. Writability is probed by creating and
    removing a temp folder in the nearest existing ancestor (``os.access`` says yes to root even
    on read-only mounts). Creates nothing."""
    if out_dir.exists() and not out_dir.is_dir():
        raise JetyoloError(f"output {out_dir} exists and is not a directory; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise JetyoloError(
            f"output {out_dir} exists and is not empty; choose another --out or pass --force"
        )
    existing = out_dir.resolve().parent
    while not existing.exists():
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a directory")
        Path(tempfile.mkdtemp(prefix=".jetyolo-probe-", dir=existing)).rmdir()
    except OSError as exc:
        raise JetyoloError(
            f"cannot write {out_dir}: {existing} is not writable "
            f"({exc.strerror or exc}); choose a writable --out"
        ) from exc


def prepare_output_dir(out_dir: Path, force: bool) -> None:
    """``check_output_dir``, then create the parent folders the output will be renamed into."""
    check_output_dir(out_dir, force)
    out_dir.resolve().parent.mkdir(parents=True, exist_ok=True)


def replace_dir(source: Path, target: Path) -> None:
    """Move the finished directory ``source`` to ``target``, replacing what is there by renames
    (the old one is moved aside first, so ``target`` is never half old and half new)."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)
