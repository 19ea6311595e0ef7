"""next_batch and hold_until: pure decisions over a RequestQueue, the clock passed in."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelmora.inference.batcher import (
    RETURN_GAP_S,
    RETURN_WAIT_MAX_S,
    RETURN_WAIT_SHARE,
    BatchLimits,
    Returning,
    hold_until,
    next_batch,
)
from modelmora.inference.queue import Entry, Priority, RequestQueue

NO_AGING = 1e12


def make_queue(*specs: tuple[str, Priority, float, float, int]) -> RequestQueue:
    """specs: (name, priority, arrival, deadline, size)."""
    q = RequestQueue(aging_seconds=NO_AGING)
    for name, priority, arrival, deadline, size in specs:
        q.push(Entry(priority, arrival, deadline, size, payload=name))
    return q


def names(entries: list[Entry]) -> list[str]:
    return [e.payload for e in entries]


N, H, L, C = Priority.NORMAL, Priority.HIGH, Priority.LOW, Priority.CRITICAL


# -- next_batch -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("specs", "max_batch", "batch", "expired", "left"),
    [
        ([], 4, [], [], 0),
        # sizes count inputs, not requests
        ([("a", N, 0, 99, 2), ("b", N, 1, 99, 2), ("c", N, 2, 99, 1)], 4, ["a", "b"], [], 1),
        ([("a", N, 0, 99, 1), ("b", N, 1, 99, 1), ("c", N, 2, 99, 1)], 8, ["a", "b", "c"], [], 0),
        # the next entry would overflow: stop before it, even if a later smaller one would fit
        ([("a", N, 0, 99, 3), ("b", N, 1, 99, 2), ("c", N, 2, 99, 1)], 4, ["a"], [], 2),
        # an oversize entry goes alone rather than never
        ([("big", N, 0, 99, 10), ("b", N, 1, 99, 1)], 4, ["big"], [], 1),
        ([("a", N, 0, 99, 1), ("big", N, 1, 99, 10)], 4, ["a"], [], 1),
        # exactly full
        ([("a", N, 0, 99, 4), ("b", N, 1, 99, 1)], 4, ["a"], [], 1),
        # expired (deadline <= now, now = 10) come back apart and never in the batch
        ([("old", N, 0, 10, 1), ("a", N, 1, 99, 1)], 4, ["a"], ["old"], 0),
        ([("x", N, 0, 5, 1), ("y", N, 1, 9.999, 1)], 4, [], ["x", "y"], 0),
        ([("a", N, 0, 10.001, 1), ("x", N, 1, 3, 1), ("b", N, 2, 99, 1)], 4, ["a", "b"], ["x"], 0),
        # an expired entry does not use batch room
        ([("x", N, 0, 1, 3), ("a", N, 1, 99, 2), ("b", N, 2, 99, 2)], 4, ["a", "b"], ["x"], 0),
        # priority order within the batch
        (
            [("low", L, 0, 99, 1), ("norm", N, 1, 99, 1), ("crit", C, 2, 99, 1), ("high", H, 3, 99, 1)],
            3,
            ["crit", "high", "norm"],
            [],
            1,
        ),
    ],
)
def test_next_batch(
    specs: list[tuple[str, Priority, float, float, int]],
    max_batch: int,
    batch: list[str],
    expired: list[str],
    left: int,
) -> None:
    q = make_queue(*specs)
    got, gone = next_batch(q, 10.0, BatchLimits(max_batch_size=max_batch))
    assert names(got) == batch
    assert names(gone) == expired
    assert len(q) == left


def test_next_batch_skips_cancelled_entries() -> None:
    q = RequestQueue(aging_seconds=NO_AGING)
    a, b, c = (Entry(N, float(i), 99.0, 1, payload=n) for i, n in enumerate("abc"))
    for e in (a, b, c):
        q.push(e)
    q.cancel(b)
    got, gone = next_batch(q, 10.0, BatchLimits(max_batch_size=8))
    assert names(got) == ["a", "c"]
    assert gone == []


def test_successive_batches_drain_the_queue_in_order() -> None:
    q = make_queue(*[(f"e{i}", N, float(i), 99.0, 1) for i in range(7)])
    limits = BatchLimits(max_batch_size=3)
    seen = []
    while q:
        batch, _ = next_batch(q, 10.0, limits)
        assert 1 <= sum(e.size for e in batch) <= 3
        seen.append(names(batch))
    assert seen == [["e0", "e1", "e2"], ["e3", "e4", "e5"], ["e6"]]


@given(
    st.lists(st.tuples(st.integers(1, 6), st.integers(0, 20), st.sampled_from(list(Priority))), max_size=30),
    st.integers(1, 8),
)
def test_next_batch_invariants(specs: list[tuple[int, int, Priority]], max_batch: int) -> None:
    now = 10.0
    q = RequestQueue(aging_seconds=NO_AGING)
    pushed = [Entry(p, float(i), float(deadline), size) for i, (size, deadline, p) in enumerate(specs)]
    for e in pushed:
        q.push(e)
    out: list[Entry] = []
    while q:
        batch, expired = next_batch(q, now, BatchLimits(max_batch_size=max_batch))
        assert all(e.deadline <= now for e in expired)
        assert all(e.deadline > now for e in batch)
        size = sum(e.size for e in batch)
        assert size <= max_batch or len(batch) == 1  # only an oversize entry breaks the limit
        assert [e.priority for e in batch] == sorted(e.priority for e in batch)
        out += batch + expired
    assert sorted(map(id, out)) == sorted(map(id, pushed))  # each entry exactly once


# -- hold_until -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sizes", "max_batch", "max_wait_ms", "now", "expected"),
    [
        ([], 4, 50, 0.0, None),  # nothing queued
        ([1], 4, 0, 0.0, None),  # max_wait 0: dispatch as soon as the worker is idle
        ([4], 4, 50, 0.0, None),  # already full
        ([2, 3], 4, 50, 0.0, None),  # more than full
        ([1], 4, 50, 0.0, 0.05),  # not full: release 50 ms after the oldest arrival (0.0)
        ([1, 1], 4, 50, 0.01, 0.05),
        ([1], 4, 50, 0.05, None),  # release time reached
        ([1], 4, 50, 0.2, None),  # release time passed
    ],
)
def test_hold_until(
    sizes: list[int], max_batch: int, max_wait_ms: float, now: float, expected: float | None
) -> None:
    q = RequestQueue()
    for i, size in enumerate(sizes):
        q.push(Entry(N, i * 0.001, 99.0, size))
    got = hold_until(q, now, BatchLimits(max_batch_size=max_batch, max_wait_ms=max_wait_ms))
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_hold_until_uses_the_oldest_live_entry_of_any_priority() -> None:
    q = RequestQueue()
    first = Entry(L, 1.0, 99.0, 1)
    q.push(first)
    q.push(Entry(C, 2.0, 99.0, 1))
    limits = BatchLimits(max_batch_size=8, max_wait_ms=100)
    assert hold_until(q, 1.05, limits) == pytest.approx(1.1)
    assert hold_until(q, 1.5, limits) is None  # the oldest waited long enough
    q.cancel(first)  # the oldest gone: the next oldest decides
    assert hold_until(q, 2.05, limits) == pytest.approx(2.1)


G = RETURN_GAP_S


@pytest.mark.parametrize(
    ("queued", "last_arrival", "compute_s", "max_wait_ms", "now", "expected"),
    [
        (2, 1.0015, 0.2, 0.0, 1.002, 1.0015 + G),  # 2 of the 8 answered are back, more coming: wait
        (2, 1.0015, 0.2, 0.0, 1.0015 + G + 0.0005, None),  # none for a gap: go with what came
        (2, 1.0, 0.2, 0.0, 1.001, 1.0 + G),  # none back yet: wait a gap from the answers going out
        (8, 1.0015, 0.2, 0.0, 1.002, None),  # all back: go
        (7, 1.004, 0.02, 0.0, 1.0041, 1.0 + RETURN_WAIT_SHARE * 0.02),  # still coming, but capped
        (2, 1.0015, 0.2, 50.0, 1.002, 1.05),  # max_wait_ms holds longer: the later wins
    ],
)
def test_hold_until_waits_for_clients_just_answered_while_they_keep_coming(
    queued: int,
    last_arrival: float,
    compute_s: float,
    max_wait_ms: float,
    now: float,
    expected: float | None,
) -> None:
    q = RequestQueue()
    for i in range(queued):
        q.push(Entry(N, 1.0 + i * 0.0001, 99.0, 1))
    returning = Returning.after(8, 1.0, compute_s)
    limits = BatchLimits(max_batch_size=8, max_wait_ms=max_wait_ms)
    got = hold_until(q, now, limits, returning, last_arrival)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_no_return_wait_for_a_lone_client_or_before_any_batch() -> None:
    q = RequestQueue()
    q.push(Entry(N, 1.0, 99.0, 1))
    limits = BatchLimits(max_batch_size=8)
    assert hold_until(q, 1.001, limits, Returning.after(1, 1.0, 0.2), 1.0005) is None
    assert hold_until(q, 1.001, limits, None, 1.0005) is None


def test_the_return_wait_is_a_share_of_the_batch_and_capped() -> None:
    assert Returning.after(8, 10.0, 0.040).until == pytest.approx(10.0 + RETURN_WAIT_SHARE * 0.040)
    assert Returning.after(8, 10.0, 5.0).until == pytest.approx(10.0 + RETURN_WAIT_MAX_S)
    full = RequestQueue()
    for _ in range(3):
        full.push(Entry(N, 1.0, 99.0, 4))  # 12 inputs queued: a batch of 8 is ready
    assert hold_until(full, 1.0, BatchLimits(max_batch_size=8), Returning.after(8, 1.0, 1.0), 1.0) is None


def _grouped(*specs: tuple[str, object]) -> RequestQueue:
    q = RequestQueue(NO_AGING)
    for i, (name, group) in enumerate(specs):
        q.push(Entry(Priority.NORMAL, float(i), 100.0, 1, name, group))
    return q


@pytest.mark.parametrize(
    ("specs", "batches"),
    [
        # No groups: one batch, as before.
        ([("a", None), ("b", None), ("c", None)], [["a", "b", "c"]]),
        # The head's group decides; other groups stay queued in their order.
        ([("a", "s1"), ("b", None), ("c", "s1"), ("d", "s2")], [["a", "c"], ["b"], ["d"]]),
        ([("a", None), ("b", "s1"), ("c", None), ("d", "s1")], [["a", "c"], ["b", "d"]]),
        # Equal keys batch together (seeded requests with identical parameters and seed).
        (
            [("a", ("seeded", 1.0, 7)), ("b", ("seeded", 1.0, 7)), ("c", ("seeded", 1.0, 8))],
            [["a", "b"], ["c"]],
        ),
    ],
)
def test_next_batch_keeps_groups_apart(specs: list[tuple[str, object]], batches: list[list[str]]) -> None:
    q = _grouped(*specs)
    got = []
    while len(q):
        batch, expired = next_batch(q, 0.0, BatchLimits(max_batch_size=8))
        assert not expired
        got.append(names(batch))
    assert got == batches


def test_skipped_entries_keep_their_counts_and_the_batch_limit_holds() -> None:
    q = _grouped(*[(f"x{i}", i % 2) for i in range(10)])
    batch, _ = next_batch(q, 0.0, BatchLimits(max_batch_size=3))
    assert names(batch) == ["x0", "x2", "x4"]
    assert len(q) == 7 and q.items == 7
    batch, _ = next_batch(q, 0.0, BatchLimits(max_batch_size=8))
    assert names(batch) == ["x1", "x3", "x5", "x7", "x9"]


def test_a_batch_limited_to_critical_leaves_the_rest_queued() -> None:
    C, L = Priority.CRITICAL, Priority.LOW
    q = make_queue(("c1", C, 1.0, 99.0, 1), ("low", L, 0.5, 99.0, 1), ("c2", C, 2.0, 99.0, 1))
    batch, expired = next_batch(q, 3.0, BatchLimits(max_batch_size=8), only=C)
    assert names(batch) == ["c1", "c2"] and not expired
    rest, _ = next_batch(q, 3.0, BatchLimits(max_batch_size=8))
    assert names(rest) == ["low"]
