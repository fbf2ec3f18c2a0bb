"""Config file and flags: every bad key or value is refused with the key's name and what is
allowed; flags override the file; relative paths follow the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import pytest

from device.config import FIELD_RULES, RunConfig, config_from_mapping, load_config
from device.errors import JetyoloError
from device.sinks.base import REPORT_MODES

BASE: Dict[str, Any] = {"bundle": "/b", "source": "video.mp4"}


@pytest.mark.parametrize(
    "values, message",
    [
        # a typo in a key: named, with the closest key suggested
        ({"sorce": "x.mp4"}, "sorce: unknown key; did you mean 'source'?"),
        # an unknown key with no close match lists the allowed keys
        ({"colour": "red"}, "colour: unknown key; allowed keys: bundle, source, backend"),
        # an enum value that is not allowed
        (
            {"backend": "cuda"},
            "backend: 'cuda' is not allowed; use one of auto, tensorrt, onnxruntime",
        ),
        ({"precision": "int4"}, "precision: 'int4' is not allowed; use one of fp32, fp16, int8"),
        (
            {"report": "sometimes"},
            "report: 'sometimes' is not allowed; use one of every, non-empty",
        ),
        # numbers out of range
        ({"conf": 1.5}, "conf: 1.5 is above the maximum 1"),
        ({"iou": -0.1}, "iou: -0.1 is below the minimum 0"),
        ({"max_det": 0}, "max_det: 0 is below the minimum 1"),
        ({"buffers": 1}, "buffers: 1 is below the minimum 2"),
        # NaN passes every range check unless refused as such; inf only where it means forever
        ({"conf": float("nan")}, "conf: nan is not a finite number"),
        ({"iou": float("nan")}, "iou: nan is not a finite number"),
        ({"stats_interval_s": float("inf")}, "stats_interval_s: inf is not a finite number"),
        ({"source_timeout_s": float("nan")}, "source_timeout_s: nan is not a finite number"),
        ({"threads": 0}, "threads: 0 is below the minimum 1"),
        # wrong types (a YAML string where a number belongs, a bool where an int belongs)
        ({"conf": "0.5"}, "conf: must be float, got '0.5'"),
        ({"max_det": True}, "max_det: must be int, got True"),
        ({"stats_interval_s": None}, "stats_interval_s: must be set"),
        # sinks must be a list of non-empty strings
        ({"sinks": []}, "sinks: must be a non-empty list of strings"),
        ({"sinks": ["stdout", 5]}, "sinks: entries must be non-empty strings, got 5"),
        # the required keys
        ({"bundle": None}, "bundle: must be set"),
        ({"source": ""}, "source: is empty"),
    ],
)
def test_bad_values_are_refused_with_key_and_allowed_values(
    values: Dict[str, Any], message: str
) -> None:
    with pytest.raises(JetyoloError) as caught:
        config_from_mapping({**BASE, **values}, origin="run.yaml")
    assert str(caught.value).startswith("run.yaml: ")
    assert message in str(caught.value)


def test_good_values_are_accepted_and_converted() -> None:
    config = config_from_mapping({**BASE, "conf": 1, "sinks": "stdout", "backend": "onnxruntime"})
    assert config.conf == 1.0 and isinstance(config.conf, float)
    assert config.sinks == ["stdout"] and config.backend == "onnxruntime"
    assert config.buffers == 3 and config.report == "every"


def test_missing_source_names_the_flag() -> None:
    with pytest.raises(JetyoloError, match="source is not set; give --source"):
        config_from_mapping({"bundle": "/b"}, origin="flags")


def test_every_key_has_a_rule_derived_from_its_one_declaration() -> None:
    assert list(FIELD_RULES) == list(RunConfig.__dataclass_fields__)
    assert all(rule.help for rule in FIELD_RULES.values())
    assert FIELD_RULES["report"].choices == REPORT_MODES
    # type and optionality come from the annotation, the default from the field
    assert (FIELD_RULES["conf"].kind, FIELD_RULES["conf"].optional) == (float, True)
    assert (FIELD_RULES["buffers"].kind, FIELD_RULES["buffers"].optional) == (int, False)
    assert (FIELD_RULES["sinks"].kind, FIELD_RULES["sinks"].default) == (list, ["stdout"])
    assert RunConfig().sinks == ["stdout"] and RunConfig().sinks is not RunConfig().sinks


def test_the_docs_table_is_the_one_the_rules_make() -> None:
    from device.config import docs_table

    docs = (Path(__file__).resolve().parents[2] / "docs" / "runtime.md").read_text()
    assert docs_table() in docs, "docs/runtime.md's key table is stale: paste docs_table()"
    assert "| `buffers` | int | `3` | 2 … 8 |" in docs_table()
    assert "| `buffers` | int | `4` |" not in docs_table()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_flags_override_the_file_and_paths_follow_the_file(tmp_path: Path) -> None:
    config_file = write(
        tmp_path / "run.yaml",
        "bundle: bundles/synth\nsource: /dev/video0\nconf: 0.4\nsinks: [stdout, 'jsonl:/tmp/x']\n",
    )
    config = load_config(config_file, {"conf": 0.6, "iou": None, "backend": "onnxruntime"})
    assert config.conf == 0.6 and config.iou is None and config.backend == "onnxruntime"
    assert config.bundle == str(tmp_path / "bundles" / "synth")
    assert config.source == "/dev/video0" and config.sinks == ["stdout", "jsonl:/tmp/x"]


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "bundle: b\nsource: s\nmax_frame: 3\n",
            "max_frame: unknown key; did you mean 'max_frames'?",
        ),
        ("- bundle\n- source\n", "must be a mapping of keys to values, got list"),
        ("bundle: [unclosed\n", "is not valid YAML"),
        # a key given twice: YAML would keep the last one silently
        ("bundle: b\nsource: s\nconf: 0.3\nconf: 0.9\n", "key 'conf' is given twice .lines 3"),
    ],
)
def test_bad_files_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(JetyoloError, match=message.replace("[", r"\[").replace("?", r"\?")):
        load_config(write(tmp_path / "run.yaml", text), {})


def test_a_bad_flag_value_is_blamed_on_the_flags(tmp_path: Path) -> None:
    config_file = write(tmp_path / "run.yaml", "bundle: b\nsource: s\n")
    with pytest.raises(JetyoloError, match=r"^flags: conf: 2\.0 is above the maximum 1"):
        load_config(config_file, {"conf": 2.0})


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(JetyoloError, match=r"config file .* does not exist"):
        load_config(tmp_path / "nope.yaml", {})


def test_unreadable_config_files_are_one_error_line(tmp_path: Path) -> None:
    with pytest.raises(JetyoloError, match=r"config file .* is a directory"):
        load_config(tmp_path, {})
    latin1 = tmp_path / "run.yaml"
    latin1.write_bytes("bundle: caf\xe9\n".encode("latin-1"))  # not UTF-8
    with pytest.raises(JetyoloError, match=r"cannot be read as UTF-8 text"):
        load_config(latin1, {})


def test_every_key_is_also_a_flag() -> None:
    import argparse

    from device.run import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    destinations = {action.dest for action in parser._actions}
    file_only = {key for key, rule in FIELD_RULES.items() if rule.kind is dict}
    assert file_only == {"tracking"} and not file_only & destinations
    assert set(FIELD_RULES) - file_only - {"sources"} <= destinations  # a repeated --source
    args = parser.parse_args(["b", "--source", "s", "--stats-interval-s", "2", "--buffers", "4"])
    assert (args.stats_interval_s, args.buffers, args.sinks) == (2.0, 4, None)


def run_config_from(argv: List[str], tmp_path: Path, text: str = "") -> RunConfig:
    import argparse

    from device.run import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    extra = ["--config", str(write(tmp_path / "run.yaml", text))] if text else []
    return config_from_args(parser.parse_args([*argv, *extra]))


def test_spool_max_messages_reaches_the_sink_options(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from device.setup import sink_options

    bundle = SimpleNamespace(class_names=["a"], model_id="m")
    from_file = run_config_from([], tmp_path, "bundle: /b\nsource: s\nspool_max_messages: 500\n")
    assert sink_options(from_file, bundle).spool_max_messages == 500  # type: ignore[arg-type]
    from_flag = run_config_from(["/b", "--source", "s", "--spool-max-messages", "7"], tmp_path,
                                "spool_max_messages: 500\n")
    assert sink_options(from_flag, bundle).spool_max_messages == 7  # type: ignore[arg-type]
    default = run_config_from(["/b", "--source", "s"], tmp_path)
    assert sink_options(default, bundle).spool_max_messages == 100_000  # type: ignore[arg-type]
    with pytest.raises(JetyoloError, match="spool_max_messages: 0 is below the minimum 1"):
        run_config_from(["/b", "--source", "s", "--spool-max-messages", "0"], tmp_path)


def test_source_timeout_flag_and_key(tmp_path: Path) -> None:
    base = ["/b", "--source", "rtsp://cam/x"]
    assert run_config_from([*base, "--source-timeout", "20"], tmp_path).source_timeout_s == 20.0
    assert run_config_from([*base, "--source-timeout-s", "inf"], tmp_path).source_timeout_s \
        == float("inf")
    from_file = run_config_from(base, tmp_path, "source_timeout_s: .inf\n")
    assert from_file.source_timeout_s == float("inf")
    assert run_config_from(base, tmp_path).source_timeout_s is None  # default: see pipeline
    with pytest.raises(JetyoloError, match=r"source_timeout_s: -1\.0 is below the minimum 0"):
        run_config_from([*base, "--source-timeout", "-1"], tmp_path)


def test_a_camera_index_in_yaml_is_a_source(tmp_path: Path) -> None:
    """`source: 0` reads as the number 0 in YAML; docs/runtime.md lists it as a source."""
    config = load_config(write(tmp_path / "run.yaml", "bundle: b\nsource: 0\n"), {})
    assert config.source == "0"


def test_infinity_still_means_wait_forever(tmp_path: Path) -> None:
    config = load_config(write(tmp_path / "run.yaml", "bundle: b\nsource: s\n"
                               "source_timeout_s: .inf\n"), {})
    assert config.source_timeout_s == float("inf")


def test_sources_list_entries_and_the_single_source_form(tmp_path: Path) -> None:
    text = ("bundle: b\nsources:\n  - cam.mp4\n  - source: rtsp://host/x\n    name: door\n"
            "    capture_fps: 15\n")
    config = run_config_from([], tmp_path, text)
    assert [e.source for e in config.sources or []] == ["cam.mp4", "rtsp://host/x"]
    door = (config.sources or [])[1]
    assert (door.name, door.get("capture_fps", config)) == ("door", 15) and config.source == ""
    assert door.get("capture_width", config) is None  # unset: the top-level value
    # --source replaces the file's sources; repeated, it makes a list
    assert run_config_from(["--source", "a.mp4"], tmp_path, text).sources is None
    repeated = run_config_from(["b", "--source", "a.mp4", "--source", "c.mp4"], tmp_path)
    assert [e.source for e in repeated.sources or []] == ["a.mp4", "c.mp4"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"sources": []}, "sources: must be a non-empty list of sources"),
        ({"sources": [{"name": "x"}]}, r"sources\[0\]: source is not set"),
        ({"sources": [{"source": "a", "capture_fpss": 5}]}, "did you mean 'capture_fps'"),
        ({"sources": [{"source": "a", "capture_fps": 0}]}, "below the minimum 1"),
        ({"sources": ["a"], "source": "b"}, "give source or sources, not both"),
        ({"sources": [7]}, "must be a string or a mapping"),
        ({"sources": [{"source": "a", "conff": 0.5}]}, "did you mean 'conf'"),
        ({"sources": [{"source": "a", "conf": 2}]},
         r"sources\[0\]: conf: 2.0 is above the maximum 1"),
        ({"sources": [{"source": "a", "report": "often"}]}, "'often' is not allowed; use one of"),
        ({"sources": [{"source": "a", "classes": []}]}, "classes: must be a non-empty list"),
        ({"source": "a", "batch_size": 0}, "batch_size: 0 is below the minimum 1"),
        ({"source": "a", "batch_timeout_ms": float("nan")}, "batch_timeout_ms: nan is not a"),
        ({"source": "a", "batch_timeout_ms": float("inf")}, "batch_timeout_ms: inf is not a"),
        ({"source": "a", "batch_timeout_ms": -1}, "batch_timeout_ms: -1.0 is below the min"),
    ],
)
def test_bad_sources_are_one_line(values: Dict[str, Any], message: str) -> None:
    with pytest.raises(JetyoloError, match=message):
        config_from_mapping({"bundle": "b", **values})


def test_a_source_entry_overrides_conf_classes_and_report_with_the_top_level_rules(
    tmp_path: Path,
) -> None:
    from device.config import FIELD_RULES, SOURCE_RULES

    text = ("bundle: b\nconf: 0.4\nclasses: [person]\nsources:\n  - cam.mp4\n"
            "  - source: door.mp4\n    conf: 0.6\n    classes: [0, car]\n    report: non-empty\n")
    config = run_config_from([], tmp_path, text)
    plain, door = config.sources or []
    assert (plain.get("conf", config), plain.get("classes", config)) == (0.4, ["person"])
    assert (door.get("conf", config), door.get("classes", config),
            door.get("report", config)) == (0.6, ["0", "car"], "non-empty")
    assert plain.get("report", config) == "every"
    for key in ("conf", "classes", "report", "capture_fps"):  # one declaration, one rule
        assert SOURCE_RULES[key] is FIELD_RULES[key]
    assert SOURCE_RULES["name"] is FIELD_RULES["source_name"]


def test_threads_auto_is_a_value_that_overrides_the_file(tmp_path: Path) -> None:
    import argparse

    from device.run import add_arguments, config_from_args

    config_file = write(tmp_path / "run.yaml",
                        "bundle: b\nsource: s\nthreads: 2\ninfer_workers: auto\ndecode_scale: 4\n")
    assert load_config(config_file, {}).threads == 2
    assert load_config(config_file, {}).infer_workers is None  # auto: the rule decides
    assert load_config(config_file, {}).decode_scale == "4"  # a YAML number, one of the choices
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--config", str(config_file), "--threads", "auto"])
    assert config_from_args(args).threads is None  # the flag's auto beats the file's 2
    with pytest.raises(SystemExit):
        parser.parse_args(["--threads", "many"])  # neither a number nor auto
    with pytest.raises(JetyoloError, match="threads: must be int, got 'many'"):
        load_config(write(tmp_path / "bad.yaml", "bundle: b\nsource: s\nthreads: many\n"), {})
    with pytest.raises(JetyoloError, match="decode_scale: '3' is not allowed"):
        load_config(write(tmp_path / "bad3.yaml", "bundle: b\nsource: s\ndecode_scale: 3\n"), {})
