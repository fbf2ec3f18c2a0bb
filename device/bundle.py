"""The bundle: the one artifact the device consumes.

A bundle is a directory with ``manifest.json`` and the files it lists (ONNX variants, calibration
cache, Q/DQ model, reference data). The manifest records the sha256 and size of every file, the
input/preprocessing contract and the output meaning. Writers go through ``write_new_bundle``
(whole bundle: temp dir + rename) or ``add_files`` (files first, manifest last, each renamed into
place), so a reader never sees a half-written bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from device.errors import JetyoloError
from device.files import (
    atomic_write_bytes,
    atomic_write_json,
    prepare_output_dir,
    replace_dir,
    sha256_file,
)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_KEYS = (
    "schema_version",
    "name",
    "class_names",
    "preprocess",
    "postprocess",
    "variants",
    "files",
)
REQUIRED_VARIANT_KEYS = ("file", "input", "outputs")
MAPPING_KEYS = ("preprocess", "postprocess", "variants", "files")


def file_entry(path: Path) -> Dict[str, Any]:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


@dataclass
class Bundle:
    """A loaded (and by default hash-verified) bundle."""

    root: Path
    manifest: Dict[str, Any]

    @classmethod
    def load(cls, root: Union[str, Path], verify: bool = True) -> Bundle:
        root = Path(root)
        manifest = read_manifest(root)
        bundle = cls(root, manifest)
        if verify:
            problems = verify_files(root, manifest)
            if problems:
                raise JetyoloError(
                    f"bundle {root} fails verification: {problems[0]}"
                    + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                    + "; re-create it with `jetyolo export` or restore the original files"
                )
        return bundle

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def class_names(self) -> List[str]:
        return list(self.manifest["class_names"])

    @property
    def input_size(self) -> Tuple[int, int]:
        height, width = self.manifest["preprocess"]["size"]
        return int(height), int(width)

    def variant(self, name: str) -> Dict[str, Any]:
        variants = self.manifest["variants"]
        if name not in variants:
            raise JetyoloError(
                f"bundle {self.root} has no variant {name!r}; it has {sorted(variants)}"
                + ("; add it with `jetyolo calibrate`" if name.startswith("int8") else "")
            )
        return dict(variants[name])

    def max_batch(self, variant: str = "fp32") -> int:
        """Most frames per inference call of ``variant``: dim 0 of its manifest input shape
        (``jetyolo export --batch N``; 1 for older bundles without a shape)."""
        shape = self.variant(variant).get("input", {}).get("shape") or [1]
        return int(shape[0]) if isinstance(shape[0], int) and shape[0] >= 1 else 1

    def path(self, relative: str) -> Path:
        """``relative`` inside the bundle, refused when it is not a plain relative name or
        resolves (through a symlink) outside the bundle."""
        problem = name_problem(relative) or _inside_problem(self.root, relative)
        if problem:
            raise JetyoloError(f"bundle {self.root}: {problem}; re-create it with `jetyolo export`")
        return self.root / relative

    def model_path(self, variant: str = "fp32") -> Path:
        return self.path(self.variant(variant)["file"])

    def model_sha256(self, variant: str = "fp32") -> str:
        return str(self.manifest["files"][self.variant(variant)["file"]]["sha256"])

    @property
    def model_id(self) -> str:
        """Bundle name + ONNX sha256 prefix: what messages and engine caches call this model."""
        return f"{self.name}@{self.model_sha256('fp32')[:12]}"


def read_manifest(root: Path) -> Dict[str, Any]:
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise JetyoloError(
            f"bundle {root} is not a directory; pass the folder `jetyolo export --out` made"
        )
    if not manifest_path.is_file():
        raise JetyoloError(
            f"bundle {root} has no {MANIFEST}; pass the folder `jetyolo export --out` made"
        )
    if manifest_path.is_symlink():
        raise JetyoloError(
            f"bundle {root}: {MANIFEST} is a symbolic link; a bundle holds regular files only"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise JetyoloError(
            f"{manifest_path} is not valid JSON ({exc}); re-create the bundle"
        ) from exc
    problems = check_schema(manifest)
    if problems:
        raise JetyoloError(
            f"{manifest_path}: {problems[0]}; re-create the bundle with `jetyolo export`"
        )
    return dict(manifest)


def check_schema(manifest: Mapping[str, Any]) -> List[str]:
    """Problems with the manifest's structure, empty when it is well formed."""
    if not isinstance(manifest, Mapping):
        return ["manifest is not a JSON object"]
    problems = [f"missing key {key!r}" for key in REQUIRED_KEYS if key not in manifest]
    problems += [
        f"{key} must be a JSON object, not {type(manifest[key]).__name__}"
        for key in MAPPING_KEYS
        if key in manifest and not isinstance(manifest[key], Mapping)
    ]
    if problems:
        return problems
    if manifest["schema_version"] != SCHEMA_VERSION:
        problems.append(
            f"schema_version {manifest['schema_version']!r} is not {SCHEMA_VERSION} (this jetyolo)"
        )
    names = manifest["class_names"]
    if not (isinstance(names, list) and all(isinstance(name, str) for name in names)):
        problems.append("class_names must be a list of strings")
    problems += _variant_problems(manifest["variants"], manifest["files"])
    problems += _file_entry_problems(manifest["files"])
    size = manifest["preprocess"].get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(_positive_int(v) for v in size)):
        problems.append("preprocess.size must be [height, width] in pixels")
    if not isinstance(manifest["name"], str):
        problems.append("name must be a string")
    problems += _postprocess_problems(manifest["postprocess"])
    problems += _section_problems(manifest)
    return problems


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _fraction(value: Any) -> bool:
    """A finite number in [0, 1] (NaN fails every comparison, so it is refused here too)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def _postprocess_problems(post: Mapping[str, Any]) -> List[str]:
    """The thresholds the device runs with when the config gives none: checked before the run."""
    problems = [
        f"postprocess.{key} must be a number between 0 and 1, not {post[key]!r}"
        for key in ("conf", "iou")
        if key in post and not _fraction(post[key])
    ]
    if "max_det" in post and not _positive_int(post["max_det"]):
        problems.append(f"postprocess.max_det must be a whole number >= 1, not {post['max_det']!r}")
    return problems


def _section_problems(manifest: Mapping[str, Any]) -> List[str]:
    """Types of the optional sections the device reads (calibration, head, reference)."""
    problems = []
    for key in ("calibration", "head", "reference"):
        if key in manifest and not isinstance(manifest[key], Mapping):
            problems.append(f"{key} must be a JSON object, not {type(manifest[key]).__name__}")
    calibration = manifest.get("calibration")
    if isinstance(calibration, Mapping):
        if not isinstance(calibration.get("onnx_sha256", ""), str):
            problems.append("calibration.onnx_sha256 must be a string")
        caches = calibration.get("caches", {})
        if not isinstance(caches, (Mapping, list)):
            problems.append("calibration.caches must be a JSON object or a list")
        for key in ("fp16_layers", "uncached_tensors"):
            if not _strings(calibration.get(key, [])):
                problems.append(f"calibration.{key} must be a list of strings")
    head = manifest.get("head")
    if isinstance(head, Mapping) and not _strings(head.get("postprocess_nodes", [])):
        problems.append("head.postprocess_nodes must be a list of strings")
    return problems


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _variant_problems(variants: Mapping[str, Any], files: Mapping[str, Any]) -> List[str]:
    problems = [] if "fp32" in variants else ["variants has no 'fp32' entry"]
    for name, variant in variants.items():
        if not isinstance(variant, Mapping):
            problems.append(f"variant {name!r} must be a JSON object")
            continue
        problems += [
            f"variant {name!r} misses key {key!r}"
            for key in REQUIRED_VARIANT_KEYS
            if key not in variant
        ]
        problems += [
            f"variant {name!r}: {key} must be a JSON object"
            for key in ("input", "outputs")
            if key in variant and not isinstance(variant[key], Mapping)
        ]
        file = variant.get("file")
        if not isinstance(file, str) or file not in files:
            problems.append(
                f"variant {name!r} names {variant.get('file')!r}, which files does not list"
            )
    return problems


def _file_entry_problems(files: Mapping[str, Any]) -> List[str]:
    """Each ``files`` entry must be a plain relative name and carry the sha256 and size
    ``verify_files`` compares."""
    problems = [problem for problem in map(name_problem, files) if problem]
    return problems + [
        f"files entry {relative!r} needs a sha256 string and a size in bytes"
        for relative, entry in files.items()
        if not _file_entry_ok(entry)
    ]


def name_problem(relative: Any) -> Optional[str]:
    """Why ``relative`` is not a plain path inside a bundle (``model.onnx``, ``reference/x.json``),
    or None. Absolute paths, ``..``, ``.``, empty parts and backslashes are refused: the names
    come from an untrusted manifest and are joined to the bundle folder (and, by `service
    install`, to a rootfs)."""
    if not isinstance(relative, str) or not relative:
        return f"file name {relative!r} must be a non-empty string"
    parts = relative.split("/")
    if (
        PurePosixPath(relative).is_absolute()
        or "\\" in relative
        or "\0" in relative
        or any(part in ("", ".", "..") for part in parts)
    ):
        return (
            f"file name {relative!r} is not a plain relative path: it could lead outside the "
            "bundle"
        )
    return None


def _inside_problem(root: Path, relative: str) -> Optional[str]:
    """Why ``root/relative`` leaves ``root`` once symlinks are resolved, or None."""
    resolved_root = root.resolve()
    resolved = (root / relative).resolve()
    if resolved != resolved_root and resolved_root not in resolved.parents:
        return f"{relative} resolves to {resolved}, outside the bundle"
    return None


def link_problems(root: Path) -> List[str]:
    """Symbolic links and special files (fifos, devices, sockets) anywhere in the bundle folder:
    a bundle holds regular files and folders only, so a link cannot smuggle an outside file in."""
    problems = []
    for folder, dirs, names in os.walk(root):
        for name in [*dirs, *names]:
            path = Path(folder) / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                problems.append(f"{path.relative_to(root)} is a symbolic link")
            elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                problems.append(f"{path.relative_to(root)} is not a regular file")
    return problems


def _file_entry_ok(entry: Any) -> bool:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("sha256"), str):
        return False
    size = entry.get("size")
    return isinstance(size, int) and not isinstance(size, bool) and size >= 0


def verify_files(root: Path, manifest: Mapping[str, Any]) -> List[str]:
    """No links or special files in the bundle, and every listed file exists inside it with its
    recorded size and sha256; empty list when all is well."""
    problems = link_problems(root)
    for relative, entry in manifest["files"].items():
        path = root / relative
        outside = _inside_problem(root, relative)
        if outside:
            problems.append(outside)
        elif not path.is_file():
            problems.append(f"{relative} is missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(
                f"{relative} has {path.stat().st_size} bytes, manifest says {entry['size']}"
            )
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{relative} sha256 does not match the manifest")
    return problems


def write_new_bundle(
    out_dir: Union[str, Path],
    files: Mapping[str, Path],
    manifest: Dict[str, Any],
    force: bool = False,
) -> Bundle:
    """Create a whole bundle atomically: copy ``files`` (bundle-relative name -> source path) and a
    manifest with their hashes into a temp dir beside ``out_dir``, then rename it into place."""
    out_dir = Path(out_dir)
    prepare_output_dir(out_dir, force)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.resolve().parent))
    try:
        manifest = dict(manifest, files={})
        for relative, source in files.items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            manifest["files"][relative] = file_entry(target)
        problems = check_schema(manifest)
        if problems:
            raise ValueError(f"refusing to write a malformed manifest: {problems}")
        atomic_write_json(staging / MANIFEST, manifest)
        staging.chmod(0o755)  # mkdtemp makes it 0700; a bundle is meant to be read by a service
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Bundle(out_dir, manifest)


def add_files(
    bundle: Bundle,
    files: Mapping[str, Union[Path, bytes]],
    manifest_updates: Optional[Mapping[str, Any]] = None,
) -> Bundle:
    """Add or replace files in an existing bundle and merge ``manifest_updates`` (top-level keys;
    ``variants`` is merged per variant). Each file is renamed into place, the manifest last."""
    manifest = json.loads(json.dumps(bundle.manifest))
    for relative, source in files.items():
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        atomic_write_bytes(bundle.root / relative, data)
        manifest["files"][relative] = file_entry(bundle.root / relative)
    for key, value in (manifest_updates or {}).items():
        if key == "variants":
            manifest["variants"].update(value)
        else:
            manifest[key] = value
    problems = check_schema(manifest)
    if problems:
        raise ValueError(f"refusing to write a malformed manifest: {problems}")
    atomic_write_json(bundle.root / MANIFEST, manifest)
    return Bundle(bundle.root, manifest)
