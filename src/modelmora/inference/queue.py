"""A pure priority queue: four levels, FIFO within a level, aging, and lazy removal.

One deque per level keeps push and pop O(1); within a level the head is always the oldest
entry, so aging only ever has to look at four heads. The clock is passed in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from modelmora.errors import ErrorCode, ModelMoraError


class Priority(IntEnum):
    CRITICAL = 1
    HIGH = 2
    NORMAL = 3
    LOW = 4


_NAMES = {p.name.lower(): p for p in Priority} | {"medium": Priority.NORMAL}


def parse_priority(value: str | int | None) -> Priority:
    if value is None:
        return Priority.NORMAL
    if isinstance(value, bool):
        raise _bad_priority(value)
    if isinstance(value, int):
        if 1 <= value <= 4:
            return Priority(value)
        raise _bad_priority(value)
    key = str(value).strip().lower()
    if key in _NAMES:
        return _NAMES[key]
    if key.isascii() and key.isdigit():  # not "²" or "٣": int() rejects or misreads those
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
    cancelled: bool = field(default=False)


class RequestQueue:
    def __init__(self, aging_seconds: float = 10.0) -> None:
        self._levels: tuple[deque[Entry], ...] = tuple(deque() for _ in Priority)
        self._aging = aging_seconds
        self._queued: set[Entry] = set()  # pushed, neither popped nor cancelled
        self._live = 0  # entries neither popped nor cancelled
        self._items = 0  # inputs of live entries

    def __len__(self) -> int:
        return self._live

    @property
    def items(self) -> int:
        return self._items

    def depth_by_priority(self) -> dict[Priority, int]:
        return {p: sum(1 for e in self._levels[p - 1] if not e.cancelled) for p in Priority}

    def push(self, entry: Entry) -> None:
        self._levels[entry.priority - 1].append(entry)
        self._queued.add(entry)
        self._live += 1
        self._items += entry.size

    def cancel(self, entry: Entry) -> bool:
        """Mark an entry dead; it is dropped when it reaches the head. False if already gone."""
        # An entry already popped (in flight) or never pushed is not ours to count down.
        if entry.cancelled or entry not in self._queued:
            return False
        self._queued.discard(entry)
        entry.cancelled = True
        self._live -= 1
        self._items -= entry.size
        return True

    def _effective(self, entry: Entry, now: float) -> float:
        # Each `aging_seconds` of waiting lifts an entry one level; ties go to the older one.
        return entry.priority - (now - entry.arrival) / self._aging

    def _head_level(self, now: float) -> int | None:
        best: int | None = None
        best_key: tuple[float, float] | None = None
        for index, level in enumerate(self._levels):
            while level and level[0].cancelled:
                level.popleft()
            if not level:
                continue
            head = level[0]
            key = (self._effective(head, now), head.arrival)
            if best_key is None or key < best_key:
                best, best_key = index, key
        return best

    def peek(self, now: float) -> Entry | None:
        index = self._head_level(now)
        return None if index is None else self._levels[index][0]

    def pop(self, now: float) -> Entry | None:
        index = self._head_level(now)
        if index is None:
            return None
        entry = self._levels[index].popleft()
        self._queued.discard(entry)
        self._live -= 1
        self._items -= entry.size
        return entry

    def oldest_arrival(self) -> float | None:
        arrivals = [next((e.arrival for e in level if not e.cancelled), None) for level in self._levels]
        live = [a for a in arrivals if a is not None]
        return min(live) if live else None
