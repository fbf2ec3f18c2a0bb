"""`jetyolo export --batch N` (N > 1): dim 0 symbolic ("batch"), H, W, C static, the manifest
records N; every variant runs 1..N rows on ONNX Runtime and row i equals the batch-1 export's
output for the same image; parity, the reference, calibration and verify work at N.

One batch-3 export (conftest ``batch_bundle_dir``, 320 px like the batch-1 ``bundle_dir``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from device.bundle import Bundle
from device.cli import main
from device.errors import JetyoloError
from device.preprocess import Preprocessor
from host import parity
from host.export import checked_batch_rows

BATCH = 3
IMGSZ = 320


@pytest.fixture(scope="module")
def batch_bundle(batch_bundle_dir: Path) -> Path:
    """conftest's session bundle: the fixture weights at --batch 3, 320 px."""
    return batch_bundle_dir


def dims(value: Any) -> List[Any]:
    return [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]


def frames(count: int) -> List[np.ndarray]:
    return list(parity.frames_for(None, 4, count)[0])


def feeds(frames_: List[np.ndarray], dtype: str) -> List[np.ndarray]:
    preprocess = Preprocessor((IMGSZ, IMGSZ), dtype)
    rows = []
    for frame in frames_:
        preprocess(frame)
        rows.append(preprocess.buffer.copy())
    return rows


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_every_graph_has_a_symbolic_batch_and_the_manifest_records_n(batch_bundle: Path) -> None:
    bundle = Bundle.load(batch_bundle)
    variants = bundle.manifest["variants"]
    assert sorted(variants) == ["fp16", "fp32", "nms", "uint8"]
    for name, variant in variants.items():
        model = onnx.load(str(bundle.model_path(name)))
        (graph_input,) = model.graph.input
        assert dims(graph_input)[0] == "batch", name
        assert all(isinstance(dim, int) and dim > 0 for dim in dims(graph_input)[1:]), name
        assert all(dims(output)[0] == "batch" for output in model.graph.output), name
        assert variant["input"]["shape"][0] == BATCH, name
        assert dims(graph_input)[1:] == variant["input"]["shape"][1:], name
    assert bundle.manifest["parity"]["batch_rows"] == {"rows": [1, 2, 3], "max_abs": 0.0}


@pytest.mark.parametrize("variant, dtype", [("fp32", "float32"), ("uint8", "uint8")])
def test_k_rows_equal_the_batch_1_export_row_by_row(
    batch_bundle: Path, bundle_dir: Path, variant: str, dtype: str
) -> None:
    """bundle_dir is the same weights exported at batch 1 (static): row i of a k-row call on the
    batch-3 graph is what the batch-1 fp32 graph gives for image i alone (the uint8 graph
    computes what fp32 does on the device's float buffer)."""
    batched = session(Bundle.load(batch_bundle).model_path(variant))
    single_path = Bundle.load(bundle_dir).model_path("fp32")
    assert dims(onnx.load(str(single_path)).graph.input[0]) == [1, 3, IMGSZ, IMGSZ]
    single = session(single_path)
    images = frames(BATCH)
    rows, float_rows = feeds(images, dtype), feeds(images, "float32")
    alone = [single.run(None, {"images": row}) for row in float_rows]
    for count in range(1, BATCH + 1):
        together = batched.run(None, {"images": np.concatenate(rows[:count])})
        assert together[0].shape[0] == count
        for index in range(count):
            for got, want in zip(together, alone[index]):
                np.testing.assert_allclose(got[index], want[0], atol=1e-3, rtol=1e-4)
    # the rows are distinct images: a graph that returned row 0 everywhere would fail above
    assert not np.allclose(alone[0][1], alone[1][1])


def mixing_model(path: Path) -> Path:
    """A graph whose dim 0 is symbolic but whose rows depend on each other (x - mean over the
    batch): what a constant or op that bakes the batch does to a partial call."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, IMGSZ, IMGSZ])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3, IMGSZ, IMGSZ])
    nodes = [helper.make_node("ReduceMean", ["images"], ["mean"], axes=[0], keepdims=1),
             helper.make_node("Sub", ["images", "mean"], ["out"])]
    graph = helper.make_graph(nodes, "mix", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_the_rows_check_refuses_a_graph_whose_rows_depend_on_the_batch(tmp_path: Path) -> None:
    model = mixing_model(tmp_path / "mix.onnx")
    assert parity.batch_rows(model, frames(2), (IMGSZ, IMGSZ), 2) > 0.01
    with pytest.raises(JetyoloError, match=r"row .* away from the same image run alone"):
        checked_batch_rows(model, frames(2), (IMGSZ, IMGSZ), 2)


def test_reference_bundle_verify_and_verify_work_at_batch_n(
    batch_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference: Dict[str, Any] = Bundle.load(batch_bundle).manifest["reference"]
    assert reference["num"] == 4 and reference["files"]
    assert main(["bundle", "verify", str(batch_bundle)]) == 0
    assert "['batch', 3, 320, 320]" in capsys.readouterr().out
    assert main(["verify", str(batch_bundle), "--backend", "onnxruntime"]) == 0
    assert "RESULT: PASS" in capsys.readouterr().out


def test_calibration_caches_and_qdq_at_batch_n(
    batch_bundle: Path, synth_dataset: Path, tmp_path: Path
) -> None:
    """The host calibrates one image per call: a symbolic dim 0 takes it; the Q/DQ model keeps
    the symbolic batch and runs k rows like the float graph."""
    import shutil

    from host.calibrate import DEFAULT_RECIPE, calibrate

    target = tmp_path / "bundle"
    shutil.copytree(batch_bundle, target)
    images = synth_dataset.parent / "train" / "images"
    recipe = dict(DEFAULT_RECIPE, num=8, min_images=8, trt_versions=["10.3.0"],
                  sensitivity_images=2, max_fp16_layers=0)
    bundle = calibrate(target, images, recipe, data_yaml=synth_dataset, eval_limit=4)
    assert any(name.endswith("trt-10.3.0.cache") for name in bundle.manifest["files"])
    qdq = bundle.model_path("int8-qdq")
    assert dims(onnx.load(str(qdq)).graph.input[0])[0] == "batch"
    assert bundle.manifest["variants"]["int8-qdq"]["input"]["shape"][0] == BATCH
    rows = np.concatenate(feeds(frames(2), "float32"))
    assert session(qdq).run(None, {"images": rows})[0].shape[0] == 2
