"""device.setup: the config becomes a source, a backend and sinks, opened in that order in one
ExitStack and closed in reverse; a sink typo fails before anything opens; extensions see the
built pipeline and may refuse the run."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Dict, List

import pytest
from test_pipeline import CollectingSink, EchoBackend, FakeSource  # tests/device is on sys.path

import device.setup as setup
from device.config import config_from_mapping
from device.errors import JetyoloError
from device.pipeline import Pipeline


class FakeBundle:
    def __init__(self) -> None:
        self.input_size = (64, 64)
        self.manifest: Dict[str, Any] = {}
        self.class_names = ["a", "b"]
        self.model_id = "fake"
        self.root = Path("fake-bundle")

    def max_batch(self, variant: str = "fp32") -> int:
        return 1


class RecordedSinks(CollectingSink):
    def __init__(self, events: List[str]) -> None:
        super().__init__()
        self.events = events

    def __enter__(self) -> RecordedSinks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.events.append("close sinks")


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> List[str]:
    log: List[str] = []

    class LoggedSource(FakeSource):
        def close(self) -> None:
            log.append("close source")

    class LoggedBackend(EchoBackend):
        def deactivate(self) -> None:
            if self.is_active:
                log.append("deactivate backend")
            super().deactivate()

    def source(*_: Any) -> FakeSource:
        log.append("open source")
        return LoggedSource(4)

    def backend(*_: Any) -> EchoBackend:
        log.append("open backend")
        return LoggedBackend()

    def sinks(*_: Any) -> RecordedSinks:
        log.append("open sinks")
        return RecordedSinks(log)

    monkeypatch.setattr(setup.Bundle, "load", staticmethod(lambda _path: FakeBundle()))
    monkeypatch.setattr(setup, "open_source", source)
    monkeypatch.setattr(setup, "open_configured_backend", backend)
    monkeypatch.setattr(setup, "open_checked_sinks", sinks)
    return log


def config(tmp_path: Path, **values: Any) -> Any:
    video = tmp_path / "s.mp4"
    video.touch()  # opened by the fake open_source; named by default_source_name
    return config_from_mapping({"bundle": "b", "source": str(video), "spool_dir": str(tmp_path),
                                **values})


def test_opens_source_backend_sinks_in_order_and_closes_in_reverse(
    events: List[str], tmp_path: Path
) -> None:
    summary = setup.run_configured(config(tmp_path), handle_signals=False)
    assert summary.frames == 4
    assert events == ["open source", "open backend", "open sinks",
                      "deactivate backend",  # by the inference thread, when the run ends
                      "close sinks", "close source"]


def test_a_bad_sink_fails_before_the_source_opens(events: List[str], tmp_path: Path) -> None:
    with pytest.raises(JetyoloError, match="bad --sink 'mqtt:/broker'"):
        setup.run_configured(config(tmp_path, sinks=["mqtt:/broker"]), handle_signals=False)
    assert events == []


def test_extensions_see_the_pipeline_and_a_refusal_closes_everything(
    events: List[str], tmp_path: Path
) -> None:
    seen: List[Pipeline] = []

    def plug(pipeline: Pipeline, _config: Any, stack: contextlib.ExitStack) -> None:
        seen.append(pipeline)
        stack.callback(lambda: events.append("extension stopped"))

    def refuse(*_: Any) -> None:
        raise JetyoloError("port 8080 is taken")

    with pytest.raises(JetyoloError, match="port 8080"):
        setup.run_configured(config(tmp_path), extensions=[plug, refuse], handle_signals=False)
    assert len(seen) == 1 and seen[0].counters()["frames"] == 0
    assert events == ["open source", "open backend", "open sinks",
                      "extension stopped", "close sinks", "close source"]


def test_given_sinks_replace_the_configured_ones(events: List[str], tmp_path: Path) -> None:
    collector = CollectingSink()
    setup.run_configured(config(tmp_path), sinks=collector, handle_signals=False)
    assert len(collector.results) == 4 and "open sinks" not in events


def test_a_source_still_being_read_is_not_closed() -> None:
    closed: List[bool] = []

    class Source(FakeSource):
        def close(self) -> None:
            closed.append(True)

    closer = setup._SourceCloser(Source(1))

    class Busy:
        def still_reading(self) -> bool:
            return True

    closer.pipeline = Busy()  # type: ignore[assignment]
    closer.close()
    assert closed == []
    closer.pipeline = None
    closer.close()
    assert closed == [True]


def sources_config(tmp_path: Path, entries: List[Any], **values: Any) -> Any:
    for index, entry in enumerate(entries):
        path = tmp_path / (entry if isinstance(entry, str) else entry["source"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        if isinstance(entry, str):
            entries[index] = str(path)
        else:
            entry["source"] = str(path)
    return config_from_mapping({"bundle": "b", "sources": entries, "spool_dir": str(tmp_path),
                                "device_id": "dev", **values})


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"source": "a.mp4", "name": "door"}, {"source": "b.mp4", "name": "door"}],
         "two sources are named 'door'; give each a distinct `name:`"),
        (["x/cam.mp4", "y/cam.mp4"],
         "both resolve to topic jetyolo/dev/cam/detections; give each a distinct `name:`"),
        ([{"source": "a.mp4", "name": "a/b"}], "cannot be an MQTT topic level"),
        (["a.mp4", {"source": "b.mp4", "classes": ["zebra"]}],
         r"sources\[1\]: classes: class 'zebra' is not in the bundle \(a, b\); use a class "
         r"name or an id 0..1"),
        ([{"source": "a.mp4", "classes": ["2"]}], "class '2' is not in the bundle"),
        (["a.mp4", {"source": "b.mp4", "report": "max-rate"}],
         "source 'b': report mode 'max-rate' needs a max rate above 0"),
    ],
)
def test_bad_sources_fail_before_anything_opens(
    entries: List[Any], message: str, events: List[str], tmp_path: Path
) -> None:
    with pytest.raises(JetyoloError, match=message):
        setup.run_configured(sources_config(tmp_path, entries), handle_signals=False)
    assert events == []


def test_a_batch_above_the_bundles_is_refused_before_anything_opens(
    events: List[str], tmp_path: Path
) -> None:
    with pytest.raises(JetyoloError, match="batch_size 2 is above the engine's batch 1; lower "
                                           "batch_size to 1 or less, or export a bundle"):
        setup.run_configured(sources_config(tmp_path, ["a.mp4", "b.mp4"], batch_size=2),
                             handle_signals=False)
    assert events == []


def test_each_source_gets_its_own_filter_and_report(events: List[str], tmp_path: Path) -> None:
    from device.pipeline import SourceFilter

    config = sources_config(tmp_path, [
        {"source": "a.mp4", "conf": 0.7}, {"source": "b.mp4", "classes": ["b"],
                                           "report": "non-empty"}, "c.mp4"],
        classes=["a", "1"], batch_timeout_ms=7)
    built: Dict[str, Any] = {}

    def keep(pipeline: Pipeline, *_: Any) -> None:
        built["pipeline"] = pipeline

    collector = CollectingSink()
    with contextlib.ExitStack() as stack:
        parts = setup.open_parts(config, stack, setup.Notifier(None), collector)
        assert parts.filters == {"a": SourceFilter(0.7, frozenset({0, 1})),
                                 "b": SourceFilter(None, frozenset({1})),
                                 "c": SourceFilter(None, frozenset({0, 1}))}
    setup.run_configured(config, sinks=collector, handle_signals=False, extensions=[keep])
    assert built["pipeline"].batch_timeout_s == 0.007



def test_two_sources_one_backend_each_closed(events: List[str], tmp_path: Path) -> None:
    config = sources_config(tmp_path, [{"source": "a.mp4", "name": "gate"}, "yard.mp4"])
    collector = CollectingSink()
    summary = setup.run_configured(config, sinks=collector, handle_signals=False)
    assert summary.frames == 8 and {r.source for r in collector.results} == {"gate", "yard"}
    assert summary.source == "gate,yard"
    assert events.count("open source") == 2 and events.count("open backend") == 1
    assert events.count("close source") == 2


def test_a_source_that_fails_to_open_closes_those_already_open(
    events: List[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = setup.open_source

    def second_fails(text: str, *rest: Any) -> Any:
        if text.endswith("bad.mp4"):
            raise JetyoloError("source 'bad.mp4' cannot be opened")
        return opened(text, *rest)

    monkeypatch.setattr(setup, "open_source", second_fails)
    with pytest.raises(JetyoloError, match=r"bad\.mp4"):
        setup.run_configured(sources_config(tmp_path, ["good.mp4", "bad.mp4"]),
                             handle_signals=False)
    assert events == ["open source", "close source"]
