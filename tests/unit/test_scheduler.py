"""ModelScheduler on its own: a fake runner that records each batch and finishes it when the
test says so, and a clock the test moves. Nothing here sleeps to order events: each step
waits for state the scheduler exposes (the runner's batches, queued counts) or for the
scheduler to have looked at the clock again (it reads the clock on every decision, so a
further read means the decision about what was just queued has been taken)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from modelmora.contracts.channel import BatchDone, Healthy, ItemOk, Loaded, LoadSpec, WorkerStats, WorkItem
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.inference.batcher import RETURN_GAP_S, BatchLimits
from modelmora.inference.queue import Entry, Priority
from modelmora.inference.scheduler import Admission, Completed, ModelScheduler

WAIT_S = 5.0  # the bound on every wait for state below; reached only when the scheduler is wrong


async def wait_for(condition: Callable[[], bool], timeout: float = WAIT_S) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        if loop.time() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


class FakeClock:
    """Time moves only when the test moves it; every read is counted."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now

    async def read_again(self) -> None:
        """Wait until the scheduler has read the clock again: each decision starts with a
        read and ends, without an await in between, with a batch added to `inflight` or
        with a wait, so after that read the decision on what the test queued is taken."""
        mark = self.reads
        await wait_for(lambda: self.reads > mark)


@dataclass
class Call:
    items: list[WorkItem]
    priority: int
    done: asyncio.Future[BatchDone] = field(repr=False)

    @property
    def ids(self) -> list[str]:
        return [i.request_id for i in self.items]


