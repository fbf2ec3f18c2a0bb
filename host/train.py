"""Train YOLO11 with ultralytics: from a .pt (transfer learning) or a model yaml (from scratch).

Checks the dataset first (the same code as `jetyolo data check`), resumes an interrupted run from
its last.pt with --resume, and ends by printing precision, recall, mAP50 and mAP50-95 and where
best.pt, results.csv and the plots are.
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from device.argtypes import finite_float
from device.errors import JetyoloError
from host._env import ultralytics_offline

log = logging.getLogger(__name__)
METRIC_KEYS = {
    "precision": "metrics/precision(B)",
    "recall": "metrics/recall(B)",
    "mAP50": "metrics/mAP50(B)",
    "mAP50-95": "metrics/mAP50-95(B)",
}


@dataclass
class TrainResult:
    run_dir: Path
    best: Path
    last: Path
    metrics: Dict[str, float]


MODEL_SUFFIXES = (".pt", ".yaml", ".yml")
# RT-DETR is refused, not half-supported: its output is a third contract ([B, 300, 4+nc]: boxes
# normalised to 0..1, no NMS) that nothing on the device decodes or tests; it needs ultralytics'
# RTDETR class and its own training recipe; and its smallest model (rtdetr-l, 32 M parameters)
# is far from the Jetson-class real time jetyolo targets. One message, for every verb.
RTDETR_UNSUPPORTED = (
    "RT-DETR models are not supported by jetyolo (its [B,300,4+nc] normalised, NMS-free output "
    "is a contract the device does not decode, and rtdetr-l is 32 M parameters); train a YOLO "
    "detect model instead, e.g. --model yolo11n.yaml or yolo26n.yaml"
)


def load_detect_model(model: str, verb: str = "train") -> Any:
    """A ultralytics YOLO detect model from a .pt or a model yaml, or a clear error."""
    suffix = Path(model).suffix.lower()
    if suffix not in MODEL_SUFFIXES:
        raise JetyoloError(
            f"{model} is not ultralytics weights ({suffix or 'no suffix'}, not .pt) or a model "
            "yaml; pass the best.pt `jetyolo train` printed or a yaml such as yolo11n.yaml"
        )
    ultralytics = ultralytics_offline(verb)
    is_yaml = suffix in (".yaml", ".yml")
    if is_yaml and "rtdetr" in Path(model).name.lower():
        raise JetyoloError(f"{model}: {RTDETR_UNSUPPORTED}")
    if not is_yaml and not Path(model).is_file():
        raise JetyoloError(
            f"model {model} does not exist; pass a .pt you trained or a yaml such as yolo11n.yaml"
        )
    try:
        yolo = ultralytics.YOLO(model)
    except Exception as exc:  # ultralytics raises many types for a bad file
        raise JetyoloError(
            f"{model} is not an ultralytics model ({_first_line(exc)}); pass a .pt saved by "
            "ultralytics training or a model yaml such as yolo11n.yaml"
        ) from exc
    if type(yolo.model).__name__.startswith("RTDETR"):  # YOLO() loads an RT-DETR .pt silently
        raise JetyoloError(f"{model}: {RTDETR_UNSUPPORTED}")
    if yolo.task != "detect":
        raise JetyoloError(f"{model} is a {yolo.task!r} model; jetyolo needs a YOLO detect model")
    return yolo


def _first_line(exc: Exception) -> str:
    """ultralytics' multi-line messages as one line, without its 'ERROR ❌' prefix."""
    text = (str(exc).strip().splitlines() or [""])[0]
    text = re.sub(r"^ERROR\W*", "", text)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def train(
    data: Path,
    model: str = "yolo11n.yaml",
    epochs: int = 50,
    imgsz: int = 640,
    batch: int = 16,
    freeze: Optional[int] = None,
    device: str = "cpu",
    name: str = "train",
    project: Path = Path("runs"),
    resume: bool = False,
    seed: int = 0,
    *,
    optimizer: str = "auto",
    lr0: Optional[float] = None,
    warmup_epochs: Optional[float] = None,
) -> TrainResult:
    check_train_args(epochs, imgsz, batch)
    tuning = fine_tuning_args(optimizer, lr0, warmup_epochs)
    data = checked_data_yaml(data)
    run_dir = project.resolve() / name
    last = run_dir / "weights" / "last.pt"
    if resume:
        if not last.is_file():
            raise JetyoloError(
                f"--resume: no {last} to resume from; drop --resume to start run {name!r}"
            )
        yolo = load_detect_model(str(last))  # ultralytics' safe load, like any other .pt
        _require_unfinished(yolo.ckpt, last, name)
        # The checkpoint's train_args would choose the dataset and the folder written to: a
        # last.pt from elsewhere (or crafted) must not. Both are overrides ultralytics accepts.
        yolo.train(resume=True, data=str(data), save_dir=str(run_dir))
    else:
        yolo = load_detect_model(model)
        yolo.train(
            data=str(data),
            epochs=epochs,
            imgsz=imgsz,
            batch=batch,
            freeze=freeze,
            device=device,
            project=str(project.resolve()),
            name=name,
            exist_ok=True,
            seed=seed,
            deterministic=True,
            workers=0 if device == "cpu" else 8,
            amp=device != "cpu",
            plots=True,
            **tuning,
        )
    trainer = yolo.trainer
    run_dir = Path(trainer.save_dir)
    metrics = {
        short: float(trainer.metrics.get(key, float("nan"))) for short, key in METRIC_KEYS.items()
    }
    weights = run_dir / "weights"
    return TrainResult(run_dir, weights / "best.pt", weights / "last.pt", metrics)


