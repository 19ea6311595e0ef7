"""The server's half of continuous (iteration-level) batching: credits from the worker, the
choice of who joins here.

A stepped worker (lifecycle/stepping.py) runs one batch that never ends and reports its room
in `Credit` messages: free slots (rows), free KV tokens, and how many requests it has taken.
`ContinuousScheduler` sends a request the moment there is room for it, each as its own
`Infer` answered when that request is done; `fill` (pure, clock passed in) decides which
queued requests take the room: the priority queue's order (critical first, aging), requests
whose deadline passed never leave the queue, and a request waits rather than share the batch
with another group (a seeded request only runs beside requests of the same sampling
parameters and seed, as the static batcher keeps them apart). What the server sent after the
worker's last report counts against the room (`Credits`), so it never sends more than the
worker said it can hold.

The static path (inference/scheduler.py, batcher.py) is untouched; `open_scheduler` picks one
per model from `config.batching`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from modelmora.contracts.channel import Credit, WorkItem
from modelmora.contracts.runner import Runner
from modelmora.contracts.tasks import TaskType
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.inference.batcher import BatchLimits
from modelmora.inference.queue import Entry, RequestQueue
from modelmora.inference.scheduler import Admission, Clock, ModelScheduler
from modelmora.observability.metrics import Metrics

log = logging.getLogger("modelmora.scheduler")

STATIC, CONTINUOUS = "static", "continuous"
BATCHING_MODES = (STATIC, CONTINUOUS)
# The mode of a model whose config sets none (absent: static). txt2txt is continuous: on the
# shared 2-CPU machine it cut the median time to first token 10-15x, its p99 to 0.21-0.81x
# of static's at 90 % load, at equal or better tokens/s and 13-42 % more capacity
# (operations.md, Benchmarks). img2txt stays static (its decoder attends to image features).
DEFAULT_BATCHING: Mapping[TaskType, str] = {TaskType.TXT2TXT: CONTINUOUS}


def batching_mode(task: TaskType, configured: object) -> str:
    if configured is None or configured == "":
        return DEFAULT_BATCHING.get(task, STATIC)
    mode = str(configured).strip().lower()
    if mode not in BATCHING_MODES:
        raise ModelMoraError(
            ErrorCode.VALIDATION_ERROR, f"config.batching must be one of {', '.join(BATCHING_MODES)}"
        )
    return mode


def token_cost(item: WorkItem) -> int:
    """The KV tokens a request may take, as the server can tell without a tokenizer: each
    prompt's `max_tokens` plus its characters / 4 (a rough prompt length; the worker counts
    exactly and holds a request that does not fit until it does)."""
    max_tokens = int(item.params.get("max_tokens", 64))
    return sum(max_tokens + len(str(prompt)) // 4 + 1 for prompt in item.inputs)


@dataclass(frozen=True, slots=True)
class Room:
    slots: int
    tokens: int
    idle: bool  # nothing runs or is on its way: a request larger than the batch may go alone


class Credits:
    """The worker's last report and what was sent since: the room the server may fill."""

    def __init__(self, credit: Credit) -> None:
        self.credit = credit
        self.sent = 0
        self._transit: deque[tuple[int, int, int]] = deque()  # (sequence, rows, tokens)

    def report(self, credit: Credit) -> None:
        self.credit = credit
        while self._transit and self._transit[0][0] <= credit.received:
            self._transit.popleft()

    def spend(self, rows: int, tokens: int) -> None:
        self.sent += 1
        self._transit.append((self.sent, rows, tokens))

    def room(self, running: int) -> Room:
        rows = sum(r for _, r, _ in self._transit)
        tokens = sum(t for _, _, t in self._transit)
        return Room(
            max(0, self.credit.free_slots - rows),
            max(0, self.credit.free_tokens - tokens),
            idle=running == 0,
        )


