"""device.bench.tracking: the tracking cost figures `jetyolo bench` prints."""

from __future__ import annotations

from device.bench.tracking import markdown_lines, moving_boxes, tracking_costs


def test_costs_per_source_and_per_round() -> None:
    costs = tracking_costs((1, 2), frames=40, objects=5, warmup=5)
    assert [c["sources"] for c in costs] == [1, 2] and costs[0]["frames"] == 35
    for cost in costs:
        assert 0 < cost["per_source_cpu_ms"]["p50"] <= cost["per_source_cpu_ms"]["p90"]
        # a round of every source costs about `sources` single calls
        assert cost["all_sources_cpu_ms"]["p50"] >= cost["per_source_cpu_ms"]["p50"]
    rows = markdown_lines(costs)
    assert len(rows) == 4 and rows[2].startswith("| 1 | 5 |") and "of one core" in rows[3]


def test_replay_is_deterministic_and_in_frame() -> None:
    first, again = moving_boxes(8, 10, seed=3), moving_boxes(8, 10, seed=3)
    assert all((a.xyxy == b.xyxy).all() for a, b in zip(first, again))
    assert all(d.xyxy.min() >= -10 and d.xyxy[:, 2].max() <= 1930 for d in first)
