"""RequestQueue and parse_priority: priority order, FIFO, aging, lazy cancellation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.inference.queue import Entry, Priority, RequestQueue, parse_priority

NO_AGING = 1e12


def entry(priority: Priority | int, arrival: float, *, size: int = 1, payload: object = None) -> Entry:
    return Entry(Priority(priority), arrival, deadline=arrival + 1_000, size=size, payload=payload)


def drain(queue: RequestQueue, now: float) -> list[Entry]:
    out = []
    while (e := queue.pop(now)) is not None:
        out.append(e)
    return out


# -- parse_priority ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, Priority.NORMAL),
        ("critical", Priority.CRITICAL),
        ("high", Priority.HIGH),
        ("normal", Priority.NORMAL),
        ("medium", Priority.NORMAL),
        ("low", Priority.LOW),
        ("HIGH", Priority.HIGH),
        ("  Low ", Priority.LOW),
        (1, Priority.CRITICAL),
        (2, Priority.HIGH),
        (3, Priority.NORMAL),
        (4, Priority.LOW),
        ("1", Priority.CRITICAL),
        ("4", Priority.LOW),
        (Priority.HIGH, Priority.HIGH),
    ],
)
def test_parse_priority_accepts(value: object, expected: Priority) -> None:
    assert parse_priority(value) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value",
    [True, False, 0, 5, -1, 100, "0", "5", "urgent", "", "  ", "1.5", 2.0, "high!", "²", "٣", "+2"],
)
def test_parse_priority_rejects(value: object) -> None:
    with pytest.raises(ModelMoraError) as info:
        parse_priority(value)  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.VALIDATION_ERROR
    assert info.value.details["errors"][0]["field"] == "priority"


@given(st.one_of(st.text(max_size=8), st.integers(), st.booleans(), st.floats(allow_nan=False)))
def test_parse_priority_never_raises_anything_else(value: object) -> None:
    try:
        assert parse_priority(value) in set(Priority)  # type: ignore[arg-type]
    except ModelMoraError as exc:
        assert exc.code is ErrorCode.VALIDATION_ERROR


# -- order ------------------------------------------------------------------------------------


def test_empty_queue() -> None:
    q = RequestQueue()
    assert len(q) == 0
    assert q.items == 0
    assert q.pop(0.0) is None
    assert q.peek(0.0) is None
    assert q.oldest_arrival() is None
    assert q.depth_by_priority() == dict.fromkeys(Priority, 0)


def test_priority_order_then_fifo_within_level() -> None:
    q = RequestQueue(aging_seconds=NO_AGING)
    pushed = [
        entry(Priority.LOW, 0, payload="low-1"),
        entry(Priority.NORMAL, 1, payload="normal-1"),
        entry(Priority.CRITICAL, 2, payload="crit-1"),
        entry(Priority.HIGH, 3, payload="high-1"),
        entry(Priority.NORMAL, 4, payload="normal-2"),
        entry(Priority.CRITICAL, 5, payload="crit-2"),
        entry(Priority.LOW, 6, payload="low-2"),
    ]
    for e in pushed:
        q.push(e)
    assert q.peek(10).payload == "crit-1"  # type: ignore[union-attr]
    assert len(q) == 7  # peek takes nothing
    assert [e.payload for e in drain(q, 10)] == [
        "crit-1",
        "crit-2",
        "high-1",
        "normal-1",
        "normal-2",
        "low-1",
        "low-2",
    ]
    assert len(q) == 0 and q.items == 0


# -- aging ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("high_arrival", "now", "first"),
    [
        # aging 10 s per level: a LOW entry (4) gains on a HIGH one (2) by the gap in arrival,
        # so it goes first once it arrived 2 * 10 s earlier; an exact tie goes to the older.
        (0.0, 0.0, "high"),
        (15.0, 15.0, "high"),
        (19.5, 40.0, "high"),
        (20.0, 20.0, "low"),  # 4 - 2 == 2 - 0: tie -> the older
        (20.0, 95.0, "low"),
        (25.0, 25.0, "low"),
    ],
)
def test_aging_lifts_an_old_low_entry(high_arrival: float, now: float, first: str) -> None:
    q = RequestQueue(aging_seconds=10.0)
    q.push(entry(Priority.LOW, 0.0, payload="low"))
    q.push(entry(Priority.HIGH, high_arrival, payload="high"))
    got = q.pop(now)
    assert got is not None and got.payload == first


def test_old_low_entry_overtakes_newer_high_entries_after_enough_aging() -> None:
    q = RequestQueue(aging_seconds=10.0)
    q.push(entry(Priority.LOW, 0.0, payload="old-low"))
    q.push(entry(Priority.HIGH, 25.0, payload="high-a"))
    q.push(entry(Priority.HIGH, 26.0, payload="high-b"))
    # At t=25: low effective 4 - 2.5 = 1.5, high-a effective 2 - 0 = 2: the low one goes first.
    assert q.peek(25.0).payload == "old-low"  # type: ignore[union-attr]
    # Without enough waiting the high entries go first.
    q2 = RequestQueue(aging_seconds=10.0)
    q2.push(entry(Priority.LOW, 0.0, payload="old-low"))
    q2.push(entry(Priority.HIGH, 1.0, payload="high-a"))
    assert q2.peek(2.0).payload == "high-a"  # type: ignore[union-attr]


def test_exact_tie_after_aging_goes_to_the_older_entry() -> None:
    q = RequestQueue(aging_seconds=10.0)
    q.push(entry(Priority.NORMAL, 0.0, payload="normal"))  # 3 - 10/10 = 2 at t=10
    q.push(entry(Priority.HIGH, 10.0, payload="high"))  # 2 - 0 = 2 at t=10
    assert [e.payload for e in drain(q, 10.0)] == ["normal", "high"]


def test_aging_never_reorders_within_a_level() -> None:
    q = RequestQueue(aging_seconds=0.001)
    for i in range(5):
        q.push(entry(Priority.LOW, float(i), payload=i))
    assert [e.payload for e in drain(q, 1_000.0)] == [0, 1, 2, 3, 4]


# -- cancel -----------------------------------------------------------------------------------


def test_cancel_bookkeeping_and_cancelled_never_popped() -> None:
    q = RequestQueue(aging_seconds=NO_AGING)
    a = entry(Priority.HIGH, 0, size=3, payload="a")
    b = entry(Priority.HIGH, 1, size=2, payload="b")
    c = entry(Priority.LOW, 2, size=5, payload="c")
    for e in (a, b, c):
        q.push(e)
    assert (len(q), q.items) == (3, 10)

    assert q.cancel(a) is True
    assert a.cancelled
    assert (len(q), q.items) == (2, 7)
    assert q.cancel(a) is False  # double cancel
    assert (len(q), q.items) == (2, 7)
    assert q.depth_by_priority() == {
        Priority.CRITICAL: 0,
        Priority.HIGH: 1,
        Priority.NORMAL: 0,
        Priority.LOW: 1,
    }
    assert q.oldest_arrival() == 1

    assert q.peek(0).payload == "b"  # type: ignore[union-attr]
    assert [e.payload for e in drain(q, 0)] == ["b", "c"]
    assert (len(q), q.items) == (0, 0)


def test_cancel_all_leaves_an_empty_queue() -> None:
    q = RequestQueue()
    entries = [entry(p, float(i)) for i, p in enumerate(Priority)]
    for e in entries:
        q.push(e)
    assert all(q.cancel(e) for e in entries)
    assert (len(q), q.items, bool(q)) == (0, 0, False)
    assert q.pop(0) is None
    assert q.oldest_arrival() is None


def test_cancel_after_pop_returns_false_and_keeps_counts() -> None:
    """An entry already handed to a worker is not in the queue any more: the scheduler relies on
    `cancel` returning False to tell the worker instead, and the counts must not go negative."""
    q = RequestQueue()
    a = entry(Priority.NORMAL, 0, size=4)
    b = entry(Priority.NORMAL, 1, size=2)
    q.push(a)
    q.push(b)
    assert q.pop(0) is a
    assert q.cancel(a) is False
    assert (len(q), q.items) == (1, 2)
    assert q.pop(0) is b
    assert (len(q), q.items) == (0, 0)


def test_cancel_of_an_entry_never_pushed_is_false() -> None:
    q = RequestQueue()
    q.push(entry(Priority.LOW, 0))
    assert q.cancel(entry(Priority.LOW, 1)) is False
    assert len(q) == 1 and q.items == 1


# -- snapshots --------------------------------------------------------------------------------


def test_depth_by_priority_and_oldest_arrival() -> None:
    q = RequestQueue()
    q.push(entry(Priority.LOW, 5.0))
    q.push(entry(Priority.CRITICAL, 7.0))
    q.push(entry(Priority.CRITICAL, 8.0))
    q.push(entry(Priority.NORMAL, 6.0))
    assert q.depth_by_priority() == {
        Priority.CRITICAL: 2,
        Priority.HIGH: 0,
        Priority.NORMAL: 1,
        Priority.LOW: 1,
    }
    assert q.oldest_arrival() == 5.0
    q.pop(9.0)  # a critical one
    assert q.depth_by_priority()[Priority.CRITICAL] == 1
    assert q.oldest_arrival() == 5.0


# -- property ---------------------------------------------------------------------------------

_ops = st.lists(
    st.tuples(st.sampled_from(list(Priority)), st.integers(1, 5), st.booleans()),
    max_size=40,
)


@given(_ops)
def test_without_aging_pop_order_is_priority_then_arrival(ops: list[tuple[Priority, int, bool]]) -> None:
    q = RequestQueue(aging_seconds=NO_AGING)
    pushed = []
    for arrival, (priority, size, cancel) in enumerate(ops):
        e = Entry(priority, float(arrival), 1e9, size)
        q.push(e)
        pushed.append((e, cancel))
    for e, cancel in pushed:
        if cancel:
            assert q.cancel(e)
    live = [e for e, cancel in pushed if not cancel]
    assert len(q) == len(live)
    assert q.items == sum(e.size for e in live)

    popped = drain(q, 1_000.0)
    assert not any(e.cancelled for e in popped)
    assert popped == sorted(live, key=lambda e: (e.priority, e.arrival))
    assert (len(q), q.items) == (0, 0)
