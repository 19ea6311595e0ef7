"""Recent request figures per model, for the console's charts and `GET /api/v1/stats`.

Prometheus keeps the long history; this keeps the last minutes in the server itself, so a
console (or `modelmora` on a laptop) can draw rate, latency quantiles and batch size without a
Prometheus next to it.

A ring of fixed time slots per model (`slot_seconds` each, `keep_seconds` in all): a slot is
reused when the clock comes round to it again, so nothing grows with traffic. A slot holds
counts and a latency histogram on fixed log-spaced bins (each bin 20% wider than the one
before, 0.1 ms to 20 min), from which quantiles are read to within the bin's width (about
+-10%), as Prometheus' `histogram_quantile` does with coarser buckets.

Memory is bounded: at most `max_models` models (the least recently active one is dropped
first), each at most `keep_seconds / slot_seconds` slots of `len(BINS)` 32-bit counts; with the
defaults 128 x 180 x 90 x 4 bytes, about 8 MiB in the worst case, far less in practice since a
slot's histogram is only allocated once a request in it succeeded.

Recording costs a dict look-up, a logarithm and a few integer additions, on the event loop.
"""

from __future__ import annotations

import math
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Latency bins: upper bounds in seconds, each RATIO times the one before.
RATIO = 1.2
FIRST = 1e-4
BINS = tuple(FIRST * RATIO**i for i in range(90))  # up to ~1300 s
_LOG_RATIO = math.log(RATIO)

MIN_WINDOW = 10
DEFAULT_WINDOW = 300


def _bin(seconds: float) -> int:
    if seconds <= FIRST:
        return 0
    return min(len(BINS) - 1, math.ceil(math.log(seconds / FIRST) / _LOG_RATIO))


@dataclass(slots=True)
class _Slot:
    epoch: int  # which slot of time (time // slot_seconds) these counts belong to
    ok: int = 0
    errors: int = 0
    batch_items: int = 0  # sum over successful requests of the batch each rode in
    latency: array[int] | None = None  # counts per bin, allocated on the first success

    def reset(self, epoch: int) -> None:
        self.epoch = epoch
        self.ok = self.errors = self.batch_items = 0
        if self.latency is not None:
            for i in range(len(self.latency)):
                self.latency[i] = 0


@dataclass(slots=True)
class _Model:
    slots: list[_Slot | None] = field(default_factory=list)


def _quantile(counts: array[int], total: int, q: float) -> float:
    """The q-quantile in milliseconds: the geometric middle of the bin it falls in."""
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        seen += count
        if count and seen >= rank:
            upper = BINS[i]
            lower = BINS[i - 1] if i else upper / RATIO
            return round(math.sqrt(lower * upper) * 1000, 3)
    return round(BINS[-1] * 1000, 3)  # pragma: no cover - rank <= total always lands


