"""One asyncio task per loaded model: queue -> batcher -> runner, and every future settled.

Rule: every request future ends (result, error, timeout, cancellation, worker death). The
waiter is registered (the future exists) before the entry is queued, and a failed batch fails
every request in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from modelmora.contracts.channel import ItemError, ItemOk, WorkItem
from modelmora.contracts.runner import Runner
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.inference.batcher import BatchLimits, Returning, hold_until, next_batch
from modelmora.inference.queue import Entry, Priority, RequestQueue
from modelmora.observability.metrics import Metrics

log = logging.getLogger("modelmora.scheduler")

Clock = Callable[[], float]

# Event-loop turns an idle worker waits for requests already received to reach the queue.
SETTLE_TURNS = 4
# A full queue is logged at most this often per model (each refusal is counted in metrics).
FULL_WARNING_SECONDS = 10.0


@dataclass(slots=True)
class Completed:
    value: object
    meta: dict[str, object]
    batch_size: int
    queue_ms: float
    inference_ms: float


@dataclass(slots=True)
class Pending:
    item: WorkItem
    future: asyncio.Future[Completed]


class Admission:
    """Bounds shared by every model's queue: the overall size, with room kept for critical."""

    def __init__(self, queue_size: int, critical_reserve: int) -> None:
        self.queue_size = queue_size
        self.critical_reserve = min(critical_reserve, queue_size)
        self.queued = 0

    def admit(self, priority: Priority, per_model_queued: int, per_model_limit: int) -> None:
        global_room, model_room = self.queue_size, per_model_limit
        if priority is not Priority.CRITICAL:
            # Non-critical requests stop short by the reserve (at most half a model's queue).
            global_room -= self.critical_reserve
            model_room -= min(self.critical_reserve, per_model_limit // 2)
        if self.queued >= global_room or per_model_queued >= model_room:
            raise ModelMoraError(
                ErrorCode.QUEUE_FULL,
                "the queue is full; retry later",
                {"queued": self.queued, "queue_size": self.queue_size, "model_queued": per_model_queued},
                retry_after=1.0,
            )


@dataclass
class ModelScheduler:
    name: str
    runner: Runner
    limits: BatchLimits
    admission: Admission
    queue_size: int
    aging_seconds: float = 10.0
    clock: Clock = time.monotonic
    # Recorded here, around the pure queue and batcher (which know nothing of metrics).
    metrics: Metrics | None = None
    _queue: RequestQueue = field(init=False)
    _wake: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = field(init=False, default=None)
    # Batches sent to the worker, in order: the one it computes and at most one waiting.
    _batches: list[list[Entry]] = field(init=False, default_factory=list)
    _batch_tasks: set[asyncio.Task[None]] = field(init=False, default_factory=set)
    _closed: ModelMoraError | None = field(init=False, default=None)
    _returning: Returning | None = field(init=False, default=None)
    _last_arrival: float = field(init=False, default=0.0)

    _full_logged_at: float = field(init=False, default=float("-inf"))

    def __post_init__(self) -> None:
        self._queue = RequestQueue(self.aging_seconds)
        metrics = self.metrics or Metrics()
        self._m_batch = metrics.batch_size.labels(self.name)
        self._m_expired = metrics.expired.labels(self.name, "queue")
        self._m_rejected = metrics.rejected.labels(self.name, "requests")
        self._m_stages = {
            stage: metrics.worker_seconds.labels(self.name, stage)
            for stage in ("preprocess", "forward", "postprocess")
        }
        self._m_items = {
            outcome: metrics.worker_items.labels(self.name, outcome)
            for outcome in ("ok", "error", "cancelled")
        }

    def queue_depths(self) -> dict[str, int]:
        """Queued requests by priority name (critical, high, normal, low)."""
        return {p.name.lower(): n for p, n in self._queue.depth_by_priority().items()}

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def inflight(self) -> int:
        return sum(len(b) for b in self._batches)

    @property
    def busy(self) -> bool:
        return bool(self._batches) or len(self._queue) > 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"scheduler-{self.name}")

    def submit(
        self, item: WorkItem, priority: Priority, deadline: float, group: Hashable | None = None
    ) -> Entry:
        if self._closed is not None:
            raise self._closed
        try:
            self.admission.admit(priority, len(self._queue), self.queue_size)
        except ModelMoraError:
            self._m_rejected.inc()
            now = self.clock()
            if now - self._full_logged_at >= FULL_WARNING_SECONDS:
                self._full_logged_at = now
                log.warning(
                    "queue full: refusing requests with 429",
                    extra={
                        "model": self.name,
                        "model_queued": len(self._queue),
                        "queued": self.admission.queued,
                        "queue_size": self.admission.queue_size,
                    },
                )
            raise
        future: asyncio.Future[Completed] = asyncio.get_running_loop().create_future()
        entry = Entry(
            priority, self.clock(), deadline, max(1, len(item.inputs)), Pending(item, future), group
        )
        self._queue.push(entry)
        self._last_arrival = entry.arrival
        self.admission.queued += 1
        self._wake.set()
        return entry

    def withdraw(self, entry: Entry) -> None:
        """The caller gave up (timeout, client gone): drop it if queued, or tell the worker."""
        if self._queue.cancel(entry):
            self.admission.queued -= 1
        elif any(entry in batch for batch in self._batches):
            pending: Pending = entry.payload
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().create_task(self.runner.cancel([pending.item.request_id]))

    async def _loop(self) -> None:
        """Dispatch when idle; while the worker computes, the next batch gathers and is sent
        ahead (so the worker starts it without a round trip) once it is full. At most one
        batch waits in front of the worker, except a batch led by a critical request, which
        may join the line and is run first by the worker."""
        while True:
            computing = len(self._batches)
            if not self._queue or not self._may_send(computing):
                self._wake.clear()
                await self._wake.wait()
                continue
            if not computing:
                await self._let_arrivals_land()
            now = self.clock()
            returning = None if computing else self._returning
            release = hold_until(self._queue, now, self.limits, returning, self._last_arrival)
            if release is not None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), release - now)
                continue
            # A batch sent while the worker computes ahead of its turn (a critical one jumping
            # the line) carries the critical requests only: the worker runs it first, and low
            # work riding along would make the critical requests wait for all of it.
            only = Priority.CRITICAL if computing and self._jumps_line(computing) else None
            batch, expired = next_batch(self._queue, now, self.limits, only)
            self._taken(batch, expired)
            if batch:
                self._m_batch.observe(sum(e.size for e in batch))
                self._batches.append(batch)
                task = asyncio.create_task(self._dispatch(batch))
                self._batch_tasks.add(task)
                task.add_done_callback(self._batch_tasks.discard)

    def _taken(self, batch: list[Entry], expired: list[Entry]) -> None:
        """Entries that left the queue: those going to the worker, and those whose deadline
        passed there (answered with a timeout, never sent)."""
        self.admission.queued -= len(batch) + len(expired)
        if expired:
            self._m_expired.inc(len(expired))
        for entry in expired:
            _settle(entry, _timeout())

    def _jumps_line(self, computing: int) -> bool:
        head = self._queue.peek(self.clock())
        return head is not None and head.priority is Priority.CRITICAL and computing < 3

    def _may_send(self, computing: int) -> bool:
        if computing == 0:
            return True
        if self._jumps_line(computing):
            return True  # a critical batch may join the line: the worker runs it first
        return computing == 1 and self._queue.items >= self.limits.max_batch_size

    async def _let_arrivals_land(self) -> None:
        """Dispatch when idle means when this process is idle too: requests whose bytes have
        already arrived are parsed in the next turns of the event loop, and cutting a batch
        before they land would send a batch of one followed by a batch of the rest. Yield
        until the queue stops growing (a few turns, microseconds when nothing else is due)."""
        seen = -1
        for _ in range(SETTLE_TURNS):
            if len(self._queue) == seen or self._queue.items >= self.limits.max_batch_size:
                return
            seen = len(self._queue)
            await asyncio.sleep(0)

    async def _dispatch(self, batch: list[Entry]) -> None:
        items = [e.payload.item for e in batch]
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "batch dispatched",
                extra={
                    "model": self.name,
                    "trace_ids": [i.trace_id for i in items],
                    "batch_size": len(items),
                },
            )
        try:
            done = await self.runner.infer(items, min(e.priority for e in batch))
        except ModelMoraError as exc:
            for entry in batch:
                _settle(entry, exc)
            return
        except Exception as exc:  # a bug, not a model error: still settle every future
            log.exception("dispatch failed", extra={"model": self.name})
            error = ModelMoraError(ErrorCode.INTERNAL_ERROR, f"dispatch failed: {exc}")
            for entry in batch:
                _settle(entry, error)
            return
        finally:
            with contextlib.suppress(ValueError):
                self._batches.remove(batch)
            self._wake.set()
        inference_ms = done.compute_ms
        size = sum(e.size for e in batch)
        if "batch_size" in done.stats:  # a stepped worker: the rows that ran beside it
            size = max(1, round(done.stats["batch_size"]))
        self._record_worker(done.stats)
        finished = self.clock()
        if not self._batches:  # the worker is idle now: its clients are about to come back
            self._returning = Returning.after(len(batch), finished, inference_ms / 1000)
        for entry, outcome in zip(batch, done.outcomes, strict=True):
            # Everything but the worker's compute: waiting in the queue and in front of the worker.
            queue_ms = max(0.0, (finished - entry.arrival) * 1000 - inference_ms)
            if isinstance(outcome, ItemOk):
                _settle(entry, Completed(outcome.value, outcome.meta, size, queue_ms, inference_ms))
            else:
                _settle(entry, _outcome_error(outcome))

    def _record_worker(self, stats: dict[str, float]) -> None:
        """The worker's own figures for the batch, carried back with its result."""
        for stage, histogram in self._m_stages.items():
            seconds = stats.get(stage)
            if seconds is not None:
                histogram.observe(seconds)
        for outcome, counter in self._m_items.items():
            count = stats.get("items_" + outcome)
            if count:
                counter.inc(count)

    def fail_all(self, error: ModelMoraError) -> None:
        """The worker is gone or the model is being unloaded: nothing may hang."""
        self._closed = error
        for batch in self._batches:
            for entry in batch:
                _settle(entry, error)
        while True:
            entry_or_none = self._queue.pop(self.clock())
            if entry_or_none is None:
                break
            self.admission.queued -= 1
            _settle(entry_or_none, error)

    async def stop(self, error: ModelMoraError) -> None:
        self.fail_all(error)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _timeout() -> ModelMoraError:
    return ModelMoraError(ErrorCode.INFERENCE_TIMEOUT, "the request's deadline passed before it ran")


def _outcome_error(outcome: ItemError) -> ModelMoraError:
    try:
        code = ErrorCode(outcome.code)
    except ValueError:
        code = ErrorCode.INFERENCE_FAILED
    return ModelMoraError(code, outcome.message, outcome.details)


def _settle(entry: Entry, result: Completed | ModelMoraError) -> None:
    future = entry.payload.future
    if future.done():
        return
    if isinstance(result, ModelMoraError):
        future.set_exception(result)
        future.exception()  # the waiter may have gone (timeout, disconnect): no warning
    else:
        future.set_result(result)
