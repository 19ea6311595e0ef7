"""The worker's loop in continuous (iteration-level) batching.

Entered when the server sends `Stepping` after a load: from then on the worker runs one
batch that never ends. Between two steps it takes every `Infer` that arrived (each a request
joining), drops cancelled rows, prefills the newcomers that fit and runs one decoding step
for all; each request gets its own `BatchDone` the moment its rows are done. After every
step whose room changed it sends a `Credit`: the free slots, the KV tokens still free, and
how many `Infer` it has taken, so the server (which alone picks who joins, by priority and
deadline) knows exactly how much it may send. A request the server sent before it knew the
room was taken waits here for room, in priority order.

The model-specific part is the adapter's `stepper(slots)` (tasks/continuous.py for txt2txt);
an adapter without one, or whose model cannot be stepped, answers `Credit(supported=False)`
and the worker stays in its static loop. Cancel, health and stats keep being answered by the
channel reader while this loop computes.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from modelmora.contracts.channel import (
    BatchDone,
    Close,
    Credit,
    Event,
    Infer,
    ItemError,
    Outcome,
    Stepping,
    WorkItem,
)
from modelmora.tasks.base import EmitFn, RequestRejected

log = logging.getLogger("modelmora.worker")

SendFn = Callable[[object], None]
# The worker's inbox: the next message; with block False, queue.Empty when there is none.
GetFn = Callable[[bool], object]


class Joining(Protocol):
    item: WorkItem
    rows: list[Any]
    reserve: int


class Finished(Protocol):
    item: WorkItem
    outcome: Outcome
    seconds: float
    batch_size: float


class Stepper(Protocol):
    """What an adapter's `stepper(slots)` returns (tasks/continuous.py)."""

    @property
    def active(self) -> int: ...

    @property
    def free_slots(self) -> int: ...

    @property
    def free_tokens(self) -> int: ...

    def prepare(self, item: WorkItem) -> Joining: ...

    def join(self, joinings: list[Any], emit: EmitFn) -> list[Any]: ...

    def step(self, emit: EmitFn) -> list[Any]: ...

    def drop_cancelled(self, emit: EmitFn) -> list[Any]: ...

    def fail_all(self, error: ItemError) -> list[Any]: ...


class Core(Protocol):
    """The part of WorkerCore this loop uses."""

    adapter: Any
    cancelled: set[str]
    batches: int
    items: int


def open_stepper(core: Core, message: Stepping, send: SendFn) -> Stepper | None:
    """The adapter's stepper, announced with the first `Credit`; None (and a refusal sent)
    when the model cannot be stepped."""
    make = getattr(core.adapter, "stepper", None)
    reason = "this task's adapter has no step loop"
    if make is not None:
        try:
            stepper: Stepper = make(message.slots)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
        else:
            send(Credit(stepper.free_slots, stepper.free_tokens, 0))
            return stepper
    send(Credit(0, 0, 0, supported=False, reason=reason))
    return None


class _Emit:
    """The step loop's EmitFn: a request counts as cancelled once the server cancelled it or
    its deadline (`WorkItem.deadline`, time.monotonic()) passed, as in the static path."""

    __slots__ = ("_cancelled", "_send", "deadlines")

    def __init__(self, send: SendFn, cancelled: set[str]) -> None:
        self._send = send
        self._cancelled = cancelled
        self.deadlines: dict[str, float] = {}

    def __call__(self, request_id: str, kind: str, data: dict[str, Any]) -> None:
        self._send(Event(request_id, kind, data))

    def cancelled(self, request_id: str) -> bool:
        if request_id in self._cancelled:
            return True
        deadline = self.deadlines.get(request_id)
        return deadline is not None and time.monotonic() >= deadline


def _dropped(item: WorkItem, when: str) -> ItemError:
    if item.deadline is not None and time.monotonic() >= item.deadline:
        return ItemError("INFERENCE_TIMEOUT", f"the request's deadline passed {when}")
    return ItemError("CANCELLED", f"cancelled {when}")


@dataclass
class _Request:
    """One `Infer` (usually one request) until all its items are answered."""

    message: Infer
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    seconds: float = 0.0
    preprocess: float = 0.0
    batch_size: float = 0.0


@dataclass(order=True)
class _Waiting:
    priority: int
    seq: int
    joining: Any = field(compare=False)


