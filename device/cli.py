"""``jetyolo``: one command, many verbs.

Each verb is a module with a docstring (its help), ``add_arguments(parser)`` and ``run(args)``.
Device verbs are listed here; host verbs plug in through the ``jetyolo.verbs`` entry-point group
(see pyproject.toml), so the device runtime never imports ``host`` and a device verb loads only
its own module.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from importlib import metadata
from types import ModuleType
from typing import Dict, List, NoReturn, Optional, Sequence

from device.errors import JetyoloError
from device.redact import RedactingFormatter, redact_url

DEVICE_VERBS: Dict[str, str] = {
    "run": "device.run",
    "build": "device.build",
    "verify": "device.verify",
    "doctor": "device.doctor",
    "selftest": "device.selftest",
    "bundle.verify": "device.bundle_verify",
    "update": "device.update",
}
ENTRY_POINT_GROUP = "jetyolo.verbs"


def host_verbs() -> Dict[str, metadata.EntryPoint]:
    return {entry.name: entry for entry in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _split_verb(argv: List[str], known: Sequence[str]) -> tuple:
    """Split the verb off: ``["data", "check", "x"]`` -> ``("data.check", ["x"])``."""
    if len(argv) >= 2 and f"{argv[0]}.{argv[1]}" in known:
        return f"{argv[0]}.{argv[1]}", argv[2:]
    return argv[0], argv[1:]


class OneLineParser(argparse.ArgumentParser):
    """A usage mistake (``--conf high``, an unknown flag) as one ``jetyolo: error:`` line, exit 2:
    argparse would print the whole usage first."""

    def error(self, message: str) -> NoReturn:
        raise JetyoloError(f"{self.prog}: {message}; `{self.prog} --help` lists the options")


def _load_verb(verb: str) -> ModuleType:
    if verb in DEVICE_VERBS:
        return importlib.import_module(DEVICE_VERBS[verb])
    entry = host_verbs()[verb]
    return entry.load()


def _usage(known: Sequence[str]) -> str:
    lines = [
        "usage: jetyolo VERB [options]   (jetyolo VERB --help for a verb's options)",
        "",
        "verbs:",
    ]
    lines += [f"  {name.replace('.', ' ')}" for name in sorted(known)]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(message)s"))  # no URL password in any log line
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    known = list(DEVICE_VERBS)
    first_two = ".".join(argv[:2])
    if not argv or (argv[0] not in DEVICE_VERBS and first_two not in DEVICE_VERBS):
        known += list(host_verbs())
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(known))
        return 0
    verb, rest = _split_verb(argv, known)
    group = sorted(name for name in known if name.startswith(f"{argv[0]}."))
    if verb not in known and group and (len(argv) == 1 or argv[1] in ("-h", "--help")):
        asked = len(argv) > 1  # `jetyolo data --help`, or a bare `jetyolo data`
        usage = [f"usage: jetyolo {argv[0]} VERB [options]", "", "verbs:"]
        usage += [f"  {name.replace('.', ' ')}" for name in group]
        print("\n".join(usage), file=sys.stdout if asked else sys.stderr)
        if not asked:
            print(f"jetyolo: error: `jetyolo {argv[0]}` needs a verb", file=sys.stderr)
        return 0 if asked else 2
    if verb not in known:
        print(_usage(known), file=sys.stderr)
        print(f"jetyolo: error: unknown verb {' '.join(argv[:2])!r}", file=sys.stderr)
        return 2
    try:
        module = _load_verb(verb)
        parser = OneLineParser(
            prog=f"jetyolo {verb.replace('.', ' ')}",
            description=(module.__doc__ or "").strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(parser)
        args = parser.parse_args(rest)
        return int(module.run(args) or 0)
    except JetyoloError as exc:
        print(f"jetyolo: error: {redact_url(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("jetyolo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
