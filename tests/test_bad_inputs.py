"""Bad input across the verbs, one row per class (issue 17): each row runs the real `jetyolo`
command in a subprocess and asserts one `jetyolo: error:` line that names the problem, a non-zero
exit, no traceback, nothing partial left behind, and no secret anywhere in stdout or stderr
(logging, FFmpeg and paho included: a subprocess sees all of it).

A row's ``setup`` gets a scratch folder (and the shared bundle) and returns the command's
arguments; ``expect`` is a piece of the error line; ``leftovers`` are globs (relative to the
scratch folder) that must match nothing afterwards; ``side_effect`` a path that must not exist.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import pytest

SECRET = "hunter2-s3cret"  # the password every URL/config row carries; never in any output
TIMEOUT_S = 300


@dataclass(frozen=True)
class Scratch:
    root: Path
    bundle: Path  # a private copy of the session bundle, free to damage
    data: Path  # the session's synthetic data.yaml (read-only)


@dataclass(frozen=True)
class Row:
    id: str
    setup: Callable[[Scratch], List[str]]
    expect: str
    leftovers: List[str] = field(default_factory=list)
    side_effect: Optional[str] = None  # relative to the scratch folder


def jetyolo(args: List[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-c", "import sys; from device.cli import main; sys.exit(main())"]
    return subprocess.run(
        [*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )


# --- setups -----------------------------------------------------------------------------


def _edit_manifest(bundle: Path, change: Callable[[dict], None]) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _escaping_variant(s: Scratch) -> List[str]:
    evil = s.root / "evil.onnx"
    shutil.copyfile(s.bundle / "model.onnx", evil)

    def change(manifest: dict) -> None:
        manifest["files"]["../evil.onnx"] = manifest["files"]["model.onnx"]
        manifest["variants"]["fp32"]["file"] = "../evil.onnx"

    _edit_manifest(s.bundle, change)
    return ["run", str(s.bundle), "--source", str(s.root / "none.mp4"), "--backend", "onnxruntime"]


def _absolute_entry(s: Scratch) -> List[str]:
    _edit_manifest(
        s.bundle, lambda m: m["files"].update({"/etc/hostname": m["files"]["model.onnx"]})
    )
    return ["bundle", "verify", str(s.bundle)]


def _payload_pt(path: Path, marker: Path) -> Path:
    """A torch checkpoint whose unpickling creates ``marker`` (an os.mkdir __reduce__)."""
    import torch

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.mkdir, (str(marker),))

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": Payload(), "epoch": 3}, path)
    return path


def _payload_export(s: Scratch) -> List[str]:
    weights = _payload_pt(s.root / "payload.pt", s.root / "pwned")
    return ["export", str(weights), "--out", str(s.root / "out")]


def _payload_resume(s: Scratch) -> List[str]:
    _payload_pt(s.root / "runs" / "r" / "weights" / "last.pt", s.root / "pwned")
    return ["train", "--data", str(s.data), "--project", str(s.root / "runs"), "--name", "r",
            "--resume"]


def _video_as_weights(s: Scratch) -> List[str]:
    video = s.root / "clip.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(64))
    return ["export", str(video), "--out", str(s.root / "out")]


def _rtdetr(s: Scratch) -> List[str]:
    return ["train", "--data", str(s.data), "--model", "rtdetr-l.yaml", "--project",
            str(s.root / "runs")]


def _empty_video(s: Scratch) -> List[str]:
    (s.root / "empty.mp4").write_bytes(b"")
    return ["run", str(s.bundle), "--source", str(s.root / "empty.mp4"), "--backend",
            "onnxruntime", "--sink", f"jsonl:{s.root / 'out.jsonl'}"]


def _truncated_video(s: Scratch) -> List[str]:
    import cv2
    import numpy as np

    path = s.root / "cut.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), 10, (64, 48))
    noise = np.random.default_rng(0)
    for _ in range(10):
        writer.write(noise.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    writer.release()
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return ["run", str(s.bundle), "--source", str(path), "--backend", "onnxruntime"]


def _non_images(s: Scratch) -> List[str]:
    folder = s.root / "imgs"
    folder.mkdir()
    for index in range(3):
        (folder / f"{index}.jpg").write_text("not a jpeg")
    return ["run", str(s.bundle), "--source", str(folder), "--backend", "onnxruntime"]


def _rehash(bundle: Path, relative: str) -> None:
    """Write the manifest entry of ``relative`` for its current bytes: an attacker's move."""
    import hashlib

    data = (bundle / relative).read_bytes()
    entry = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    _edit_manifest(bundle, lambda m: m["files"].update({relative: entry}))