class Loop:
    """The running batch and its bookkeeping; `run` drives it until `Close`."""

    def __init__(self, core: Core, stepper: Stepper, send: SendFn) -> None:
        self.core = core
        self.stepper = stepper
        self.send = send
        self.emit = _Emit(send, core.cancelled)
        self.received = 0
        self.waiting: list[_Waiting] = []
        self.requests: dict[int, _Request] = {}
        self.owner: dict[str, int] = {}  # request id -> batch id of its Infer
        self.reported: tuple[int, int, int] | None = (stepper.free_slots, stepper.free_tokens, 0)

    def run(self, get: GetFn) -> None:
        while True:
            idle = not self.stepper.active and not self.waiting
            for message in _drain(get, block=idle):
                if isinstance(message, Close):
                    return
                if isinstance(message, Infer):
                    self.accept(message)
                else:
                    log.warning("message ignored in continuous mode", extra={"kind": type(message).__name__})
            self.tick()

    def accept(self, message: Infer) -> None:
        self.received += 1
        request = _Request(message)
        self.requests[message.batch_id] = request
        for item in message.items:
            self.owner[item.request_id] = message.batch_id
            if item.deadline is not None:
                self.emit.deadlines[item.request_id] = item.deadline
            if self.emit.cancelled(item.request_id):
                self.answer(item, _dropped(item, "before it ran"), 0.0, 0.0)
                continue
            started = time.perf_counter()
            try:
                joining = self.stepper.prepare(item)
            except Exception as exc:
                self.answer(item, _failed(exc), 0.0, 0.0)
                continue
            request.preprocess += time.perf_counter() - started
            self.waiting.append(_Waiting(message.priority, self.received, joining))
        self.waiting.sort()

    def tick(self) -> None:
        """One iteration: cancelled rows leave, newcomers that fit join, one step for all."""
        stepper = self.stepper
        for waiting in [w for w in self.waiting if self.emit.cancelled(w.joining.item.request_id)]:
            self.waiting.remove(waiting)
            self.answer(waiting.joining.item, _dropped(waiting.joining.item, "before it ran"), 0.0, 0.0)
        finished = stepper.drop_cancelled(self.emit)
        joiners = self._take_joiners()
        if joiners:
            finished += self._join(joiners)
        if stepper.active:
            try:
                finished += stepper.step(self.emit)
            except Exception as exc:
                log.exception("decoding step failed", extra={"rows": stepper.active})
                finished += stepper.fail_all(_failed(exc))
        for done in finished:
            self.answer(done.item, done.outcome, done.seconds, done.batch_size)
        self.credit()

    def _take_joiners(self) -> list[Any]:
        """The waiting requests that fit now, in priority order; one that does not fit stops
        the line (so a large request is not overtaken forever by small ones)."""
        slots, tokens = self.stepper.free_slots, self.stepper.free_tokens
        joiners: list[Any] = []
        while self.waiting:
            joining = self.waiting[0].joining
            rows, reserve = len(joining.rows), joining.reserve
            empty = not self.stepper.active and not joiners
            if not empty and (rows > slots or reserve > tokens):
                break
            self.waiting.pop(0)
            joiners.append(joining)
            slots, tokens = slots - rows, tokens - reserve
        return joiners

    def _join(self, joiners: list[Any]) -> list[Any]:
        try:
            return self.stepper.join(joiners, self.emit)
        except Exception as exc:
            log.exception("prefill failed", extra={"requests": len(joiners)})
            if len(joiners) > 1:  # one poisoned prompt must not fail the others: each alone
                return [done for j in joiners for done in self._join([j])]
            self.answer(joiners[0].item, _failed(exc), 0.0, 0.0)
            return []

    def answer(self, item: WorkItem, outcome: Outcome, seconds: float, batch_size: float) -> None:
        batch_id = self.owner.pop(item.request_id, None)
        self.emit.deadlines.pop(item.request_id, None)
        self.core.cancelled.discard(item.request_id)
        if isinstance(outcome, ItemError) and outcome.code == "CANCELLED":
            outcome = _dropped(item, outcome.message.removeprefix("cancelled "))  # the deadline may be why
        if len(self.core.cancelled) > 4096:  # cancels that came after their request: forget them
            self.core.cancelled.clear()
        request = self.requests.get(batch_id) if batch_id is not None else None
        if request is None:
            return
        request.outcomes[item.request_id] = outcome
        request.seconds = max(request.seconds, seconds)
        request.batch_size = max(request.batch_size, batch_size)
        items = request.message.items
        if len(request.outcomes) < len(items):
            return
        del self.requests[request.message.batch_id]
        ordered = [request.outcomes[i.request_id] for i in items]
        cancelled = sum(
            1 for o in ordered if isinstance(o, ItemError) and o.code in ("CANCELLED", "INFERENCE_TIMEOUT")
        )
        errors = sum(1 for o in ordered if isinstance(o, ItemError)) - cancelled
        self.core.batches += 1
        self.core.items += len(items)
        stats = {
            "preprocess": request.preprocess,
            "forward": request.seconds,
            "postprocess": 0.0,
            "items_ok": float(len(items) - errors - cancelled),
            "items_error": float(errors),
            "items_cancelled": float(cancelled),
            "batch_size": request.batch_size or float(len(items)),
        }
        compute_ms = (request.preprocess + request.seconds) * 1000
        self.send(BatchDone(request.message.batch_id, ordered, compute_ms, stats))

    def credit(self) -> None:
        """Report the room when it changed: free slots and tokens net of the requests that
        wait here, and how many requests were taken."""
        rows = sum(len(w.joining.rows) for w in self.waiting)
        reserve = sum(w.joining.reserve for w in self.waiting)
        now = (
            max(0, self.stepper.free_slots - rows),
            max(0, self.stepper.free_tokens - reserve),
            self.received,
        )
        if now != self.reported:
            self.reported = now
            self.send(Credit(*now))


def _failed(exc: Exception) -> ItemError:
    if isinstance(exc, RequestRejected):  # the request's fault (as in the static worker)
        return ItemError(exc.code, str(exc))
    return ItemError("INFERENCE_FAILED", f"{type(exc).__name__}: {exc}", {"exception": type(exc).__name__})


def _drain(get: GetFn, block: bool) -> list[object]:
    """What the inbox holds now; when `block`, wait for at least one message first."""
    messages: list[object] = []
    if block:
        messages.append(get(True))
    while True:
        try:
            messages.append(get(False))
        except queue.Empty:
            return messages
