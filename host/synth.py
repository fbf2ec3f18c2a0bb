"""Write a deterministic synthetic detection dataset (YOLO format) and, optionally, a video.

Each class is one shape in one colour, drawn on varied backgrounds (gradients, noise, grey
clutter), several objects per image, some overlapping, sizes from small to large. Easy enough for
yolo11n to learn in a few CPU epochs, varied enough that a model must actually learn it.
``--video`` writes an MP4 of the same objects moving (default 1920x1080) with a ground-truth
sidecar ``<video>.json`` (boxes per frame in frame pixels, each with its object's id, so a frame
sequence is each object's trajectory; objects cross and hide each other: ``visible``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import cv2
import numpy as np
import yaml

from device.errors import JetyoloError
from device.files import atomic_write_json, prepare_output_dir
from host._env import require

log = logging.getLogger(__name__)

# (name, BGR colour, shape): colour and shape both differ between classes.
CLASSES: List[Tuple[str, Tuple[int, int, int], str]] = [
    ("red_circle", (40, 40, 220), "circle"),
    ("green_square", (60, 190, 40), "square"),
    ("blue_triangle", (220, 90, 30), "triangle"),
    ("yellow_star", (30, 220, 230), "star"),
    ("magenta_cross", (200, 40, 200), "cross"),
    ("cyan_ring", (220, 220, 40), "ring"),
    ("orange_diamond", (20, 130, 250), "diamond"),
    ("white_hexagon", (245, 245, 245), "hexagon"),
]
MAX_CLASSES = len(CLASSES)


@dataclass
class SynthObject:
    class_id: int
    center: Tuple[float, float]
    size: float  # side of the bounding square, pixels


def _polygon(shape: str, center: Tuple[float, float], size: float) -> np.ndarray:
    cx, cy = center
    half = size / 2
    if shape in ("square",):
        angles = np.deg2rad([45, 135, 225, 315])
        radius = half * np.sqrt(2)
    elif shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        radius = half
    elif shape == "diamond":
        angles = np.deg2rad([-90, 0, 90, 180])
        radius = half
    elif shape == "hexagon":
        angles = np.deg2rad(np.arange(0, 360, 60))
        radius = half
    elif shape == "star":
        angles = np.deg2rad(np.arange(-90, 270, 36))
        radius = np.where(np.arange(10) % 2 == 0, half, half * 0.45)
    else:
        raise ValueError(shape)
    points = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
    if shape == "square":
        points = np.clip(points, [cx - half, cy - half], [cx + half, cy + half])
    return points.astype(np.int32)


def draw_object(image: np.ndarray, obj: SynthObject) -> Tuple[float, float, float, float]:
    """Draw ``obj`` and return its box (x1, y1, x2, y2) clipped to the image."""
    _, colour, shape = CLASSES[obj.class_id]
    cx, cy = obj.center
    half = obj.size / 2
    centre_int = (round(cx), round(cy))
    if shape == "circle":
        cv2.circle(image, centre_int, round(half), colour, -1, cv2.LINE_AA)
    elif shape == "ring":
        thickness = max(2, round(obj.size * 0.18))
        cv2.circle(image, centre_int, round(half - thickness / 2), colour, thickness, cv2.LINE_AA)
    elif shape == "cross":
        arm = max(2, round(obj.size * 0.15))
        cv2.rectangle(
            image,
            (round(cx - half), round(cy - arm)),
            (round(cx + half), round(cy + arm)),
            colour,
            -1,
        )
        cv2.rectangle(
            image,
            (round(cx - arm), round(cy - half)),
            (round(cx + arm), round(cy + half)),
            colour,
            -1,
        )
    else:
        cv2.fillPoly(image, [_polygon(shape, obj.center, obj.size)], colour, cv2.LINE_AA)
    return _clip_box(object_box(obj), image)


def object_box(obj: SynthObject) -> Tuple[float, float, float, float]:
    """The tight box (x1, y1, x2, y2) of ``obj``, unclipped."""
    shape = CLASSES[obj.class_id][2]
    if shape in ("circle", "ring", "cross"):
        half = obj.size / 2
        return (
            obj.center[0] - half,
            obj.center[1] - half,
            obj.center[0] + half,
            obj.center[1] + half,
        )
    points = _polygon(shape, obj.center, obj.size)
    (left, top), (right, bottom) = points.min(axis=0), points.max(axis=0)
    return (float(left), float(top), float(right), float(bottom))


def _clip_box(
    box: Tuple[float, float, float, float], image: np.ndarray
) -> Tuple[float, float, float, float]:
    height, width = image.shape[:2]
    x1, y1, x2, y2 = box
    return (max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2))


def background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A varied background: a two-colour gradient, noise and grey clutter (never class colours)."""
    start, end = rng.integers(30, 200, size=(2, 3))
    ramp = np.linspace(0, 1, width if rng.random() < 0.5 else height, dtype=np.float32)
    if len(ramp) == width:
        ramp2d = np.tile(ramp, (height, 1))
    else:
        ramp2d = np.tile(ramp[:, None], (1, width))
    image = start + (end - start) * ramp2d[..., None]
    image += rng.normal(0, rng.uniform(2, 12), size=image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)
    for _ in range(rng.integers(0, 6)):
        grey = int(rng.integers(40, 200))
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p2 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.line(image, p1, p2, (grey, grey, grey), int(rng.integers(1, max(2, width // 80))))
    return image


def random_objects(
    rng: np.random.Generator,
    classes: int,
    width: int,
    height: int,
    sizes: Tuple[float, float] = (0.08, 0.35),
) -> List[SynthObject]:
    """1-6 objects, sizes a fraction ``sizes`` of the short side; overlaps up to about a third."""
    objects: List[SynthObject] = []
    short = min(width, height)
    for _ in range(int(rng.integers(1, 7))):
        for _attempt in range(20):
            size = float(rng.uniform(*sizes) * short)
            center = (
                float(rng.uniform(size / 2, width - size / 2)),
                float(rng.uniform(size / 2, height - size / 2)),
            )
            candidate = SynthObject(int(rng.integers(0, classes)), center, size)
            if all(_overlap(candidate, other) < 0.35 for other in objects):
                objects.append(candidate)
                break
    return objects


def _overlap(a: SynthObject, b: SynthObject) -> float:
    """Intersection over the smaller box's area."""
    ax1, ay1, ax2, ay2 = (
        a.center[0] - a.size / 2,
        a.center[1] - a.size / 2,
        a.center[0] + a.size / 2,
        a.center[1] + a.size / 2,
    )
    bx1, by1, bx2, by2 = (
        b.center[0] - b.size / 2,
        b.center[1] - b.size / 2,
        b.center[0] + b.size / 2,
        b.center[1] + b.size / 2,
    )
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    return inter / min(a.size**2, b.size**2)


def render(
    rng: np.random.Generator, classes: int, width: int, height: int
) -> Tuple[np.ndarray, List[Tuple[int, Tuple[float, float, float, float]]]]:
    image = background(rng, width, height)
    labelled = []
    for obj in random_objects(rng, classes, width, height):
        labelled.append((obj.class_id, draw_object(image, obj)))
    return image, labelled


def _yolo_line(class_id: int, box: Sequence[float], width: int, height: int) -> str:
    x1, y1, x2, y2 = box
    return (
        f"{class_id} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} "
        f"{(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}"
    )


ImageSize = Union[int, Tuple[int, int]]  # a square side, or (width, height)


def image_size(imgsz: ImageSize) -> Tuple[int, int]:
    return (imgsz, imgsz) if isinstance(imgsz, int) else (int(imgsz[0]), int(imgsz[1]))


def write_split(
    root: Path, split: str, count: int, classes: int, imgsz: ImageSize, rng: np.random.Generator
) -> None:
    images, labels = root / split / "images", root / split / "labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    width, height = image_size(imgsz)
    for index in range(count):
        image, labelled = render(rng, classes, width, height)
        stem = f"{split}_{index:05d}"
        cv2.imwrite(str(images / f"{stem}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 92])
        lines = [_yolo_line(cls, box, width, height) for cls, box in labelled]
        (labels / f"{stem}.txt").write_text("\n".join(lines) + "\n")


def make_dataset(
    out: Path, classes: int, train: int, val: int, imgsz: ImageSize, seed: int,
    force: bool = False,
) -> Path:
    """Write the dataset into ``out`` atomically and return the path of its data.yaml;
    ``imgsz``: square images of that side, or (width, height)."""
    if not 1 <= classes <= MAX_CLASSES:
        raise JetyoloError(f"--classes must be between 1 and {MAX_CLASSES}, got {classes}")
    if train < 1 or val < 1 or min(image_size(imgsz)) < 32:
        raise JetyoloError("--train and --val must be >= 1 and --imgsz >= 32")
    prepare_output_dir(out, force)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.resolve().parent))
    try:
        rng = np.random.default_rng(seed)
        write_split(staging, "train", train, classes, imgsz, rng)
        write_split(staging, "valid", val, classes, imgsz, rng)
        data = {
            "train": "train/images",
            "val": "valid/images",
            "nc": classes,
            "names": [name for name, _, _ in CLASSES[:classes]],
        }
        (staging / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out / "data.yaml"


def faststart(source: Path, target: Path) -> None:
    """Remux the MP4 ``source`` (OpenCV writes its index, the moov atom, at the end: a cut file
    has none and nothing in it plays) into ``target`` with the index first, as cameras'
    recorders do, so a truncated copy still plays up to the cut. Stream copy: the frames are
    OpenCV's bytes. Through a temp file and a rename."""
    av = require("av", "data synth")
    partial = target.with_name(f".{target.name}.faststart")
    try:
        with av.open(str(source)) as read, av.open(
            str(partial), "w", format="mp4", options={"movflags": "+faststart"}
        ) as write:
            video = read.streams.video[0]
            copied = write.add_stream_from_template(video)
            for packet in read.demux(video):
                if packet.dts is not None:  # the demuxer's final flush packet carries no data
                    packet.stream = copied
                    write.mux(packet)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def make_video(
    path: Path, classes: int, size: Tuple[int, int], frames: int, seed: int, fps: int = 30
) -> Path:
    """Write an MP4 of objects moving and bouncing, and ``<path>.json``: the boxes per frame."""
    width, height = size
    check_video_args(classes, size, frames)
    rng = np.random.default_rng(seed + 7919)
    scene = background(rng, width, height)
    # A 16:9 frame letterboxed to a square model input shrinks objects by width/imgsz; 15% of the
    # short side keeps the smallest object as large, in model pixels, as the dataset's smallest.
    objects = random_objects(rng, classes, width, height, sizes=(0.15, 0.35))
    speeds = rng.uniform(-0.012, 0.012, size=(len(objects), 2)) * np.array([width, height])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_video = path.with_name(f".{path.stem}.tmp{path.suffix}")
    writer = cv2.VideoWriter(str(tmp_video), cv2.VideoWriter.fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise JetyoloError(f"OpenCV cannot write MP4 to {path}: its build lacks an mp4v encoder")
    truth = []
    try:
        for index in range(frames):
            frame = scene.copy()
            boxes = []
            for obj in objects:
                box = draw_object(frame, obj)
                boxes.append([round(v, 1) for v in box] + [obj.class_id])
            writer.write(frame)
            visible = [round(v, 3) for v in visible_fractions(objects, width, height)]
            truth.append({"index": index, "ids": list(range(len(objects))), "boxes": boxes,
                          "visible": visible})
            for obj, speed in zip(objects, speeds):
                _move(obj, speed, width, height)
    except BaseException:
        writer.release()
        tmp_video.unlink(missing_ok=True)
        raise
    writer.release()
    try:
        faststart(tmp_video, path)
    finally:
        tmp_video.unlink(missing_ok=True)
    names = [name for name, _, _ in CLASSES[:classes]]
    atomic_write_json(
        path.with_suffix(".json"),
        {
            "video": path.name,
            "size": [width, height],
            "fps": fps,
            "class_names": names,
            "box_format": "x1,y1,x2,y2,class_id (frame pixels)",
            "ids": "per box, the object's identity: the same object keeps its id in every frame",
            "objects": [{"id": i, "class_id": obj.class_id} for i, obj in enumerate(objects)],
            "visible": "per box, the fraction of the object not hidden by objects drawn later",
            "frames": truth,
        },
    )
    return path


def check_video_args(classes: int, size: Tuple[int, int], frames: int) -> None:
    width, height = size
    if not 1 <= classes <= MAX_CLASSES:
        raise JetyoloError(f"--classes must be between 1 and {MAX_CLASSES}, got {classes}")
    if frames < 1 or min(width, height) < 32:
        raise JetyoloError(
            f"--frames must be >= 1 and --video-size at least 32x32, "
            f"got {frames} frames, {width}x{height}"
        )


def visible_fractions(objects: Sequence[SynthObject], width: int, height: int) -> List[float]:
    """For each object, the fraction of its pixels that objects drawn after it leave visible.

    Moving objects cross each other; ground truth keeps every box, and evaluations can skip the
    ones mostly hidden. Each object is drawn at full resolution in a canvas the size of its box.
    """
    fractions = []
    for index, obj in enumerate(objects):
        x1, y1, x2, y2 = (round(v) for v in object_box(obj))
        fractions.append(
            _visible_in_box(obj, objects[index + 1 :], (x1, y1, x2, y2), width, height)
        )
    return fractions


def _visible_in_box(
    obj: SynthObject,
    later: Sequence[SynthObject],
    box: Tuple[int, int, int, int],
    width: int,
    height: int,
) -> float:
    x1, y1, x2, y2 = max(box[0], 0), max(box[1], 0), min(box[2], width), min(box[3], height)
    if x2 <= x1 or y2 <= y1:
        return 0.0

    def mask_of(items: Sequence[SynthObject]) -> np.ndarray:
        canvas = np.zeros((y2 - y1, x2 - x1, 3), np.uint8)
        for item in items:
            shifted = SynthObject(
                item.class_id, (item.center[0] - x1, item.center[1] - y1), item.size
            )
            draw_object(canvas, shifted)
        return np.asarray(canvas.any(axis=2))

    own, hidden = mask_of([obj]), mask_of(later)
    area = int(own.sum())
    return float((own & ~hidden).sum()) / area if area else 0.0


def _move(obj: SynthObject, speed: np.ndarray, width: int, height: int) -> None:
    half = obj.size / 2
    x, y = obj.center[0] + speed[0], obj.center[1] + speed[1]
    if not half <= x <= width - half:
        speed[0] = -speed[0]
        x = min(max(x, half), width - half)
    if not half <= y <= height - half:
        speed[1] = -speed[1]
        y = min(max(y, half), height - half)
    obj.center = (x, y)


def _parse_size(text: str, flag: str = "--video-size") -> Tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise JetyoloError(f"{flag} must look like 1920x1080, got {text!r}") from None
    return width, height


def _side(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise JetyoloError(f"--imgsz must be a number of pixels or WxH, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "out", type=Path, help="output directory (created; must be empty unless --force)"
    )
    parser.add_argument(
        "--classes", type=int, default=4, help=f"number of classes, 1..{MAX_CLASSES}"
    )
    parser.add_argument("--train", type=int, default=200, help="training images")
    parser.add_argument("--val", type=int, default=50, help="validation images")
    parser.add_argument("--imgsz", default="320",
                        help="image side in pixels, or WxH for rectangular images (640x360)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--video", type=Path, help="also write an MP4 here (+ .json ground truth)")
    parser.add_argument("--video-size", default="1920x1080", help="WxH of the video")
    parser.add_argument("--frames", type=int, default=150, help="frames in the video")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")


def run(args: argparse.Namespace) -> int:
    video_size = _parse_size(args.video_size)
    if args.video:  # before writing anything
        check_video_args(args.classes, video_size, args.frames)
    imgsz: ImageSize = _parse_size(args.imgsz, "--imgsz") if "x" in args.imgsz.lower() \
        else _side(args.imgsz)
    data_yaml = make_dataset(
        args.out, args.classes, args.train, args.val, imgsz, args.seed, args.force
    )
    print(
        f"dataset: {data_yaml} ({args.train} train, {args.val} val, {args.classes} classes, "
        f"{args.imgsz}px)"
    )
    if args.video:
        video = make_video(args.video, args.classes, video_size, args.frames, args.seed)
        print(
            f"video: {video} ({args.frames} frames, {args.video_size}) "
            f"+ {video.with_suffix('.json').name}"
        )
    return 0
