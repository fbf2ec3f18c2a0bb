"""The import boundaries docs/ARCHITECTURE.md draws: the config becomes running objects in one
place, the pipeline knows neither the config nor the bundle, the device never imports host."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, Set

REPO = Path(__file__).resolve().parents[1]
# Who may name RunConfig, and why. Anything new here is a design decision: say it in the docs.
RUNCONFIG_USERS = {
    "device.config": "declares it",
    "device.setup": "turns it into a source, a backend, sinks and a pipeline",
    "device.build": "jetyolo build: the engine the config names, built ahead of time",
    "device.run": "argument parsing: flags + file -> RunConfig, handed to device.setup",
    "device.bench.worker": "argument parsing of the bench child, handed to device.setup",
    "device.update": "jetyolo update builds and verifies the engine the service config names",
    "device.ops.extension": "a setup extension: reads its own keys (http_*) when plugged in",
    "device.ops.homeassistant": "discovery configs from the run's names and settings",
    "device.reload": "a setup extension: SIGHUP reopens the backend the config names",
    "device.choice": "BackendChoice.from_config: the backend settings of a run config, resolved "
                     "once for run, build, verify, update and the bench",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> Dict[str, Set[str]]:
    """module -> names imported from it (``import x`` records x with the name ``*``)."""
    found: Dict[str, Set[str]] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.setdefault(node.module, set()).update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                found.setdefault(alias.name, set()).add("*")
    return found


def sources() -> Dict[str, Dict[str, Set[str]]]:
    return {
        module_name(path): imported_names(path)
        for package in ("device", "host")
        for path in sorted((REPO / package).rglob("*.py"))
    }


def runconfig_users(graph: Dict[str, Dict[str, Set[str]]]) -> Set[str]:
    users = {name for name, imports in graph.items()
             if "RunConfig" in imports.get("device.config", set())}
    return users | {"device.config"}


def test_only_the_setup_module_and_the_listed_verbs_name_runconfig() -> None:
    assert runconfig_users(sources()) == set(RUNCONFIG_USERS)


def test_the_check_would_catch_a_new_runconfig_reader() -> None:
    graph = sources()
    graph["device.pipeline"] = {"device.config": {"RunConfig"}}
    assert "device.pipeline" in runconfig_users(graph) - set(RUNCONFIG_USERS)


def test_the_pipeline_imports_neither_config_nor_bundle_nor_setup() -> None:
    code = ("import sys, device.pipeline; "
            "print(sorted(m for m in sys.modules if m.startswith('device.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=REPO).stdout
    for forbidden in ("device.config", "device.bundle", "device.setup", "device.sinks",
                      "device.backends.onnxruntime", "device.engine"):
        assert f"'{forbidden}'" not in loaded, loaded
    assert "'device.pipeline'" in loaded  # the probe itself works


def test_the_device_never_imports_host() -> None:
    offenders = [
        name for name, imports in sources().items() if name.startswith("device")
        for imported in imports if imported == "host" or imported.startswith("host.")
    ]
    assert offenders == []
