"""Sub-batches inside a worker: a long batch runs in bounded pieces.

One request may carry hundreds of long inputs; run as one forward, nothing can stop it (a
cancel or a passed deadline is only seen once it is done) and its intermediate buffers grow
with the whole list. Cut into pieces of at most `rows` inputs and `weight` units (characters
of text, decoded bytes of images), a request that nobody waits for any more is dropped at the
next piece, and each piece's memory is freed before the next is built. A batch that fits in
one piece runs as before (the pipelined worker prepares it while the model computes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modelmora.contracts.channel import WorkItem
from modelmora.tasks.base import EmitFn

DEFAULT_ROWS = 32
DEFAULT_TEXT_CHARS = 256_000


@dataclass(frozen=True, slots=True)
class Row:
    """One input of the batch: its position in the flat list, and its request."""

    index: int
    request_id: str


@dataclass
class Pieces:
    rows: list[list[Row]]
    dropped: set[str] = field(default_factory=set)  # requests given up between pieces

    def live(self, piece: list[Row], emit: EmitFn) -> list[Row]:
        """The piece's rows whose request is still wanted (cancelled and expired ones are
        noted in `dropped` and skipped from here on)."""
        for request_id in {r.request_id for r in piece} - self.dropped:
            if emit.cancelled(request_id):
                self.dropped.add(request_id)
        return [r for r in piece if r.request_id not in self.dropped]


def option_int(options: dict[str, Any], key: str, default: int) -> int:
    value = options.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"options.{key} must be a whole number >= 1, not {value!r}")
    return value


def split(items: list[WorkItem], rows: int, weight: int, weigh: Callable[[Any], int]) -> Pieces:
    """The batch's inputs in order, cut whenever a piece would pass `rows` inputs or `weight`
    units (a single input heavier than `weight` is a piece of its own)."""
    pieces: list[list[Row]] = []
    current: list[Row] = []
    load = 0
    index = 0
    for item in items:
        for value in item.inputs:
            w = weigh(value)
            if current and (len(current) >= rows or load + w > weight):
                pieces.append(current)
                current, load = [], 0
            current.append(Row(index, item.request_id))
            load += w
            index += 1
    if current:
        pieces.append(current)
    return Pieces(pieces)