def _foreign_reference(s: Scratch) -> List[str]:
    (s.bundle / "reference" / "outputs.json").write_text('{"not": "polygraphy"}')
    _rehash(s.bundle, "reference/outputs.json")
    return ["verify", str(s.bundle), "--backend", "onnxruntime"]


def _args(*args: str) -> Callable[[Scratch], List[str]]:
    """A row whose arguments need only the bundle (``{bundle}``) and the data (``{data}``)."""

    def setup(s: Scratch) -> List[str]:
        return [arg.format(bundle=s.bundle, data=s.data, root=s.root) for arg in args]

    return setup


def _bad_manifest_value(s: Scratch) -> List[str]:
    _edit_manifest(s.bundle, lambda m: m["postprocess"].update(conf="high"))
    return ["run", str(s.bundle), "--source", str(s.data.parent / "valid" / "images"),
            "--backend", "onnxruntime", "--sink", f"jsonl:{s.root / 'out.jsonl'}"]


def _class_names(count: int) -> Callable[[Scratch], List[str]]:
    """The manifest names ``count`` classes for the 4-class fixture model (hashes untouched:
    the manifest itself is not hashed)."""

    def setup(s: Scratch) -> List[str]:
        names = [f"class{index}" for index in range(count)]
        _edit_manifest(s.bundle, lambda m: m.update(class_names=names))
        return ["run", str(s.bundle), "--source", str(s.data.parent / "valid" / "images"),
                "--backend", "onnxruntime", "--spool-dir", str(s.root / "spool")]

    return setup


def _config_with_secret(s: Scratch) -> List[str]:
    config = s.root / "run.yaml"
    config.write_text(f"bundle: {s.bundle}\nsource: {s.data.parent}/valid/images\n"
                      f"sinks: ['mqtt://cam:{SECRET}@broker:99999']\n")
    return ["run", "--config", str(config), "--backend", "onnxruntime"]


def _config(text: str) -> Callable[[Scratch], List[str]]:
    def setup(s: Scratch) -> List[str]:
        config = s.root / "run.yaml"
        config.write_text(f"bundle: {s.bundle}\nsource: {s.data.parent}/valid/images\n{text}")
        return ["run", "--config", str(config), "--backend", "onnxruntime"]

    return setup


def _symlinked_model(s: Scratch) -> List[str]:
    outside = s.root / "outside.onnx"
    (s.bundle / "model.onnx").rename(outside)
    (s.bundle / "model.onnx").symlink_to(outside)
    return ["bundle", "verify", str(s.bundle)]


