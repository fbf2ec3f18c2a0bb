"""Check a bundle: manifest schema, and the size and sha256 of every file it lists."""

from __future__ import annotations

import argparse

from device.bundle import Bundle


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory (made by `jetyolo export`)")


def run(args: argparse.Namespace) -> int:
    bundle = Bundle.load(args.bundle, verify=True)
    files = bundle.manifest["files"]
    print(f"bundle {bundle.root}: OK ({len(files)} files, model {bundle.model_id})")
    for relative, entry in sorted(files.items()):
        print(f"  {entry['sha256'][:16]}  {entry['size']:>10}  {relative}")
    return 0
