"""`jetyolo train`: a real 1-epoch run end to end, and the refusals that come before training."""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List

import pytest

import host.train
from device.cli import main
from device.errors import JetyoloError
from host.synth import make_dataset
from host.train import METRIC_KEYS, TrainResult, train

IMGSZ = 160


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 train / 8 val images at 160 px: enough for one real epoch in seconds."""
    return make_dataset(tmp_path_factory.mktemp("train") / "ds", 4, 16, 8, IMGSZ, seed=1)


@dataclass
class CliRun:
    exit_code: int
    stdout: str
    project: Path
    result: TrainResult  # what train() returned to the CLI


@pytest.fixture(scope="module")
def trained(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    """`jetyolo train` for 1 epoch from yolo11n.yaml (from scratch, nothing downloaded)."""
    project = tmp_path_factory.mktemp("runs")
    returned: List[TrainResult] = []

    def keep_result(*args: Any, **kwargs: Any) -> TrainResult:
        returned.append(train(*args, **kwargs))
        return returned[-1]

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setattr(host.train, "train", keep_result)
        code = main(["train", "--data", str(tiny_dataset), "--model", "yolo11n.yaml",
                     "--epochs", "1", "--imgsz", str(IMGSZ), "--batch", "8",
                     "--project", str(project), "--name", "tiny",
                     "--optimizer", "AdamW", "--lr0", "0.0005", "--warmup-epochs", "0"])
    return CliRun(code, stdout.getvalue(), project, returned[0])


@pytest.mark.slow
def test_one_epoch_writes_weights_results_and_prints_metrics(trained: CliRun) -> None:
    run_dir = trained.project / "tiny"
    assert trained.exit_code == 0
    assert trained.result.run_dir == run_dir
    assert trained.result.best == run_dir / "weights" / "best.pt"
    assert set(trained.result.metrics) == {"precision", "recall", "mAP50", "mAP50-95"}
    for produced in ("weights/best.pt", "weights/last.pt", "results.csv", "results.png"):
        assert (run_dir / produced).is_file(), produced
    header = (run_dir / "results.csv").read_text().splitlines()[0]
    assert all(key in header for key in METRIC_KEYS.values())
    lines = trained.stdout.splitlines()  # ultralytics logs to stdout too; ours come last
    printed = lines[lines.index(f"training finished ({run_dir}):"):]
    for short in METRIC_KEYS:  # each metric printed as a number in [0, 1]
        line = next(line for line in printed if line.split()[0] == short)
        assert 0.0 <= float(line.split()[1]) <= 1.0
    assert f"  best.pt      {run_dir / 'weights' / 'best.pt'}" in printed


@pytest.mark.slow
def test_optimizer_flags_reach_ultralytics(trained: CliRun) -> None:
    import yaml

    used = yaml.safe_load((trained.result.run_dir / "args.yaml").read_text())
    assert (used["optimizer"], used["lr0"], used["warmup_epochs"]) == ("AdamW", 0.0005, 0.0)


@pytest.mark.slow
def test_trained_weights_load_as_a_detect_model(trained: CliRun) -> None:
    from host.train import load_detect_model

    model = load_detect_model(str(trained.project / "tiny" / "weights" / "best.pt"))
    assert model.task == "detect"
    assert list(model.names.values()) == ["red_circle", "green_square", "blue_triangle",
                                          "yellow_star"]


@pytest.mark.slow
def test_resume_of_a_finished_run_is_refused(trained: CliRun, tiny_dataset: Path) -> None:
    with pytest.raises(JetyoloError, match="finished all its epochs, nothing to resume"):
        train(tiny_dataset, project=trained.project, name="tiny", resume=True)


@pytest.mark.slow
def test_resume_writes_into_its_own_run_whatever_the_checkpoint_says(
    trained: CliRun, tiny_dataset: Path, tmp_path: Path
) -> None:
    """A last.pt copied from elsewhere (or crafted) names another save_dir and dataset in its
    train_args; the resumed run still writes only below --project/--name."""
    import torch

    checkpoint = torch.load(trained.result.last, map_location="cpu", weights_only=False)
    elsewhere = tmp_path / "elsewhere"
    checkpoint["epoch"] = 0  # "interrupted after its first epoch" of two
    checkpoint["train_args"].update(epochs=2, save_dir=str(elsewhere), data="/nonexistent.yaml")
    last = tmp_path / "runs" / "moved" / "weights" / "last.pt"
    last.parent.mkdir(parents=True)
    torch.save(checkpoint, last)
    result = train(tiny_dataset, project=tmp_path / "runs", name="moved", resume=True)
    assert result.run_dir == (tmp_path / "runs" / "moved").resolve()
    assert (result.run_dir / "results.csv").is_file()
    assert not elsewhere.exists()


def test_resume_without_a_run(tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(JetyoloError) as caught:
        train(tiny_dataset, project=tmp_path, name="never", resume=True)
    last = tmp_path.resolve() / "never" / "weights" / "last.pt"
    assert str(caught.value) == (
        f"--resume: no {last} to resume from; drop --resume to start run 'never'"
    )


def test_garbage_pt_is_refused(tiny_dataset: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "model.pt"
    garbage.write_bytes(bytes(range(256)) * 16)
    with pytest.raises(JetyoloError) as caught:
        train(tiny_dataset, model=str(garbage), project=tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{garbage} is not an ultralytics model (")
    assert "\n" not in message
    assert not (tmp_path / "train").exists()


def test_missing_pt_is_refused_not_downloaded(tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(JetyoloError, match=re.escape("model yolo11n.pt does not exist")):
        train(tiny_dataset, model="yolo11n.pt", project=tmp_path)


def test_classify_model_is_refused(tiny_dataset: Path, tmp_path: Path) -> None:
    from host._env import ultralytics_offline

    ultralytics = ultralytics_offline("train")
    classifier = tmp_path / "cls.pt"
    ultralytics.YOLO("yolo11n-cls.yaml").save(str(classifier))  # built offline from the yaml
    with pytest.raises(JetyoloError, match="is a 'classify' model; jetyolo needs a YOLO detect"):
        train(tiny_dataset, model=str(classifier), project=tmp_path)


TINY_RTDETR_YAML = """\
nc: 4
backbone:
  - [-1, 1, Conv, [8, 3, 2]]
  - [-1, 1, Conv, [16, 3, 2]]
  - [-1, 1, Conv, [16, 3, 2]]
