"""Manager + scheduler + service over both runners: the worker in a real process and its
in-process twin. Each step waits for state the scheduler exposes (what is in flight, what
is queued) rather than sleeping; the `sleep:<ms>` inputs keep the worker busy meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from modelmora.config import Settings
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.inference.scheduler import ModelScheduler
from modelmora.lifecycle.manager import ModelManager
from modelmora.lifecycle.runners import process_runner_factory
from modelmora.registry.installer import InstallRequest, install
from modelmora.registry.store import RegistryStore
from modelmora.services.inference import InferenceService
from tests.conftest import make_fake_model
from tests.runners import RUNNER_KINDS, RecordingFactory
from tests.waiting import wait_for

Served = tuple[InferenceService, ModelManager, RecordingFactory]


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[RegistryStore]:
    s = RegistryStore(settings.database_url)
    s.create_schema()
    yield s
    s.close()


@pytest.fixture(params=RUNNER_KINDS)
def factory(request: pytest.FixtureRequest) -> RecordingFactory:
    return RecordingFactory(request.param)


def _install(settings: Settings, store: RegistryStore, folder: Path, name: str) -> None:
    install(settings, store, InstallRequest(source=str(folder), name=name))


@pytest.fixture
async def served(
    settings: Settings, store: RegistryStore, tmp_path: Path, factory: RecordingFactory
) -> AsyncIterator[Served]:
    _install(settings, store, make_fake_model(tmp_path / "f1", load_ms=100), "fake")
    manager = ModelManager(settings, store, factory)
    yield InferenceService(settings, manager), manager, factory
    await manager.shutdown()


def _scheduler(manager: ModelManager, name: str = "fake") -> ModelScheduler:
    scheduler = manager.slots[name].scheduler
    assert scheduler is not None
    return scheduler


async def _busy(
    svc: InferenceService, manager: ModelManager, ms: int, name: str = "fake"
) -> asyncio.Future[dict[str, Any]]:
    """A request that keeps the (loaded) worker busy for `ms`, returned once it is in flight."""
    scheduler = _scheduler(manager, name)
    blocker = asyncio.ensure_future(svc.infer(name, {"text": f"sleep:{ms}"}))
    await wait_for(lambda: scheduler.inflight == 1, what="the blocker in flight")
    return blocker


async def test_concurrent_first_requests_share_one_load(served: Served) -> None:
    svc, manager, factory = served
    results = await asyncio.gather(*(svc.infer("fake", {"text": f"t{i}"}) for i in range(8)))
    assert len(factory.runners) == 1
    assert all(len(r["result"]["embeddings"]) == 8 for r in results)
    assert manager.slots["fake"].state.value == "ready"


async def test_requests_queued_behind_a_busy_worker_are_batched(served: Served) -> None:
    svc, manager, _factory = served
    await svc.infer("fake", {"text": "warm"})
    blocker = await _busy(svc, manager, 300)
    burst = await asyncio.gather(*(svc.infer("fake", {"text": f"b{i}"}) for i in range(10)))
    await blocker
    sizes = {r["metadata"]["batch_size"] for r in burst}
    assert sizes == {10}  # all gathered while the worker was busy, sent as one batch
    assert all(r["timing"]["queue_time_ms"] > 0 for r in burst)


async def test_priority_decides_who_goes_first(served: Served) -> None:
    svc, manager, _ = served
    await svc.infer("fake", {"text": "warm"})
    scheduler = _scheduler(manager)
    scheduler.limits = type(scheduler.limits)(1, 0)
    order: list[str] = []

    async def call(text: str, priority: str) -> None:
        await svc.infer("fake", {"text": text}, priority=priority)
        order.append(text)

    blocker = await _busy(svc, manager, 200)
    tasks = [asyncio.ensure_future(call(f"low{i}", "low")) for i in range(3)]
    # low0 goes ahead of the worker (a full batch of one), the others wait in the queue.
    await wait_for(lambda: scheduler.queued == 2 and scheduler.inflight == 2, what="lows queued")
    tasks.append(asyncio.ensure_future(call("critical", "critical")))
    await asyncio.gather(blocker, *tasks)
    # At most one batch waits in front of the worker and cannot be recalled: the critical
    # request overtakes every low one that was still queued.
    assert order.index("critical") <= 1
    assert order[order.index("critical") + 1 :] == [f"low{i}" for i in range(order.index("critical"), 3)]


async def test_a_critical_batch_jumping_the_line_carries_no_low_work(served: Served) -> None:
    """While the worker computes, a critical request goes ahead alone: the low requests
    queued around it wait for their own batch instead of riding in front with it."""
    svc, manager, _ = served
    await svc.infer("fake", {"text": "warm"})
    scheduler = _scheduler(manager)
    blocker = await _busy(svc, manager, 300)
    lows = [asyncio.ensure_future(svc.infer("fake", {"text": f"low{i}"}, priority="low")) for i in range(3)]
    await wait_for(lambda: scheduler.queued == 3, what="lows queued")
    critical = await svc.infer("fake", {"text": "vip"}, priority="critical")
    assert critical["metadata"]["batch_size"] == 1
    assert all(not t.done() for t in lows)  # still waiting: the critical batch ran first
    sizes = [r["metadata"]["batch_size"] for r in await asyncio.gather(*lows)]
    assert sizes == [3, 3, 3]
    await blocker


async def test_deadline_passes_while_queued(served: Served) -> None:
    svc, manager, factory = served
    await svc.infer("fake", {"text": "warm"})
    blocker = await _busy(svc, manager, 400)
    with pytest.raises(ModelMoraError) as exc:
        await svc.infer("fake", {"text": "late"}, timeout_seconds=0.1)
    assert exc.value.code is ErrorCode.INFERENCE_TIMEOUT
    await blocker
    assert "late" not in factory.runners[0].seen


async def test_disconnected_client_is_dropped_before_it_runs(served: Served) -> None:
    svc, manager, factory = served
    await svc.infer("fake", {"text": "warm"})
    scheduler = _scheduler(manager)
    blocker = await _busy(svc, manager, 300)
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    call = asyncio.ensure_future(svc.infer("fake", {"text": "never"}, disconnected=gone))
    await wait_for(lambda: scheduler.queued == 1, what="the request queued")
    gone.set_result(None)
    with pytest.raises(ModelMoraError) as exc:
        await call
    assert exc.value.code is ErrorCode.CANCELLED
    assert scheduler.queued == 0
    await blocker
    assert "never" not in factory.runners[0].seen


async def test_crash_fails_queued_requests_and_the_next_request_reloads(served: Served) -> None:
    svc, manager, factory = served
    await svc.infer("fake", {"text": "warm"})
    scheduler = _scheduler(manager)
    blocker = await _busy(svc, manager, 300)
    queued = [asyncio.ensure_future(svc.infer("fake", {"text": f"q{i}"})) for i in range(5)]
    await wait_for(lambda: scheduler.queued == 5, what="five requests queued")
    factory.runners[0].kill()
    outcomes = await asyncio.gather(*queued, return_exceptions=True)
    assert all(isinstance(o, ModelMoraError) and o.code is ErrorCode.WORKER_DIED for o in outcomes)
    await asyncio.gather(blocker, return_exceptions=True)
    again = await svc.infer("fake", {"text": "after"})
    assert again["result"]["embeddings"] and len(factory.runners) == 2
    assert manager.slots["fake"].state.value == "ready"


async def test_load_failure_backs_off_and_other_models_keep_serving(
    settings: Settings, store: RegistryStore, tmp_path: Path, factory: RecordingFactory
) -> None:
    _install(settings, store, make_fake_model(tmp_path / "ok"), "ok")
    _install(settings, store, make_fake_model(tmp_path / "bad", fail_load=True), "bad")
    settings.lifecycle.load_backoff_seconds = 30
    settings.lifecycle.load_retries = 0  # retries are covered in test_lifecycle
    manager = ModelManager(settings, store, factory)
    svc = InferenceService(settings, manager)
    try:
        for _ in range(2):
            with pytest.raises(ModelMoraError) as exc:
                await svc.infer("bad", {"text": "x"})
            assert exc.value.code is ErrorCode.MODEL_LOAD_FAILED and "asked to fail" in exc.value.message
        assert exc.value.retry_after is not None and exc.value.retry_after > 0  # the 2nd did not retry
        assert manager.slots["bad"].failures == 1
        assert (await svc.infer("ok", {"text": "x"}))["metadata"]["model"] == "ok"
    finally:
        await manager.shutdown()


async def test_unknown_model_and_bad_input(served: Served) -> None:
    svc, _, factory = served
    with pytest.raises(ModelMoraError) as exc:
        await svc.infer("missing", {"text": "x"})
    assert exc.value.code is ErrorCode.MODEL_NOT_FOUND
    with pytest.raises(ModelMoraError) as exc:
        await svc.infer("fake", {"text": ["ok", ""]})
    assert exc.value.code is ErrorCode.VALIDATION_ERROR
    assert factory.runners == []  # rejected before any load


async def test_process_worker_killed_mid_burst(
    settings: Settings, store: RegistryStore, tmp_path: Path
) -> None:
    """A real worker process dies under a burst (its own os._exit, mid-batch): every request
    ends, the next one succeeds. Process only: the in-process twin cannot exit on its own."""
    _install(settings, store, make_fake_model(tmp_path / "p"), "p")
    manager = ModelManager(settings, store, process_runner_factory)
    svc = InferenceService(settings, manager)
    try:
        await svc.infer("p", {"text": "warm"})
        burst: list[asyncio.Future[dict[str, Any]]] = [await _busy(svc, manager, 200, "p")]
        burst += [asyncio.ensure_future(svc.infer("p", {"text": t})) for t in ["a", "exit:boom", "b", "c"]]
        outcomes = await asyncio.wait_for(asyncio.gather(*burst, return_exceptions=True), 10)
        errors = [o for o in outcomes if isinstance(o, ModelMoraError)]
        assert errors and all(e.code is ErrorCode.WORKER_DIED for e in errors)
        assert (await svc.infer("p", {"text": "after"}))["result"]["embeddings"]
    finally:
        await manager.shutdown()


async def test_batches_never_exceed_the_limit(served: Served) -> None:
    svc, manager, _ = served
    await svc.infer("fake", {"text": "warm"})
    scheduler = _scheduler(manager)
    scheduler.limits = type(scheduler.limits)(4, 0)
    blocker = await _busy(svc, manager, 200)
    results = await asyncio.gather(
        *(svc.infer("fake", {"text": [f"a{i}", f"b{i}"] if i % 3 == 0 else f"c{i}"}) for i in range(20))
    )
    await blocker
    sizes = [r["metadata"]["batch_size"] for r in results]
    assert max(sizes) <= 4 and max(sizes) > 1  # batched, never over the limit (counted in inputs)


async def test_a_full_queue_refuses_with_retry_after_but_critical_gets_in(
    settings: Settings, store: RegistryStore, tmp_path: Path, factory: RecordingFactory
) -> None:
    _install(settings, store, make_fake_model(tmp_path / "q"), "q")
    settings.scheduler.queue_size_per_model = 10
    settings.scheduler.critical_reserve = 4
    manager = ModelManager(settings, store, factory)
    svc = InferenceService(settings, manager)
    try:
        await svc.infer("q", {"text": "warm"})
        scheduler = _scheduler(manager, "q")
        blocker = await _busy(svc, manager, 400, "q")
        normal = [asyncio.ensure_future(svc.infer("q", {"text": f"n{i}"})) for i in range(6)]
        await wait_for(lambda: scheduler.queued == 6, what="six requests queued")
        with pytest.raises(ModelMoraError) as exc:
            await svc.infer("q", {"text": "one too many"})
        assert exc.value.code is ErrorCode.QUEUE_FULL and exc.value.retry_after
        critical = await svc.infer("q", {"text": "vip"}, priority="critical")
        assert critical["result"]["embeddings"]
        assert all(r["result"]["embeddings"] for r in await asyncio.gather(blocker, *normal))
    finally:
        await manager.shutdown()


async def test_a_withdrawn_request_never_reaches_the_worker(served: Served) -> None:
    svc, manager, factory = served
    await svc.infer("fake", {"text": "warm"})
    scheduler = _scheduler(manager)
    blocker = await _busy(svc, manager, 300)
    with pytest.raises(ModelMoraError):
        await svc.infer("fake", {"text": "too late for me"}, timeout_seconds=0.05)
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    call = asyncio.ensure_future(svc.infer("fake", {"text": "client left"}, disconnected=gone))
    await wait_for(lambda: scheduler.queued == 1, what="the request queued")
    gone.set_result(None)
    with pytest.raises(ModelMoraError):
        await call
    await blocker
    await svc.infer("fake", {"text": "after"})
    seen = factory.runners[0].seen
    assert "after" in seen and "too late for me" not in seen and "client left" not in seen