def fill(
    queue: RequestQueue,
    now: float,
    room: Room,
    running: Counter[Hashable | None],
    cost: Callable[[Entry], int],
) -> tuple[list[Entry], list[Entry]]:
    """The queued requests that join now, in the queue's order, and those whose deadline
    passed (they never reach the worker). Stops at the first request that does not fit or
    may not share the batch with what runs (`running`: the groups of requests in flight):
    it keeps its place at the head and the room left waits for it, so a large or seeded
    request is not overtaken forever."""
    chosen: list[Entry] = []
    expired: list[Entry] = []
    slots, tokens = room.slots, room.tokens
    groups = Counter(running)
    while True:
        head = queue.peek(now)
        if head is None:
            break
        if head.deadline <= now:
            queue.pop(now)
            expired.append(head)
            continue
        if any(group != head.group for group in groups):
            break
        need = cost(head)
        alone = room.idle and not chosen
        if not alone and (head.size > slots or need > tokens):
            break
        queue.pop(now)
        chosen.append(head)
        groups[head.group] += 1
        slots, tokens = slots - head.size, tokens - need
    return chosen, expired


def _entry_cost(entry: Entry) -> int:
    return token_cost(entry.payload.item)


@runtime_checkable
class SteppingRunner(Protocol):
    """A Runner whose worker can run continuous batching (both runners in lifecycle/)."""

    async def start_stepping(
        self, slots: int, on_credit: Callable[[Credit], None], timeout: float
    ) -> Credit: ...


@dataclass
class ContinuousScheduler(ModelScheduler):
    """ModelScheduler whose worker runs one continuous batch: queue, admission, withdrawal
    and settling are the static scheduler's; only the decision of what to send differs."""

    credits: Credits = field(default_factory=lambda: Credits(Credit(0, 0, 0)))

    def on_credit(self, credit: Credit) -> None:
        self.credits.report(credit)
        self._wake.set()

    def _running_groups(self) -> Counter[Hashable | None]:
        return Counter(batch[0].group for batch in self._batches if batch)

    async def _loop(self) -> None:
        """Send what fits as soon as it fits: woken by a new request, a credit, or an answer."""
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = self.clock()
            room = self.credits.room(len(self._batches))
            chosen, expired = fill(self._queue, now, room, self._running_groups(), _entry_cost)
            self._taken(chosen, expired)
            for entry in chosen:
                self.credits.spend(entry.size, _entry_cost(entry))
                batch = [entry]
                self._batches.append(batch)
                task = asyncio.create_task(self._dispatch(batch))
                self._batch_tasks.add(task)
                task.add_done_callback(self._batch_tasks.discard)
            if not chosen:
                self._wake.clear()
                await self._wake.wait()

    def _record_worker(self, stats: dict[str, float]) -> None:
        super()._record_worker(stats)
        size = stats.get("batch_size")
        if size:
            self._m_batch.observe(size)  # rows per step while the request ran


async def open_scheduler(
    *,
    name: str,
    runner: Runner,
    task: TaskType,
    batching: object,
    limits: BatchLimits,
    admission: Admission,
    queue_size: int,
    aging_seconds: float,
    clock: Clock,
    metrics: Metrics | None,
    timeout: float,
) -> ModelScheduler:
    """The model's scheduler, by `config.batching`: continuous when asked and the worker can
    step this model, else static. The worker's refusal (another
    task, a model whose cache cannot be stepped, a runner without a step loop) falls back to
    static batching with a log line; a worker that does not answer fails the load."""
    common: dict[str, Any] = {
        "name": name,
        "runner": runner,
        "limits": limits,
        "admission": admission,
        "queue_size": queue_size,
        "aging_seconds": aging_seconds,
        "clock": clock,
        "metrics": metrics,
    }
    if batching_mode(task, batching) == CONTINUOUS:
        if isinstance(runner, SteppingRunner):
            scheduler = ContinuousScheduler(**common)
            try:
                first = await runner.start_stepping(limits.max_batch_size, scheduler.on_credit, timeout)
            except (TimeoutError, ModelMoraError) as exc:
                raise ModelMoraError(
                    ErrorCode.MODEL_LOAD_FAILED,
                    f"the worker did not switch to continuous batching: {exc}",
                    {"model": name},
                ) from exc
            if first.supported:
                scheduler.on_credit(first)
                return scheduler
            reason = first.reason
        else:
            reason = "this runner has no step loop"
        log.info("continuous batching unavailable: static batching", extra={"model": name, "reason": reason})
    return ModelScheduler(**common)
