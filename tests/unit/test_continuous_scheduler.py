"""The server's half of continuous batching, without a model: `fill` and `Credits` as pure
functions, and ContinuousScheduler against a fake stepped runner whose credits the test
sends. Nothing sleeps to order events: each step waits for state (the runner's calls) or for
the scheduler to have read the clock again."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from modelmora.contracts.channel import (
    BatchDone,
    Credit,
    Healthy,
    ItemOk,
    Loaded,
    LoadSpec,
    WorkerStats,
    WorkItem,
)
from modelmora.contracts.tasks import TaskType
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.inference.batcher import BatchLimits
from modelmora.inference.continuous import (
    ContinuousScheduler,
    Credits,
    Room,
    batching_mode,
    fill,
    open_scheduler,
    token_cost,
)
from modelmora.inference.queue import Entry, Priority, RequestQueue
from modelmora.inference.scheduler import Admission, Completed, ModelScheduler
from tests.waiting import wait_for

NOW = 1000.0


def entry(name: str, priority: Priority = Priority.NORMAL, size: int = 1, **kw: object) -> Entry:
    deadline = float(kw.pop("deadline", NOW + 60))  # type: ignore[arg-type]
    group = kw.pop("group", None)
    return Entry(priority, NOW, deadline, size, name, group)


def queue_of(*entries: Entry) -> RequestQueue:
    queue = RequestQueue()
    for e in entries:
        queue.push(e)
    return queue


def names(entries: list[Entry]) -> list[str]:
    return [str(e.payload) for e in entries]


def unit_cost(e: Entry) -> int:
    return 10 * e.size


def test_fill_takes_the_queue_in_priority_order_up_to_the_free_slots() -> None:
    queue = queue_of(entry("n1"), entry("low", Priority.LOW), entry("vip", Priority.CRITICAL), entry("n2"))
    chosen, expired = fill(queue, NOW, Room(3, 1000, idle=False), Counter(), unit_cost)
    assert names(chosen) == ["vip", "n1", "n2"] and expired == []
    assert len(queue) == 1


def test_fill_drops_expired_requests_and_stops_at_a_head_that_does_not_fit() -> None:
    late = entry("late", deadline=NOW - 1)
    queue = queue_of(late, entry("big", size=3), entry("small"))
    chosen, expired = fill(queue, NOW, Room(2, 1000, idle=False), Counter(), unit_cost)
    # "big" does not fit in 2 slots: it keeps the head, "small" does not overtake it.
    assert chosen == [] and expired == [late]
    # By tokens too.
    chosen, _ = fill(queue, NOW, Room(8, 25, idle=False), Counter(), unit_cost)
    assert chosen == []
    chosen, _ = fill(queue, NOW, Room(8, 40, idle=False), Counter(), unit_cost)
    assert names(chosen) == ["big", "small"]


def test_fill_sends_a_request_larger_than_the_batch_alone_to_an_idle_worker() -> None:
    queue = queue_of(entry("huge", size=9), entry("next"))
    chosen, _ = fill(queue, NOW, Room(4, 40, idle=True), Counter(), unit_cost)
    assert names(chosen) == ["huge"]


def test_fill_keeps_seeded_requests_apart_from_other_groups() -> None:
    seeded = ("seeded", 0.9, 1.0, 0, 1.0, 7)
    queue = queue_of(entry("s1", group=seeded), entry("plain"))
    # Plain requests run: the seeded head waits for them to drain, and nothing passes it.
    chosen, _ = fill(queue, NOW, Room(4, 1000, idle=False), Counter({None: 2}), unit_cost)
    assert chosen == []
    chosen, _ = fill(queue, NOW, Room(4, 1000, idle=True), Counter(), unit_cost)
    assert names(chosen) == ["s1"]  # and "plain" waits behind it in turn
    chosen, _ = fill(queue, NOW, Room(4, 1000, idle=False), Counter({seeded: 1}), unit_cost)
    assert chosen == []


def test_credits_count_what_was_sent_after_the_last_report() -> None:
    credits = Credits(Credit(4, 400, received=0))
    credits.spend(1, 50)
    credits.spend(2, 100)
    assert credits.room(running=2) == Room(1, 250, idle=False)
    # The worker took the first: its report already counts it, the second is still on its way.
    credits.report(Credit(3, 350, received=1))
    assert credits.room(running=2) == Room(1, 250, idle=False)
    credits.report(Credit(1, 250, received=2))
    assert credits.room(running=2) == Room(1, 250, idle=False)
    credits.report(Credit(4, 400, received=2))  # both done
    assert credits.room(running=0) == Room(4, 400, idle=True)


def test_token_cost_and_batching_mode() -> None:
    item = WorkItem("r", ["x" * 40, "y"], {"max_tokens": 10})
    assert token_cost(item) == (10 + 10 + 1) + (10 + 0 + 1)
    assert batching_mode(TaskType.TXT2TXT, None) == "continuous"  # the default (see DEFAULT_BATCHING)
    assert batching_mode(TaskType.IMG2TXT, None) == "static"
    assert batching_mode(TaskType.TXT2TXT, "Continuous") == "continuous"
    with pytest.raises(ModelMoraError):
        batching_mode(TaskType.TXT2TXT, "sometimes")


@dataclass
class Call:
    items: list[WorkItem]
    priority: int
    done: asyncio.Future[BatchDone] = field(repr=False)

    @property
    def id(self) -> str:
        return self.items[0].request_id


class SteppedRunner:
    """A worker in continuous mode, driven by the test: it takes every request at once
    (`received` counts them) and reports the room the test gives it."""

    def __init__(self, slots: int, supported: bool = True) -> None:
        self.slots = slots
        self.supported = supported
        self.calls: list[Call] = []
        self.cancelled: list[str] = []
        self.on_credit: Callable[[Credit], None] | None = None

    @property
    def alive(self) -> bool:
        return True

    @property
    def pid(self) -> int | None:
        return None

    async def start(self, spec: LoadSpec, timeout: float) -> Loaded:
        return Loaded("cpu", "float32", 0, 0, 0.0)

    async def start_stepping(self, slots: int, on_credit: Callable[[Credit], None], timeout: float) -> Credit:
        self.on_credit = on_credit
        if not self.supported:
            return Credit(0, 0, 0, supported=False, reason="no step loop")
        return Credit(slots, 10_000, 0)

    def credit(self, free_slots: int) -> None:
        assert self.on_credit is not None
        self.on_credit(Credit(free_slots, 10_000, len(self.calls)))

    async def infer(self, items: list[WorkItem], priority: int = 3) -> BatchDone:
        call = Call(list(items), priority, asyncio.get_running_loop().create_future())
        self.calls.append(call)
        return await call.done

    def finish(self, request_id: str, batch_size: float = 1.0) -> None:
        call = next(c for c in self.calls if c.id == request_id)
        call.done.set_result(BatchDone(0, [ItemOk(request_id)], 5.0, {"batch_size": batch_size}))

    @property
    def seen(self) -> list[str]:
        return [c.id for c in self.calls]

    async def cancel(self, request_ids: list[str]) -> None:
        self.cancelled.extend(request_ids)

    async def health(self, timeout: float = 5.0) -> Healthy:
        return Healthy(0, 0, 0)

    async def stats(self, timeout: float = 1.0) -> WorkerStats:
        return WorkerStats(0, 0, 0, 0, 0, 0)

    async def close(self, grace: float) -> None:
        return None

    def rss_bytes(self) -> int:
        return 0


class Clock:
    def __init__(self) -> None:
        self.now = NOW
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now

    async def read_again(self) -> None:
        mark = self.reads
        await wait_for(lambda: self.reads > mark, timeout=5, what="a scheduling decision")


@dataclass
class Rig:
    scheduler: ModelScheduler
    runner: SteppedRunner
    clock: Clock
    ids: itertools.count[int] = field(default_factory=itertools.count)

    def submit(
        self, name: str | None = None, priority: Priority = Priority.NORMAL, timeout: float = 60
    ) -> Entry:
        item = WorkItem(name or f"r{next(self.ids)}", ["x"], {"max_tokens": 8})
        return self.scheduler.submit(item, priority, self.clock.now + timeout)

    async def seen(self, n: int) -> list[str]:
        await wait_for(lambda: len(self.runner.calls) >= n, timeout=5, what=f"{n} requests sent")
        assert len(self.runner.calls) == n
        return self.runner.seen


@pytest.fixture
async def make_rig() -> AsyncIterator[Callable[..., Rig]]:
    schedulers: list[ModelScheduler] = []

    async def build(slots: int = 2, supported: bool = True) -> Rig:
        clock, runner = Clock(), SteppedRunner(slots, supported)
        scheduler = await open_scheduler(
            name="m",
            runner=runner,
            task=TaskType.TXT2TXT,
            batching="continuous",
            limits=BatchLimits(slots),
            admission=Admission(100, 10),
            queue_size=100,
            aging_seconds=10.0,
            clock=clock,
            metrics=None,
            timeout=5.0,
        )
        scheduler.start()
        schedulers.append(scheduler)
        return Rig(scheduler, runner, clock)

    yield build  # type: ignore[misc]
    for scheduler in schedulers:
        await scheduler.stop(ModelMoraError(ErrorCode.WORKER_DIED, "test over"))


def result(e: Entry) -> Completed:
    fut: asyncio.Future[Completed] = e.payload.future
    return fut.result()


async def test_requests_join_as_slots_free_not_when_the_batch_ends(make_rig: Callable[..., Rig]) -> None:
    rig: Rig = await make_rig(slots=2)  # type: ignore[misc]
    assert isinstance(rig.scheduler, ContinuousScheduler)
    a, b, c = rig.submit("a"), rig.submit("b"), rig.submit("c")
    assert await rig.seen(2) == ["a", "b"]  # each sent on its own, up to the free slots
    assert rig.scheduler.queued == 1  # no room for c (a and b were chosen in one decision)
    rig.runner.credit(0)  # the worker took both: still full
    await rig.clock.read_again()
    assert len(rig.runner.calls) == 2
    rig.runner.finish("a", batch_size=2.0)
    rig.runner.credit(1)  # a left: c joins while b still runs
    assert await rig.seen(3) == ["a", "b", "c"]
    await wait_for(lambda: a.payload.future.done(), timeout=5, what="a answered")
    assert result(a).batch_size == 2 and result(a).value == "a"
    assert not b.payload.future.done() and not c.payload.future.done()


async def test_a_critical_request_takes_the_next_free_slot(make_rig: Callable[..., Rig]) -> None:
    rig: Rig = await make_rig(slots=1)  # type: ignore[misc]
    rig.submit("running")
    await rig.seen(1)
    rig.submit("normal")
    rig.submit("low", Priority.LOW)
    rig.submit("vip", Priority.CRITICAL)
    await rig.clock.read_again()
    assert rig.scheduler.queued == 3
    rig.runner.finish("running")
    rig.runner.credit(1)
    assert (await rig.seen(2))[-1] == "vip"
    assert rig.runner.calls[-1].priority == Priority.CRITICAL
    rig.runner.finish("vip")
    rig.runner.credit(1)
    assert (await rig.seen(3))[-1] == "normal"


async def test_a_withdrawn_request_is_cancelled_in_the_worker_and_its_slot_refilled(
    make_rig: Callable[..., Rig],
) -> None:
    rig: Rig = await make_rig(slots=1)  # type: ignore[misc]
    running = rig.submit("running")
    await rig.seen(1)
    rig.submit("next")
    rig.scheduler.withdraw(running)
    await wait_for(lambda: rig.runner.cancelled == ["running"], timeout=5, what="the cancel sent")
    # The worker drops it at its next step and reports the slot free: the next one joins.
    rig.runner.credit(1)
    assert await rig.seen(2) == ["running", "next"]


async def test_a_request_whose_deadline_passes_in_the_queue_never_joins(make_rig: Callable[..., Rig]) -> None:
    rig: Rig = await make_rig(slots=1)  # type: ignore[misc]
    rig.submit("running")
    await rig.seen(1)
    late = rig.submit("late", timeout=1.0)
    rig.submit("fine")
    rig.clock.now += 2.0
    rig.runner.finish("running")
    rig.runner.credit(1)
    assert await rig.seen(2) == ["running", "fine"]
    with pytest.raises(ModelMoraError) as info:
        await late.payload.future
    assert info.value.code is ErrorCode.INFERENCE_TIMEOUT
    assert rig.scheduler.admission.queued == 0


async def test_a_worker_that_cannot_step_gets_the_static_scheduler(make_rig: Callable[..., Rig]) -> None:
    rig: Rig = await make_rig(slots=2, supported=False)  # type: ignore[misc]
    assert type(rig.scheduler) is ModelScheduler
    a, b = rig.submit("a"), rig.submit("b")
    await wait_for(lambda: len(rig.runner.calls) == 1, timeout=5, what="one static batch")
    assert [i.request_id for i in rig.runner.calls[0].items] == ["a", "b"]
    rig.runner.calls[0].done.set_result(BatchDone(0, [ItemOk("a"), ItemOk("b")], 1.0))
    assert (await a.payload.future).batch_size == 2 and (await b.payload.future).value == "b"


def test_config_batching_is_checked_at_install_and_update() -> None:
    from modelmora.registry.installer import validate_config

    assert validate_config({"batching": "static"}) == {"batching": "static"}
    with pytest.raises(ModelMoraError) as info:
        validate_config({"batching": "sometimes"})
    assert info.value.code is ErrorCode.VALIDATION_ERROR