class FakeRunner:
    """Records every batch; a batch ends when the test calls `finish`."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.cancelled: list[str] = []
        self.outstanding = 0
        self.most_outstanding = 0

    @property
    def alive(self) -> bool:
        return True

    @property
    def pid(self) -> int | None:
        return None

    async def start(self, spec: LoadSpec, timeout: float) -> Loaded:
        return Loaded("cpu", "float32", 0, 0, 0.0)

    async def infer(self, items: list[WorkItem], priority: int = 3) -> BatchDone:
        call = Call(list(items), priority, asyncio.get_running_loop().create_future())
        self.calls.append(call)
        self.outstanding += 1
        self.most_outstanding = max(self.most_outstanding, self.outstanding)
        try:
            return await call.done
        finally:
            self.outstanding -= 1

    def finish(self, index: int, compute_ms: float = 1.0) -> None:
        call = self.calls[index]
        outcomes: list[ItemOk | object] = [ItemOk(i.request_id) for i in call.items]
        call.done.set_result(BatchDone(index, outcomes, compute_ms))  # type: ignore[arg-type]

    @property
    def seen(self) -> list[str]:
        return [rid for call in self.calls for rid in call.ids]

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


@dataclass
class Rig:
    scheduler: ModelScheduler
    runner: FakeRunner
    clock: FakeClock
    ids: itertools.count[int] = field(default_factory=itertools.count)

    def submit(
        self, name: str | None = None, priority: Priority = Priority.NORMAL, timeout: float = 60.0
    ) -> Entry:
        item = WorkItem(name or f"r{next(self.ids)}", ["x"])
        return self.scheduler.submit(item, priority, self.clock.now + timeout)

    async def calls(self, n: int) -> list[Call]:
        await wait_for(lambda: len(self.runner.calls) >= n)
        assert len(self.runner.calls) == n
        return self.runner.calls


def future(entry: Entry) -> asyncio.Future[Completed]:
    fut: asyncio.Future[Completed] = entry.payload.future
    return fut


@pytest.fixture
async def make_rig() -> AsyncIterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def build(max_batch_size: int = 4, max_wait_ms: float = 0.0) -> Rig:
        clock, runner = FakeClock(), FakeRunner()
        scheduler = ModelScheduler(
            "m", runner, BatchLimits(max_batch_size, max_wait_ms), Admission(100, 10), 100, clock=clock
        )
        scheduler.start()
        rig = Rig(scheduler, runner, clock)
        rigs.append(rig)
        return rig

    yield build
    for rig in rigs:
        await rig.scheduler.stop(ModelMoraError(ErrorCode.WORKER_DIED, "test over"))


async def test_an_idle_worker_gets_what_is_queued_at_once(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    entries = [rig.submit() for _ in range(3)]
    (call,) = await rig.calls(1)
    assert call.ids == ["r0", "r1", "r2"]  # requests landing together go as one batch
    rig.runner.finish(0)
    results = [await future(e) for e in entries]
    assert [r.value for r in results] == ["r0", "r1", "r2"]
    assert {r.batch_size for r in results} == {3}


async def test_dispatch_ahead_sends_exactly_one_full_batch_while_the_worker_computes(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(max_batch_size=2)
    rig.submit()
    await rig.calls(1)  # the worker computes r0
    rig.submit()
    await rig.clock.read_again()
    # Half a batch waits.
    assert len(rig.runner.calls) == 1 and rig.scheduler.queued == 1 and rig.scheduler.inflight == 1
    rig.submit()
    calls = await rig.calls(2)  # full: sent ahead, so the worker starts it without a round trip
    assert calls[1].ids == ["r1", "r2"]
    for _ in range(3):  # more full batches wait here, not in front of the worker
        rig.submit()
        rig.submit()
    await rig.clock.read_again()
    assert len(rig.runner.calls) == 2 and rig.scheduler.queued == 6
    assert rig.scheduler.inflight == 3
    rig.runner.finish(0)  # r1, r2 now computing: one more full batch goes ahead, no more
    calls = await rig.calls(3)
    assert calls[2].ids == ["r3", "r4"]
    # The loop went on to its next decision before the runner saw that batch: it is taken.
    assert len(rig.runner.calls) == 3 and rig.scheduler.queued == 4 and rig.scheduler.inflight == 4
    for i in (1, 2):  # each batch done lets the next full one go ahead
        rig.runner.finish(i)
        await rig.calls(i + 3)
    assert rig.runner.most_outstanding == 2
    assert rig.runner.seen == [f"r{i}" for i in range(9)]


async def test_a_critical_request_jumps_the_line_alone(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(max_batch_size=4)
    rig.submit(priority=Priority.LOW)
    await rig.calls(1)
    lows = [rig.submit(priority=Priority.LOW) for _ in range(3)]
    await rig.clock.read_again()
    assert len(rig.runner.calls) == 1 and rig.scheduler.queued == 3  # three lows: not a full batch, they wait
    critical = rig.submit("vip", Priority.CRITICAL)
    calls = await rig.calls(2)
    # Sent while the worker computes, marked critical so the worker runs it next, and
    # carrying no low work that would make it wait.
    assert calls[1].ids == ["vip"] and calls[1].priority == Priority.CRITICAL
    assert rig.scheduler.queued == 3
    rig.runner.finish(1)
    assert (await future(critical)).batch_size == 1
    assert not any(future(e).done() for e in lows)
    rig.runner.finish(0)
    calls = await rig.calls(3)
    assert calls[2].ids == ["r1", "r2", "r3"] and calls[2].priority == Priority.LOW


async def test_a_critical_request_joins_even_behind_a_batch_sent_ahead(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(max_batch_size=1)
    rig.submit()
    rig.submit()
    await rig.calls(2)  # one computing, one sent ahead
    rig.submit()
    rig.submit("vip", Priority.CRITICAL)
    calls = await rig.calls(3)
    assert calls[2].ids == ["vip"] and calls[2].priority == Priority.CRITICAL
    rig.submit("vip2", Priority.CRITICAL)
    await rig.clock.read_again()
    # Three batches in front of the worker: the line is full, even for critical work.
    assert len(rig.runner.calls) == 3 and rig.scheduler.inflight == 3
    assert rig.scheduler.queued == 2


async def _after_a_batch_of_three(rig: Rig, compute_ms: float) -> None:
    """Three clients served together: the worker is idle and they are about to come back."""
    for _ in range(3):
        rig.submit()
    await rig.calls(1)
    rig.runner.finish(0, compute_ms=compute_ms)
    await wait_for(lambda: rig.scheduler.inflight == 0)


async def test_the_return_wait_holds_for_returning_clients(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(max_batch_size=8)
    await _after_a_batch_of_three(rig, compute_ms=100)
    rig.clock.now += 0.001
    rig.submit("back1")
    await rig.clock.read_again()
    assert len(rig.runner.calls) == 1 and rig.scheduler.queued == 1  # held: two more are coming
    rig.clock.now += 0.003  # each within the gap of the one before
    rig.submit("back2")
    await rig.clock.read_again()
    assert len(rig.runner.calls) == 1 and rig.scheduler.queued == 2
    rig.submit("back3")
    calls = await rig.calls(2)  # all three back: no reason to wait any longer
    assert calls[1].ids == ["back1", "back2", "back3"]


async def test_the_return_wait_ends_once_the_gap_passes(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(max_batch_size=8)
    await _after_a_batch_of_three(rig, compute_ms=100)
    rig.clock.now += 0.001
    rig.submit("back1")
    await rig.clock.read_again()
    assert len(rig.runner.calls) == 1 and rig.scheduler.queued == 1
    rig.clock.now += RETURN_GAP_S * 1.5  # nobody else came back within the gap
    calls = await rig.calls(2)
    assert calls[1].ids == ["back1"]


async def test_the_return_wait_never_outlasts_its_share_of_the_compute(
    make_rig: Callable[..., Rig],
) -> None:
    # 4 ms of compute: the wait is at most a quarter of it, 1 ms, even though arrivals keep
    # coming within the gap.
    rig = make_rig(max_batch_size=8)
    await _after_a_batch_of_three(rig, compute_ms=4)
    rig.clock.now += 0.0006
    rig.submit("back1")
    await rig.clock.read_again()
    assert len(rig.runner.calls) == 1 and rig.scheduler.queued == 1
    rig.clock.now += 0.0006  # within the gap, past the share
    calls = await rig.calls(2)
    assert calls[1].ids == ["back1"]


async def test_a_withdrawn_request_never_reaches_the_runner(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    rig.submit()
    await rig.calls(1)
    gone = rig.submit("gone")
    rig.scheduler.withdraw(gone)
    assert rig.scheduler.queued == 0
    rig.submit("stays")
    rig.runner.finish(0)
    calls = await rig.calls(2)
    assert calls[1].ids == ["stays"] and "gone" not in rig.runner.seen
    assert rig.runner.cancelled == []  # nothing to tell the worker: it never had it
    assert rig.scheduler.admission.queued == 0


async def test_a_withdrawn_request_in_flight_is_cancelled_in_the_worker(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig()
    running = rig.submit("running")
    await rig.calls(1)
    rig.scheduler.withdraw(running)
    await wait_for(lambda: rig.runner.cancelled == ["running"])


async def test_an_expired_request_never_reaches_the_runner(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig()
    rig.submit()
    await rig.calls(1)
    late = rig.submit("late", timeout=1.0)
    rig.submit("fine", timeout=60.0)
    rig.clock.now += 2.0  # the worker was busy past late's deadline
    rig.runner.finish(0)
    calls = await rig.calls(2)
    assert calls[1].ids == ["fine"] and "late" not in rig.runner.seen
    with pytest.raises(ModelMoraError) as exc:
        await future(late)
    assert exc.value.code is ErrorCode.INFERENCE_TIMEOUT
    assert rig.scheduler.admission.queued == 0


async def test_stop_fails_queued_and_in_flight_requests(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(max_batch_size=1)
    running = rig.submit()
    await rig.calls(1)
    queued = rig.submit()
    await rig.scheduler.stop(ModelMoraError(ErrorCode.WORKER_DIED, "gone"))
    for entry in (running, queued):
        with pytest.raises(ModelMoraError) as exc:
            await future(entry)
        assert exc.value.code is ErrorCode.WORKER_DIED
    with pytest.raises(ModelMoraError):
        rig.submit()