class RequestStats:
    """The recent figures of every model (one per server, held by `Metrics`)."""

    def __init__(
        self,
        slot_seconds: int = 5,
        keep_seconds: int = 900,
        max_models: int = 128,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if slot_seconds < 1 or keep_seconds < slot_seconds:
            raise ValueError("need 1 <= slot_seconds <= keep_seconds")
        self.slot_seconds = slot_seconds
        self.keep_seconds = keep_seconds
        self.size = keep_seconds // slot_seconds
        self.max_models = max_models
        self.clock = clock
        self._models: OrderedDict[str, _Model] = OrderedDict()

    # -- recording (the request path) -------------------------------------------------------

    def _slot(self, model: str) -> _Slot:
        epoch = int(self.clock() // self.slot_seconds)
        entry = self._models.get(model)
        if entry is None:
            entry = self._models[model] = _Model([None] * self.size)
            if len(self._models) > self.max_models:
                self._models.popitem(last=False)
        else:
            self._models.move_to_end(model)
        index = epoch % self.size
        slot = entry.slots[index]
        if slot is None:
            slot = entry.slots[index] = _Slot(epoch)
        elif slot.epoch != epoch:
            slot.reset(epoch)
        return slot

    def record_ok(self, model: str, seconds: float, batch_size: int) -> None:
        slot = self._slot(model)
        slot.ok += 1
        slot.batch_items += batch_size
        if slot.latency is None:
            slot.latency = array("I", bytes(4 * len(BINS)))
        slot.latency[_bin(seconds)] += 1

    def record_error(self, model: str) -> None:
        slot = self._slot(model)
        slot.errors += 1

    def forget(self, model: str) -> None:
        self._models.pop(model, None)

    # -- reading ----------------------------------------------------------------------------

    def check_window(self, window: int) -> int:
        """`window` if this ring covers it, else ValueError naming the allowed range."""
        if not MIN_WINDOW <= window <= self.keep_seconds:
            raise ValueError(f"window must be between {MIN_WINDOW} and {self.keep_seconds} seconds")
        return window

    def series(self, window: int = DEFAULT_WINDOW) -> dict[str, Any]:
        """The last `window` seconds, one point per slot, oldest first; the last point is the
        slot in progress (its rate over the seconds it has run). Per model: requests and
        errors per second, p50/p90/p99 latency (ms, successful requests, None for a slot
        without one), mean batch size the requests rode in; and the window's totals."""
        window = self.check_window(window)
        now = self.clock()
        step = self.slot_seconds
        current = int(now // step)
        count = min(self.size, -(-window // step))
        epochs = range(current - count + 1, current + 1)
        elapsed = max(1.0, now - current * step)
        spans = [float(step)] * (count - 1) + [min(float(step), elapsed)]
        models = []
        for name, entry in self._models.items():
            slots = [entry.slots[e % self.size] for e in epochs]
            live = [s if s is not None and s.epoch == e else None for s, e in zip(slots, epochs, strict=True)]
            if all(s is None for s in live):
                continue
            models.append(_model_series(name, live, spans))
        models.sort(key=lambda m: m["name"])
        return {
            "window_seconds": window,
            "step_seconds": step,
            "now": round(now, 3),
            "timestamps": [e * step for e in epochs],
            "models": models,
        }


def _model_series(name: str, slots: list[_Slot | None], spans: list[float]) -> dict[str, Any]:
    rate: list[float] = []
    errors: list[float] = []
    p50: list[float | None] = []
    p90: list[float | None] = []
    p99: list[float | None] = []
    batch: list[float | None] = []
    total = array("I", bytes(4 * len(BINS)))
    ok_total = err_total = items_total = 0
    for slot, span in zip(slots, spans, strict=True):
        if slot is None or slot.ok + slot.errors == 0:
            rate.append(0.0)
            errors.append(0.0)
            p50.append(None)
            p90.append(None)
            p99.append(None)
            batch.append(None)
            continue
        rate.append(round((slot.ok + slot.errors) / span, 3))
        errors.append(round(slot.errors / span, 3))
        ok_total += slot.ok
        err_total += slot.errors
        items_total += slot.batch_items
        if slot.ok and slot.latency is not None:
            p50.append(_quantile(slot.latency, slot.ok, 0.5))
            p90.append(_quantile(slot.latency, slot.ok, 0.9))
            p99.append(_quantile(slot.latency, slot.ok, 0.99))
            batch.append(round(slot.batch_items / slot.ok, 2))
            for i, c in enumerate(slot.latency):
                total[i] += c
        else:
            p50.append(None)
            p90.append(None)
            p99.append(None)
            batch.append(None)
    totals: dict[str, Any] = {
        "requests": ok_total + err_total,
        "errors": err_total,
        "p50_ms": _quantile(total, ok_total, 0.5) if ok_total else None,
        "p99_ms": _quantile(total, ok_total, 0.99) if ok_total else None,
        "batch_size": round(items_total / ok_total, 2) if ok_total else None,
    }
    return {
        "name": name,
        "requests_per_second": rate,
        "errors_per_second": errors,
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "batch_size": batch,
        "totals": totals,
    }
