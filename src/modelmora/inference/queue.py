"""A pure priority queue: four levels, FIFO within a level, aging, and lazy removal.

One binary heap with a static key (see RequestQueue): push and pop are O(log n) at about
the cost of plain heapq; cancelled entries are dropped when they reach the top.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from dataclasses import dataclass, field
from enum import IntEnum
from heapq import heappop, heappush
from typing import Any

from modelmora.errors import ErrorCode, ModelMoraError


class Priority(IntEnum):
    CRITICAL = 1
    HIGH = 2
    NORMAL = 3
    LOW = 4


_NAMES = {p.name.lower(): p for p in Priority} | {"medium": Priority.NORMAL}


def parse_priority(value: object) -> Priority:
    """A name, or 1-4 as an int or a string of ASCII digits; nothing else is coerced: a bool
    is an int to Python (`True` would run as critical) and a float or other object is no
    priority at all, whichever door it came through."""
    if value is None:
        return Priority.NORMAL
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _bad_priority(value)
    if isinstance(value, int):
        if 1 <= value <= 4:
            return Priority(value)
        raise _bad_priority(value)
    key = value.strip().lower()
    if key in _NAMES:
        return _NAMES[key]
    # Not "²" or "٣" (int() rejects or misreads those), nor thousands of digits (int() raises).
    if key.isascii() and key.isdigit() and len(key) <= 9:
        return parse_priority(int(key))
    raise _bad_priority(value)


def _bad_priority(value: object) -> ModelMoraError:
    return ModelMoraError(
        ErrorCode.VALIDATION_ERROR,
        f"invalid priority {value!r}: use critical, high, normal, low or 1-4",
        {"errors": [{"field": "priority", "message": "must be critical|high|normal|low or 1-4"}]},
    )


@dataclass(eq=False, slots=True)
class Entry:
    """One queued request. `size` counts its inputs, which is what a batch limit bounds."""

    priority: Priority
    arrival: float
    deadline: float
    size: int
    payload: Any = None
    # Entries share a batch only when their groups are equal (the parameters one forward pass
    # must share, e.g. a seed or an image size); None is the task's common group.
    group: Hashable | None = None
    cancelled: bool = field(default=False)
    queued: bool = field(default=False)  # pushed, neither popped nor cancelled


class RequestQueue:
    """Aging as a static key: an entry's effective level is `priority - waited / aging`, and
    since `now` is common to every entry, ordering by that equals ordering by
    `priority * aging + arrival`. So one binary heap keyed once at push gives priority order,
    FIFO within a level and bounded waiting (a low entry waits at most 3 * aging behind fresh
    critical ones), at the cost of plain heapq. `now` is accepted for the pure-function API."""

    def __init__(self, aging_seconds: float = 10.0) -> None:
        self._heap: list[tuple[float, int, Entry]] = []
        self._aging = aging_seconds
        self._seq = itertools.count()
        self._live = 0  # entries neither popped nor cancelled
        self._items = 0  # inputs of live entries

    def __len__(self) -> int:
        return self._live

    @property
    def items(self) -> int:
        return self._items

    def depth_by_priority(self) -> dict[Priority, int]:
        depth = dict.fromkeys(Priority, 0)
        for _, _, entry in self._heap:
            if entry.queued:
                depth[entry.priority] += 1
        return depth

    def push(self, entry: Entry) -> None:
        entry.queued = True
        heappush(self._heap, (entry.priority * self._aging + entry.arrival, next(self._seq), entry))
        self._live += 1
        self._items += entry.size

    def put_back(self, entries: list[Entry]) -> None:
        """Return popped entries in their old places (the key is static; the sequence number
        only breaks ties, and these keep their relative order)."""
        for entry in entries:
            self.push(entry)

    def cancel(self, entry: Entry) -> bool:
        """Mark an entry dead; it is dropped when it reaches the head. False if already gone
        (popped, in flight, cancelled, or never pushed): not ours to count down."""
        if not entry.queued:
            return False
        entry.queued = False
        entry.cancelled = True
        self._live -= 1
        self._items -= entry.size
        return True

    def _skip_dead(self) -> None:
        heap = self._heap
        while heap and not heap[0][2].queued:
            heappop(heap)

    def peek(self, now: float) -> Entry | None:
        self._skip_dead()
        return self._heap[0][2] if self._heap else None

    def pop(self, now: float) -> Entry | None:
        heap = self._heap
        while heap:
            entry = heappop(heap)[2]
            if entry.queued:
                break
        else:
            return None
        entry.queued = False
        self._live -= 1
        self._items -= entry.size
        return entry

    def oldest_arrival(self) -> float | None:
        """O(n): only the batcher's `max_wait_ms` hold asks, once per scheduling decision."""
        arrivals = [entry.arrival for _, _, entry in self._heap if entry.queued]
        return min(arrivals) if arrivals else None