head:
  - [[2], 1, RTDETRDecoder, [nc, 16, 10, 1, 2, 1]]
"""


def test_rtdetr_is_refused_by_train_and_export(tiny_dataset: Path, tmp_path: Path) -> None:
    """A yaml by name, and a .pt by its model class: ultralytics' YOLO() loads an RT-DETR .pt as a
    'detect' model without complaint, so before the check train and export went on with it."""
    from host._env import ultralytics_offline
    from host.export import export_bundle
    from host.train import RTDETR_UNSUPPORTED

    with pytest.raises(JetyoloError) as caught:
        train(tiny_dataset, model="rtdetr-l.yaml", project=tmp_path)
    assert str(caught.value) == f"rtdetr-l.yaml: {RTDETR_UNSUPPORTED}"
    yaml = tmp_path / "tiny-detr.yaml"  # no "rtdetr" in the name: the .pt check must catch it
    yaml.write_text(TINY_RTDETR_YAML)
    weights = tmp_path / "detr.pt"
    ultralytics_offline("train").RTDETR(str(yaml)).save(str(weights))
    for verb in (lambda: train(tiny_dataset, model=str(weights), project=tmp_path),
                 lambda: export_bundle(weights, tmp_path / "bundle", imgsz=64)):
        with pytest.raises(JetyoloError) as caught:
            verb()
        assert str(caught.value) == f"{weights}: {RTDETR_UNSUPPORTED}"
    assert not (tmp_path / "train").exists() and not (tmp_path / "bundle").exists()


def test_dataset_errors_stop_training_before_it_starts(tmp_path: Path) -> None:
    data_yaml = make_dataset(tmp_path / "ds", 2, 2, 1, 64, seed=0)
    (data_yaml.parent / "valid" / "labels" / "valid_00000.txt").write_text("5 0.5 0.5 0.1 0.1\n")
    expected = "valid/labels/valid_00000.txt:1: class id 5 >= nc 2"
    with pytest.raises(JetyoloError, match=re.escape(expected)):
        train(data_yaml, project=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_training_uses_the_repaired_copy(tmp_path: Path) -> None:
    from host.train import checked_data_yaml

    data_yaml = make_dataset(tmp_path / "ds", 2, 2, 1, 64, seed=0)
    original = data_yaml.read_text().replace("train/images", "/old/machine/ds/train/images")
    data_yaml.write_text(original)
    assert checked_data_yaml(data_yaml) == data_yaml.with_name("data.repaired.yaml")
    assert data_yaml.read_text() == original


# (flag values that ultralytics would refuse with a traceback, expected message)
BAD_TRAIN_ARGS = [
    (dict(epochs=0), "--epochs must be at least 1, got 0"),  # ultralytics: ValueError
    (dict(imgsz=16), "--imgsz must be at least 32"),  # smaller than the stride
    (dict(batch=0), "--batch must be at least 1 (or -1"),  # -1 is AutoBatch
    (dict(lr0=0.001), "--lr0 needs --optimizer"),  # ultralytics' auto optimizer would ignore it
    (dict(optimizer="AdamW", lr0=2.0), "--lr0 must be between 0 and 1, got 2.0"),
    (dict(warmup_epochs=-1.0), "--warmup-epochs must be 0 or more"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_TRAIN_ARGS)
def test_bad_train_args_are_refused_before_any_work(
    tiny_dataset: Path, tmp_path: Path, kwargs: Any, message: str
) -> None:
    with pytest.raises(JetyoloError, match=re.escape(message)):
        train(tiny_dataset, project=tmp_path / "runs", **kwargs)
    assert not (tmp_path / "runs").exists()
