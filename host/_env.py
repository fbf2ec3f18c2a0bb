"""Optional dependencies and ultralytics' offline settings, in one place."""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import Dict, Iterable

from device.errors import JetyoloError

PROJECT_CONFIG_DIR = Path(os.environ.get("JETYOLO_HOME", Path.cwd() / ".jetyolo"))


def require(module: str, verb: str, extra: str = "host") -> ModuleType:
    """Import ``module`` or fail with the exact install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise JetyoloError(
            f"`jetyolo {verb}` needs {module.split('.')[0]}, which is not installed "
            f"({exc}); install the {extra} extras: pip install 'jetyolo[{extra}]'"
        ) from exc


def ultralytics_offline(verb: str) -> ModuleType:
    """Import ultralytics configured to run with no network: no hub, no font download."""
    config_dir = Path(
        os.environ.setdefault("YOLO_CONFIG_DIR", str(PROJECT_CONFIG_DIR / "ultralytics"))
    )
    os.environ.setdefault("YOLO_OFFLINE", "1")
    # Weights are untrusted input: ultralytics' restricted loading (torch.load(weights_only=True)
    # with an allow-list of its model classes) instead of a full unpickle, which runs any code a
    # .pt carries. Read once, at ultralytics' import; ULTRALYTICS_SAFE_LOAD=0 opts out.
    os.environ.setdefault("ULTRALYTICS_SAFE_LOAD", "1")
    font = config_dir / "Ultralytics" / "Arial.ttf"
    if not font.exists():
        font.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_any_ttf(), font)
    return require("ultralytics", verb)


def _any_ttf() -> Path:
    matplotlib = require("matplotlib", "train")
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"


def installed_versions(packages: Iterable[str]) -> Dict[str, str]:
    """``package -> version`` of those installed (for reports); missing ones are left out."""
    from importlib import metadata

    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions
