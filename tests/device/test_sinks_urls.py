"""--sink URL parsing, options validation and the report policy: table-driven."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict

import pytest

from device.detections import FrameResult
from device.errors import JetyoloError
from device.sinks import ReportPolicy, SinkOptions, open_sinks, parse_sink_url


@pytest.mark.parametrize(
    "url, expected",
    [
        ("stdout", {"kind": "stdout"}),
        ("jsonl:out/det.jsonl", {"kind": "jsonl", "path": Path("out/det.jsonl")}),
        ("mqtt://broker", {"kind": "mqtt", "host": "broker", "port": 1883, "tls": False}),
        ("mqtts://broker", {"kind": "mqtt", "port": 8883, "tls": True}),  # TLS default port
        # credentials are percent-decoded and kept out of the display name
        ("mqtt://cam%40site:p%3Ass@10.0.0.2:1884",
         {"username": "cam@site", "password": "p:ss", "port": 1884,
          "name": "mqtt://cam@site@10.0.0.2:1884"}),
        ("tcp://:7070", {"kind": "tcp", "host": "127.0.0.1", "port": 7070}),  # loopback default
        ("tcp://0.0.0.0:7070", {"host": "0.0.0.0"}),  # any address only when asked
        ("udp://192.168.1.5:9999", {"kind": "udp", "host": "192.168.1.5", "port": 9999}),
    ],
)
def test_good_urls(url: str, expected: Dict[str, Any]) -> None:
    parsed = parse_sink_url(url)
    for field, value in expected.items():
        assert getattr(parsed, field) == value, field
    assert "ss@" not in parsed.name


@pytest.mark.parametrize(
    "url, reason",
    [
        ("kafka://broker", "unknown scheme"),  # not a sink we have
        ("file.jsonl", "unknown sink"),  # missing jsonl:
        ("jsonl:", "file path"),  # no path
        ("mqtt://", "host is missing"),  # no broker
        ("mqtt://broker:99999", "port"),  # port out of range
        ("mqtt://broker:abc", "port"),  # port not a number
        ("mqtt://broker/topic", "unexpected path"),  # topics come from the prefix, not the URL
        ("tcp://127.0.0.1", "port is required"),  # tcp needs a port
        ("udp://:9999", "destination host"),  # udp needs a host
        ("udp://host:0", "above 0"),  # and a real port
        ("tcp://u:p@127.0.0.1:1", "no user"),  # no credentials on sockets
    ],
)
def test_bad_urls_say_what_and_list_the_forms(url: str, reason: str) -> None:
    with pytest.raises(JetyoloError, match=reason) as raised:
        parse_sink_url(url)
    assert "mqtt://[user:pass@]host[:port]" in str(raised.value)


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"device_id": "a/b"}, "topic level"),  # would split the topic
        ({"device_id": "cam #1"}, "topic level"),  # wildcard and space
        ({"prefix": "x/+"}, "prefix"),  # wildcard in the prefix
        ({"report": "sometimes"}, "report mode"),  # unknown mode
        ({"report": "max-rate"}, "max rate"),  # max-rate without a rate
        ({"qos": 3}, "QoS"),  # no such QoS
        ({"spool_max_messages": 0}, "at least 1"),  # an unbounded or empty spool
    ],
)
def test_bad_options(tmp_path: Path, fields: Dict[str, Any], reason: str) -> None:
    with pytest.raises(JetyoloError, match=reason):
        SinkOptions(spool_dir=tmp_path, **fields)


def test_tls_flags_without_a_tls_sink_are_refused(tmp_path: Path) -> None:
    options = SinkOptions(spool_dir=tmp_path / "spool", mqtt_ca=tmp_path / "ca.crt")
    with pytest.raises(JetyoloError, match="mqtts://"):
        open_sinks(["mqtt://127.0.0.1:1"], options)


def test_same_sink_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(JetyoloError, match="given twice"):
        open_sinks(["stdout", "stdout"], SinkOptions(spool_dir=tmp_path))


def _reported(policy: ReportPolicy, frames: list) -> list:
    return [frame.frame_index for frame in frames if policy.should_report(frame)]


def test_report_every_frame(make_result: Callable[..., FrameResult]) -> None:
    frames = [make_result(i, detections=i % 2) for i in range(6)]
    assert _reported(ReportPolicy("every"), frames) == [0, 1, 2, 3, 4, 5]


def test_report_non_empty_also_reports_when_objects_leave(
    make_result: Callable[..., FrameResult],
) -> None:
    counts = [0, 2, 1, 0, 0, 0, 3, 0]
    frames = [make_result(i, detections=n) for i, n in enumerate(counts)]
    # 3 and 7 are empty but follow a non-empty frame: "nothing there any more"
    assert _reported(ReportPolicy("non-empty"), frames) == [1, 2, 3, 6, 7]


def test_report_max_rate_per_source(make_result: Callable[..., FrameResult]) -> None:
    policy = ReportPolicy("max-rate", max_rate_hz=10.0)
    frames = [make_result(i, fps=30.0) for i in range(12)]  # 30 fps -> every 3rd frame
    assert _reported(policy, frames) == [0, 3, 6, 9]
    other = [make_result(i, source="cam1", fps=30.0) for i in range(4)]
    assert _reported(policy, other) == [0, 3]  # a second source has its own budget


def test_one_table_of_sink_kinds_parses_opens_and_documents() -> None:
    import argparse
    import importlib

    from device.run import add_arguments
    from device.sinks.base import Sink
    from device.sinks.urls import FORMS, SINK_KINDS

    examples = {"stdout": "stdout", "jsonl": "jsonl:x.jsonl", "mqtt": "mqtts://broker",
                "tcp": "tcp://:7070", "udp": "udp://127.0.0.1:9999"}
    assert sorted(examples) == sorted(kind.kind for kind in SINK_KINDS)
    for kind in SINK_KINDS:
        assert parse_sink_url(examples[kind.kind]).kind == kind.kind
        module, name = kind.opener.split(":")
        opener = getattr(importlib.import_module(module), name)
        assert issubclass(opener, Sink)
        assert all(form in FORMS for form in kind.forms)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert "udp://HOST:PORT" in parser.format_help().replace("\n", " ").replace("  ", " ")
    with pytest.raises(JetyoloError, match="expected one of stdout, jsonl:PATH, mqtt://"):
        parse_sink_url("ftp://x")
