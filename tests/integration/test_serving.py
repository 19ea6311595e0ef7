"""Manager + scheduler + service over the in-process runner (fast) and real processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from modelmora.config import Settings
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.lifecycle.manager import ModelManager
from modelmora.lifecycle.runners import (
    EventHandler,
    ExitHandler,
    InProcessRunner,
    Runner,
    process_runner_factory,
)
from modelmora.registry.installer import InstallRequest, install
from modelmora.registry.store import RegistryStore
from modelmora.services.inference import InferenceService
from tests.conftest import make_fake_model


class CountingFactory:
    def __init__(self) -> None:
        self.runners: list[InProcessRunner] = []

    def __call__(self, name: str, on_event: EventHandler, on_exit: ExitHandler) -> Runner:
        runner = InProcessRunner(name, on_event, on_exit)
        self.runners.append(runner)
        return runner


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[RegistryStore]:
    s = RegistryStore(settings.database_url)
    s.create_schema()
    yield s
    s.close()


def _install(settings: Settings, store: RegistryStore, folder: Path, name: str) -> None:
    install(settings, store, InstallRequest(source=str(folder), name=name))


@pytest.fixture
async def served(
    settings: Settings, store: RegistryStore, tmp_path: Path
) -> AsyncIterator[tuple[InferenceService, ModelManager, CountingFactory]]:
    _install(settings, store, make_fake_model(tmp_path / "f1", load_ms=100), "fake")
    factory = CountingFactory()
    manager = ModelManager(settings, store, factory)
    yield InferenceService(settings, manager), manager, factory
    await manager.shutdown()


async def test_concurrent_first_requests_share_one_load(
    served: tuple[InferenceService, ModelManager, CountingFactory],
) -> None:
    svc, manager, factory = served
    results = await asyncio.gather(*(svc.infer("fake", {"text": f"t{i}"}) for i in range(8)))
    assert len(factory.runners) == 1
    assert all(len(r["result"]["embeddings"]) == 8 for r in results)
    assert manager.slots["fake"].state.value == "ready"


async def test_requests_queued_behind_a_busy_worker_are_batched(
    served: tuple[InferenceService, ModelManager, CountingFactory],
) -> None:
    svc, _manager, _factory = served
    await svc.infer("fake", {"text": "warm"})
    blocker = asyncio.ensure_future(svc.infer("fake", {"text": "sleep:300"}))
    await asyncio.sleep(0.05)
    burst = await asyncio.gather(*(svc.infer("fake", {"text": f"b{i}"}) for i in range(10)))
    await blocker
    sizes = {r["metadata"]["batch_size"] for r in burst}
    assert sizes == {10}  # all gathered while the worker was busy, sent as one batch
    assert all(r["timing"]["queue_time_ms"] > 0 for r in burst)


async def test_priority_decides_who_goes_first(
    served: tuple[InferenceService, ModelManager, CountingFactory], settings: Settings
) -> None:
    svc, manager, _ = served
    manager.settings.scheduler.max_batch_size = 1
    await svc.infer("fake", {"text": "warm"})
    slot = manager.slots["fake"]
    assert slot.scheduler is not None
    slot.scheduler.limits = type(slot.scheduler.limits)(1, 0)
    order: list[str] = []

    async def call(text: str, priority: str) -> None:
        await svc.infer("fake", {"text": text}, priority=priority)
        order.append(text)

    blocker = asyncio.ensure_future(svc.infer("fake", {"text": "sleep:200"}))
    await asyncio.sleep(0.05)
    tasks = [asyncio.ensure_future(call(f"low{i}", "low")) for i in range(3)]
    await asyncio.sleep(0.01)
    tasks.append(asyncio.ensure_future(call("critical", "critical")))
    await asyncio.gather(blocker, *tasks)
    # At most one batch waits in front of the worker and cannot be recalled: the critical
    # request overtakes every low one that was still queued.
    assert order.index("critical") <= 1
    assert order[order.index("critical") + 1 :] == [f"low{i}" for i in range(order.index("critical"), 3)]


async def test_a_critical_batch_jumping_the_line_carries_no_low_work(
    served: tuple[InferenceService, ModelManager, CountingFactory],
) -> None:
    """While the worker computes, a critical request goes ahead alone: the low requests
    queued around it wait for their own batch instead of riding in front with it."""
    svc, _, _ = served
    await svc.infer("fake", {"text": "warm"})
    blocker = asyncio.ensure_future(svc.infer("fake", {"text": "sleep:300"}))
    await asyncio.sleep(0.05)
    lows = [asyncio.ensure_future(svc.infer("fake", {"text": f"low{i}"}, priority="low")) for i in range(3)]
    await asyncio.sleep(0.01)
    critical = await svc.infer("fake", {"text": "vip"}, priority="critical")
    assert critical["metadata"]["batch_size"] == 1
    assert all(not t.done() for t in lows)  # still waiting: the critical batch ran first
    sizes = [r["metadata"]["batch_size"] for r in await asyncio.gather(*lows)]
    assert sizes == [3, 3, 3]
    await blocker


async def test_deadline_passes_while_queued(
    served: tuple[InferenceService, ModelManager, CountingFactory],
) -> None:
    svc, _, _ = served
    await svc.infer("fake", {"text": "warm"})
    blocker = asyncio.ensure_future(svc.infer("fake", {"text": "sleep:400"}))
    await asyncio.sleep(0.05)
    with pytest.raises(ModelMoraError) as exc:
        await svc.infer("fake", {"text": "late"}, timeout_seconds=0.1)
    assert exc.value.code is ErrorCode.INFERENCE_TIMEOUT
    await blocker


async def test_disconnected_client_is_dropped_before_it_runs(
    served: tuple[InferenceService, ModelManager, CountingFactory],
) -> None:
    svc, manager, _ = served
    await svc.infer("fake", {"text": "warm"})
    blocker = asyncio.ensure_future(svc.infer("fake", {"text": "sleep:300"}))
    await asyncio.sleep(0.05)
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    call = asyncio.ensure_future(svc.infer("fake", {"text": "never"}, disconnected=gone))
    await asyncio.sleep(0.02)
    gone.set_result(None)
    with pytest.raises(ModelMoraError) as exc:
        await call
    assert exc.value.code is ErrorCode.CANCELLED
    slot = manager.slots["fake"]
    assert slot.scheduler is not None and slot.scheduler.queued == 0
    await blocker


async def test_crash_fails_queued_requests_and_the_next_request_reloads(
    served: tuple[InferenceService, ModelManager, CountingFactory],
) -> None:
    svc, manager, factory = served
    await svc.infer("fake", {"text": "warm"})
    blocker = asyncio.ensure_future(svc.infer("fake", {"text": "sleep:300"}))
    await asyncio.sleep(0.05)
    queued = [asyncio.ensure_future(svc.infer("fake", {"text": f"q{i}"})) for i in range(5)]
    await asyncio.sleep(0.02)
    factory.runners[0].kill("simulated crash")
    outcomes = await asyncio.gather(*queued, return_exceptions=True)
    assert all(isinstance(o, ModelMoraError) and o.code is ErrorCode.WORKER_DIED for o in outcomes)
    await asyncio.gather(blocker, return_exceptions=True)
    again = await svc.infer("fake", {"text": "after"})
    assert again["result"]["embeddings"] and len(factory.runners) == 2
    assert manager.slots["fake"].state.value == "ready"


async def test_load_failure_backs_off_and_other_models_keep_serving(
    settings: Settings, store: RegistryStore, tmp_path: Path
) -> None:
    _install(settings, store, make_fake_model(tmp_path / "ok"), "ok")
    _install(settings, store, make_fake_model(tmp_path / "bad", fail_load=True), "bad")
    settings.lifecycle.load_backoff_seconds = 30
    settings.lifecycle.load_retries = 0  # retries are covered in test_lifecycle
    manager = ModelManager(settings, store, CountingFactory())
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


async def test_unknown_model_and_bad_input(
    served: tuple[InferenceService, ModelManager, CountingFactory],
) -> None:
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
    """A real worker process dies under a burst: every request ends, the next one succeeds."""
    _install(settings, store, make_fake_model(tmp_path / "p"), "p")
    manager = ModelManager(settings, store, process_runner_factory)
    svc = InferenceService(settings, manager)
    try:
        await svc.infer("p", {"text": "warm"})
        burst = [asyncio.ensure_future(svc.infer("p", {"text": "sleep:200"}))]
        await asyncio.sleep(0.05)
        burst += [asyncio.ensure_future(svc.infer("p", {"text": t})) for t in ["a", "exit:boom", "b", "c"]]
        outcomes = await asyncio.wait_for(asyncio.gather(*burst, return_exceptions=True), 10)
        errors = [o for o in outcomes if isinstance(o, ModelMoraError)]
        assert errors and all(e.code is ErrorCode.WORKER_DIED for e in errors)
        assert (await svc.infer("p", {"text": "after"}))["result"]["embeddings"]
    finally:
        await manager.shutdown()


async def test_batches_never_exceed_the_limit(
    served: tuple[InferenceService, ModelManager, CountingFactory],
) -> None:
    svc, manager, _ = served
    await svc.infer("fake", {"text": "warm"})
    slot = manager.slots["fake"]
    assert slot.scheduler is not None
    slot.scheduler.limits = type(slot.scheduler.limits)(4, 0)
    blocker = asyncio.ensure_future(svc.infer("fake", {"text": "sleep:200"}))
    await asyncio.sleep(0.05)
    results = await asyncio.gather(
        *(svc.infer("fake", {"text": [f"a{i}", f"b{i}"] if i % 3 == 0 else f"c{i}"}) for i in range(20))
    )
    await blocker
    sizes = [r["metadata"]["batch_size"] for r in results]
    assert max(sizes) <= 4 and max(sizes) > 1  # batched, never over the limit (counted in inputs)


async def test_a_full_queue_refuses_with_retry_after_but_critical_gets_in(
    settings: Settings, store: RegistryStore, tmp_path: Path
) -> None:
    _install(settings, store, make_fake_model(tmp_path / "q"), "q")
    settings.scheduler.queue_size_per_model = 10
    settings.scheduler.critical_reserve = 4
    manager = ModelManager(settings, store, CountingFactory())
    svc = InferenceService(settings, manager)
    try:
        await svc.infer("q", {"text": "warm"})
        blocker = asyncio.ensure_future(svc.infer("q", {"text": "sleep:400"}))
        await asyncio.sleep(0.05)
        normal = [asyncio.ensure_future(svc.infer("q", {"text": f"n{i}"})) for i in range(6)]
        await asyncio.sleep(0.01)
        with pytest.raises(ModelMoraError) as exc:
            await svc.infer("q", {"text": "one too many"})
        assert exc.value.code is ErrorCode.QUEUE_FULL and exc.value.retry_after
        critical = await svc.infer("q", {"text": "vip"}, priority="critical")
        assert critical["result"]["embeddings"]
        assert all(r["result"]["embeddings"] for r in await asyncio.gather(blocker, *normal))
    finally:
        await manager.shutdown()


async def test_a_withdrawn_request_never_reaches_the_worker(
    served: tuple[InferenceService, ModelManager, CountingFactory],
) -> None:
    svc, _, factory = served
    await svc.infer("fake", {"text": "warm"})
    blocker = asyncio.ensure_future(svc.infer("fake", {"text": "sleep:300"}))
    await asyncio.sleep(0.05)
    with pytest.raises(ModelMoraError):
        await svc.infer("fake", {"text": "too late for me"}, timeout_seconds=0.05)
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    call = asyncio.ensure_future(svc.infer("fake", {"text": "client left"}, disconnected=gone))
    await asyncio.sleep(0.01)
    gone.set_result(None)
    with pytest.raises(ModelMoraError):
        await call
    await blocker
    await svc.infer("fake", {"text": "after"})
    seen = factory.runners[0]._core.adapter.seen  # type: ignore[union-attr]
    assert "after" in seen and "too late for me" not in seen and "client left" not in seen