ROWS = [
    # a variant file that climbs out of the bundle is never run
    Row("bundle-variant-escapes", _escaping_variant, "it could lead outside the bundle"),
    # an absolute manifest entry fails `bundle verify` instead of "OK"
    Row("bundle-absolute-entry", _absolute_entry, "'/etc/hostname' is not a plain relative path"),
    # a .pt whose unpickling runs code: refused by the safe load, the code never runs
    Row("weights-payload-export", _payload_export, "is not an ultralytics model",
        leftovers=[".out*", "out"], side_effect="pwned"),
    # the same payload as the last.pt of `train --resume`
    Row("weights-payload-resume", _payload_resume, "is not an ultralytics model",
        side_effect="pwned"),
    # verify with reference files that are not polygraphy JSON (hashes rewritten to match)
    Row("verify-foreign-reference", _foreign_reference, "its reference data is not what"),
    # credentials: never echoed, whatever is wrong with the URL or where it came from
    Row("secret-sink-bad-port",
        _args("run", "{bundle}", "--source", "{root}", "--sink",
              f"mqtt://cam:{SECRET}@broker:99999"),
        "mqtt://cam:***@broker:99999"),
    Row("secret-sink-with-path",
        _args("run", "{bundle}", "--source", "{root}", "--sink",
              f"mqtt://cam:{SECRET}@broker:1883/topic"),
        "unexpected path"),
    Row("secret-config-file", _config_with_secret, "mqtt://cam:***@broker:99999"),
    Row("secret-rtsp-source",
        _args("run", "{bundle}", "--source", f"rtsp://admin:{SECRET}@127.0.0.1:9/live",
              "--source-timeout", "0", "--backend", "onnxruntime"),
        "rtsp://admin:***@127.0.0.1:9/live"),
    # a link in a bundle, even to a file with the right hash
    Row("bundle-symlink", _symlinked_model, "model.onnx is a symbolic link"),
    # config: a key twice, NaN from YAML
    Row("config-key-twice", _config("conf: 0.3\nconf: 0.9\n"), "key 'conf' is given twice"),
    Row("config-nan", _config("iou: .nan\n"), "iou: nan is not a finite number"),
    # batching: a batch the bundle's engine cannot take, a timeout that is no wait
    Row("batch-above-engine", _config("batch_size: 4\n"),
        "batch_size 4 is above the engine's batch 1; lower batch_size to 1 or less, or export"),
    Row("batch-timeout-nan", _config("batch_timeout_ms: .nan\n"),
        "batch_timeout_ms: nan is not a finite number"),
    Row("batch-timeout-negative", _config("batch_timeout_ms: -1\n"),
        "batch_timeout_ms: -1.0 is below the minimum 0"),
    # a class filter naming a class the bundle does not have
    Row("classes-unknown", _config("classes: [zebra]\n"), "class 'zebra' is not in the bundle"),
    # a folder where the data.yaml belongs
    Row("data-check-folder", _args("data", "check", "{root}"), "is a folder, not a data.yaml"),
    # a word for a number: one line, not 22 lines of usage
    Row("flag-not-a-number", _args("run", "{bundle}", "--conf", "high"), "--conf"),
    # NaN passes every range check unless refused where it is read
    Row("flag-nan", _args("train", "--data", "{data}", "--warmup-epochs", "nan"),
        "'nan' is not a finite number"),
    Row("flag-nan-verify", _args("verify", "{bundle}", "--min-map", "nan"),
        "'nan' is not a finite number"),
    # a manifest value of the wrong type: refused at load, before any sink hears "online"
    Row("manifest-wrong-type", _bad_manifest_value, "postprocess.conf must be a number",
        leftovers=["out.jsonl"]),
    # class_names shorter or longer than the model's classes: refused by the run itself too
    Row("run-class-names-short", _class_names(3), "the model scores 4 classes, class_names has 3"),
    Row("run-class-names-long", _class_names(5), "the model scores 4 classes, class_names has 5"),
    # a video passed as weights: one line, not "'str' object has no attribute 'stride'"
    Row("export-video-as-weights", _video_as_weights, "is not ultralytics weights (.mp4",
        leftovers=[".out*", "out"]),
    # RT-DETR: said plainly, not "is not an ultralytics model"
    Row("train-rtdetr", _rtdetr, "RT-DETR models are not supported", leftovers=["runs"]),
    # an empty file as --source: what is wrong with it, not "check that it exists"
    Row("source-empty-file", _empty_video, "is not a readable video: the file is empty",
        leftovers=["out.jsonl"]),
    # a recording cut short (index at the end): FFmpeg's "moov atom not found" explained
    Row("source-truncated-mp4", _truncated_video, "truncated MP4/MOV: its index is missing"),
    # a folder of non-images named .jpg: an error, not "frames 0" and exit 0
    Row("source-no-decodable-frame", _non_images, "none of its 3 images decodes"),
]


@pytest.fixture()
def scratch(tmp_path: Path, bundle_dir: Path, synth_dataset: Path) -> Scratch:
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bundle)
    return Scratch(tmp_path, bundle, synth_dataset)


def test_every_row_has_its_own_id() -> None:
    assert len({row.id for row in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input_is_one_clear_line(row: Row, scratch: Scratch) -> None:
    args = row.setup(scratch)
    done = jetyolo(args, scratch.root)
    output = done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("jetyolo: error:")]
    assert done.returncode != 0, output
    assert "Traceback" not in output, output
    assert len(errors) == 1, output
    assert row.expect in errors[0], errors[0]
    assert SECRET not in output
    for pattern in row.leftovers:
        assert not list(scratch.root.glob(pattern)), f"{pattern} left behind"
    if row.side_effect:
        assert not (scratch.root / row.side_effect).exists(), "the payload ran"
