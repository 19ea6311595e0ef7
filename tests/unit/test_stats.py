"""The ring of recent figures (observability/stats.py): slots, quantiles, bounds, windows."""

from __future__ import annotations

import math

import pytest

from modelmora.observability.stats import BINS, RequestStats, _bin
from modelmora.v1.convert import stats_to_dict, stats_to_proto


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_points_per_slot_with_rates_quantiles_and_batch_sizes() -> None:
    clock = Clock(1_000_000.0)  # a slot boundary (5 s slots)
    stats = RequestStats(slot_seconds=5, keep_seconds=60, clock=clock)
    for i in range(100):  # 1..100 ms, batches of 4
        stats.record_ok("m", (i + 1) / 1000, 4)
    stats.record_error("m")
    clock.now += 5  # the next slot: two slow requests in batches of 1
    stats.record_ok("m", 2.0, 1)
    stats.record_ok("m", 2.0, 1)
    clock.now += 2.5

    body = stats.series(10)
    assert body["step_seconds"] == 5 and body["window_seconds"] == 10
    assert body["timestamps"] == [1_000_000, 1_000_005]
    (m,) = body["models"]
    assert m["name"] == "m"
    # A full slot: 101 requests in 5 s; the slot in progress: 2 in the 2.5 s it has run.
    assert m["requests_per_second"] == [round(101 / 5, 3), 0.8]
    assert m["errors_per_second"] == [0.2, 0.0]
    assert m["batch_size"] == [4.0, 1.0]
    # Quantiles within the bins' width (20%) of the exact ones.
    assert m["p50_ms"][0] == pytest.approx(50, rel=0.11)
    assert m["p99_ms"][0] == pytest.approx(99, rel=0.11)
    assert m["p50_ms"][1] == pytest.approx(2000, rel=0.11)
    totals = m["totals"]
    assert totals["requests"] == 103 and totals["errors"] == 1
    assert totals["batch_size"] == round((100 * 4 + 2) / 102, 2)
    assert totals["p99_ms"] == pytest.approx(2000, rel=0.11)


def test_a_slot_is_reused_when_the_clock_comes_round() -> None:
    clock = Clock(0.0)
    stats = RequestStats(slot_seconds=5, keep_seconds=20, clock=clock)  # 4 slots
    stats.record_ok("m", 0.01, 1)
    clock.now += 20  # the same slot index, a new time: the old counts are gone
    stats.record_ok("m", 0.5, 2)
    (m,) = stats.series(20)["models"]
    assert m["totals"]["requests"] == 1 and m["batch_size"][-1] == 2.0
    assert m["requests_per_second"][:-1] == [0.0, 0.0, 0.0]
    assert m["p50_ms"][:-1] == [None, None, None]
    clock.now += 25  # nothing in the window: the model is left out
    assert stats.series(20)["models"] == []


def test_models_are_bounded_least_recently_active_first() -> None:
    stats = RequestStats(max_models=3, clock=Clock())
    for name in ("a", "b", "c"):
        stats.record_ok(name, 0.01, 1)
    stats.record_error("a")  # active again
    stats.record_ok("d", 0.01, 1)  # b goes
    assert [m["name"] for m in stats.series(60)["models"]] == ["a", "c", "d"]


def test_the_window_is_checked() -> None:
    stats = RequestStats(keep_seconds=900, clock=Clock())
    for bad in (0, 9, 901, -5):
        with pytest.raises(ValueError, match="between 10 and 900"):
            stats.series(bad)
    assert len(stats.series(900)["timestamps"]) == 180
    assert len(stats.series(12)["timestamps"]) == 3  # rounded up to whole slots


def test_bins_cover_their_range() -> None:
    assert _bin(0) == 0 and _bin(1e-9) == 0 and _bin(1e6) == len(BINS) - 1
    for seconds in (0.00015, 0.003, 0.25, 7.0, 600.0):
        upper = BINS[_bin(seconds)]
        assert upper >= seconds and upper / 1.2 < seconds * (1 + 1e-9)


def test_the_grpc_message_round_trips_gaps_as_nan() -> None:
    clock = Clock(1_000_000.0)
    stats = RequestStats(clock=clock)
    stats.record_ok("m", 0.02, 3)
    stats.record_error("n")
    clock.now += 7
    body = stats.series(30)
    message = stats_to_proto(body)
    assert math.isnan(message.models[1].p50_ms[-1])  # n: errors only
    assert stats_to_dict(message) == body