def fine_tuning_args(
    optimizer: str, lr0: Optional[float], warmup_epochs: Optional[float]
) -> Dict[str, Any]:
    """ultralytics arguments for the optimizer; None means ultralytics' default. A short
    fine-tune from a trained .pt wants a small fixed learning rate and no warm-up (ultralytics'
    3-epoch warm-up starts biases at lr 0.1, which undoes a trained head in a 3-epoch run)."""
    if lr0 is not None and optimizer == "auto":
        raise JetyoloError(
            "--lr0 needs --optimizer (SGD, Adam, AdamW, ...): ultralytics' auto optimizer picks "
            "its own learning rate and would ignore --lr0"
        )
    if lr0 is not None and not 0 < lr0 < 1:
        raise JetyoloError(f"--lr0 must be between 0 and 1, got {lr0}")
    if warmup_epochs is not None and warmup_epochs < 0:
        raise JetyoloError(f"--warmup-epochs must be 0 or more, got {warmup_epochs}")
    tuning: Dict[str, Any] = {"optimizer": optimizer}
    if lr0 is not None:
        tuning["lr0"] = lr0
    if warmup_epochs is not None:
        tuning["warmup_epochs"] = warmup_epochs
    return tuning


def check_train_args(epochs: int, imgsz: int, batch: int) -> None:
    """What ultralytics would refuse with a traceback (or deep inside a run), refused first."""
    if epochs < 1:
        raise JetyoloError(f"--epochs must be at least 1, got {epochs}")
    if imgsz < 32:
        raise JetyoloError(f"--imgsz must be at least 32 (the model stride), got {imgsz}")
    if batch == 0 or batch < -1:
        raise JetyoloError(
            f"--batch must be at least 1 (or -1: ultralytics' AutoBatch), got {batch}"
        )


def _require_unfinished(checkpoint: Any, last: Path, name: str) -> None:
    """ultralytics asserts deep inside train() when a run already finished; say it up front."""
    if not isinstance(checkpoint, dict) or checkpoint.get("epoch", -1) < 0:
        raise JetyoloError(
            f"--resume: run {name!r} finished all its epochs, nothing to resume; start a new run "
            f"from {last.with_name('best.pt')} (--model) without --resume"
        )


def checked_data_yaml(data: Path) -> Path:
    """The data.yaml to train on: checked, and the repaired copy when paths had to be fixed."""
    from host.dataset import check_dataset

    report = check_dataset(data)
    report.raise_if_errors()
    for change in report.repairs:
        log.info("data check: repaired %s", change)
    if report.data_yaml != data:
        log.info("data check: training on %s (%s is unchanged)", report.data_yaml, data.name)
    if report.warnings:
        log.info(
            "data check: %d warnings (`jetyolo data check %s` lists them)",
            len(report.warnings),
            data,
        )
    return report.data_yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="dataset data.yaml")
    parser.add_argument("--model", default="yolo11n.yaml", help="start from this .pt or model yaml")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--freeze", type=int, default=None, help="freeze the first N layers")
    parser.add_argument("--device", default="cpu", help="cpu, or a CUDA index such as 0")
    parser.add_argument("--name", default="train", help="run name under --project")
    parser.add_argument("--project", type=Path, default=Path("runs"), help="where runs are written")
    parser.add_argument("--resume", action="store_true", help="resume run --name from its last.pt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--optimizer", default="auto", help="SGD, Adam, AdamW, ... (default: ultralytics' auto)"
    )
    parser.add_argument(
        "--lr0", type=finite_float, help="initial learning rate (needs --optimizer)"
    )
    parser.add_argument(
        "--warmup-epochs", type=finite_float, help="learning-rate warm-up epochs (ultralytics: 3)"
    )


def run(args: argparse.Namespace) -> int:
    result = train(
        args.data,
        args.model,
        args.epochs,
        args.imgsz,
        args.batch,
        args.freeze,
        args.device,
        args.name,
        args.project,
        args.resume,
        args.seed,
        optimizer=args.optimizer,
        lr0=args.lr0,
        warmup_epochs=args.warmup_epochs,
    )
    print(f"training finished ({result.run_dir}):")
    for key, value in result.metrics.items():
        print(f"  {key:<12} {value:.4f}")
    print(f"  {'best.pt':<12} {result.best}")
    print(f"  {'last.pt':<12} {result.last}")
    print(f"  {'results.csv':<12} {result.run_dir / 'results.csv'}")
    print(f"  {'plots':<12} {result.run_dir}/*.png")
    return 0
