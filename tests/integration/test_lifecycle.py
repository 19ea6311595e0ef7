"""Residency: budgets, eviction, keep-alive, health checks, crash loops and the warm spare.

Memory budgets, crashes and spares are about worker processes and run with real ones;
keep-alive, health checks and the plan's refusals run over both runners."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from modelmora.config import Settings
from modelmora.contracts.channel import LoadFailure
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.lifecycle.manager import ModelManager
from modelmora.lifecycle.runners import in_process_runner_factory, process_runner_factory
from modelmora.lifecycle.spare import SparePool
from modelmora.registry.catalog import ModelState
from modelmora.registry.installer import InstallRequest, install
from modelmora.registry.store import RegistryStore
from modelmora.services.inference import InferenceService
from tests.conftest import make_fake_model
from tests.runners import RUNNER_KINDS
from tests.waiting import wait_for


@pytest.fixture
def store(settings: Settings) -> RegistryStore:
    s = RegistryStore(settings.database_url)
    s.create_schema()
    return s


def _install(
    settings: Settings,
    store: RegistryStore,
    tmp: Path,
    name: str,
    memory_mb: int | None = None,
    **options: object,
) -> None:
    install(
        settings,
        store,
        InstallRequest(
            source=str(make_fake_model(tmp / f"src-{name}", **options)),
            name=name,
            resource_requirements={"memory_mb": memory_mb} if memory_mb else {},
        ),
    )


@pytest.fixture
async def make_manager(settings: Settings, store: RegistryStore) -> AsyncIterator[object]:
    managers: list[ModelManager] = []

    async def build(
        spares: SparePool | None = None, kind: str = "process"
    ) -> tuple[ModelManager, InferenceService]:
        factory = process_runner_factory if kind == "process" else in_process_runner_factory
        manager = ModelManager(settings, store, factory, spares=spares)
        await manager.start()
        managers.append(manager)
        return manager, InferenceService(settings, manager)

    yield build
    for manager in managers:
        await manager.shutdown()


@pytest.fixture(params=RUNNER_KINDS)
def runner_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _state(manager: ModelManager, name: str) -> str:
    return manager.slots[name].state.value


async def test_lru_eviction_keeps_within_the_budget(
    settings: Settings, store: RegistryStore, tmp_path: Path, make_manager
) -> None:  # type: ignore[no-untyped-def]
    for name in ("a", "b", "c"):
        _install(settings, store, tmp_path, name, memory_mb=200, ballast_mb=150)
    settings.resources.max_memory_mb = 450
    manager, svc = await make_manager()
    await svc.infer("a", {"text": "x"})
    await svc.infer("b", {"text": "x"})
    await svc.infer("a", {"text": "x"})  # b is now the least recently used
    await svc.infer("c", {"text": "x"})
    assert (
        _state(manager, "b") == "unloaded"
        and _state(manager, "a") == "ready"
        and _state(manager, "c") == "ready"
    )
    assert manager.counters["evictions"] == 1
    used = sum(manager.slots[n].runner.rss_bytes() for n in ("a", "c"))  # type: ignore[union-attr]
    assert used <= 450 << 20
    measured = store.get("a").memory["rss_bytes"]
    assert measured > 150 << 20  # the real figure is kept as the next estimate


async def test_a_busy_model_is_never_evicted_the_load_waits(
    settings: Settings, store: RegistryStore, tmp_path: Path, make_manager
) -> None:  # type: ignore[no-untyped-def]
    for name in ("busy", "next"):
        _install(settings, store, tmp_path, name, memory_mb=200, ballast_mb=100)
    settings.resources.max_memory_mb = 300
    manager, svc = await make_manager()
    await svc.infer("busy", {"text": "warm"})
    long_call = asyncio.ensure_future(svc.infer("busy", {"text": "sleep:5000"}))
    scheduler = manager.slots["busy"].scheduler
    assert scheduler is not None
    await wait_for(lambda: scheduler.inflight == 1, what="the long call in flight")
    # The deadline must fall after the load has found that it waits for memory (a registry
    # read and the plan first: over 0.5 s once on a loaded CI machine), and before `busy`
    # is done.
    with pytest.raises(ModelMoraError) as exc:
        await svc.infer("next", {"text": "x"}, timeout_seconds=2.0)
    assert exc.value.code is ErrorCode.INSUFFICIENT_MEMORY
    assert exc.value.details["model"] == "next" and "budget" in str(exc.value.details)
    assert _state(manager, "busy") == "ready"
    waiting = asyncio.ensure_future(svc.infer("next", {"text": "x"}, timeout_seconds=20))
    assert (await long_call)["result"]["embeddings"]
    assert (await waiting)["metadata"]["model"] == "next"  # loaded once busy became idle
    assert _state(manager, "busy") == "unloaded"


async def test_a_model_larger_than_the_budget_is_refused_at_once(
    settings: Settings, store: RegistryStore, tmp_path: Path, make_manager, runner_kind: str
) -> None:  # type: ignore[no-untyped-def]
    _install(settings, store, tmp_path, "huge", memory_mb=10_000)
    settings.resources.max_memory_mb = 500
    _manager, svc = await make_manager(kind=runner_kind)
    with pytest.raises(ModelMoraError) as exc:
        await svc.infer("huge", {"text": "x"})
    assert exc.value.code is ErrorCode.INSUFFICIENT_MEMORY


async def test_keep_alive_global_per_request_and_forever(
    settings: Settings, store: RegistryStore, tmp_path: Path, make_manager, runner_kind: str
) -> None:  # type: ignore[no-untyped-def]
    for name in ("short", "zero", "forever"):
        _install(settings, store, tmp_path, name)
    settings.lifecycle.keep_alive_seconds = 3.0
    manager, svc = await make_manager(kind=runner_kind)
    await svc.infer("zero", {"text": "x"}, keep_alive=0)
    await svc.infer("forever", {"text": "x"}, keep_alive=-1)
    await svc.infer("short", {"text": "x"})
    await wait_for(lambda: _state(manager, "zero") == "unloaded")  # right after its request
    assert _state(manager, "short") == "ready"  # well inside its 3 s
    # The keep-alive's own expiry: the wait is the behaviour under test.
    await wait_for(lambda: _state(manager, "short") == "unloaded")
    assert _state(manager, "forever") == "ready"  # -1: never by keep-alive


async def test_failed_health_check_marks_unhealthy_retries_then_recovers(
    settings: Settings,
    store: RegistryStore,
    tmp_path: Path,
    make_manager,  # type: ignore[no-untyped-def]
    runner_kind: str,
) -> None:
    marker = tmp_path / "unhealthy"
    marker.touch()
    _install(settings, store, tmp_path, "flaky", fail_health_if_exists=str(marker))
    settings.lifecycle.load_retries = 1
    settings.lifecycle.load_backoff_seconds = 0.2
    manager, svc = await make_manager(kind=runner_kind)
    with pytest.raises(ModelMoraError) as exc:
        await svc.infer("flaky", {"text": "x"})
    assert exc.value.code is ErrorCode.MODEL_LOAD_FAILED and "health check" in exc.value.message
    slot = manager.slots["flaky"]
    assert slot.state is ModelState.UNHEALTHY and slot.failures == 2  # first try + one retry
    assert slot.failure is LoadFailure.HEALTH_CHECK  # typed, across the worker channel
    assert slot.runner is None  # no request is routed to it
    marker.unlink()
    await wait_for(lambda: manager.clock() > slot.retry_at, what="the backoff over")
    assert (await svc.infer("flaky", {"text": "x"}))["metadata"]["model"] == "flaky"
    assert slot.failure is None and slot.state is ModelState.READY


async def test_a_crash_loop_backs_off(
    settings: Settings, store: RegistryStore, tmp_path: Path, make_manager
) -> None:  # type: ignore[no-untyped-def]
    _install(settings, store, tmp_path, "crashy")
    settings.lifecycle.load_backoff_seconds = 30
    manager, svc = await make_manager()
    for _ in range(2):
        with pytest.raises(ModelMoraError) as exc:
            await svc.infer("crashy", {"text": "exit:now"})
        assert exc.value.code is ErrorCode.WORKER_DIED
    with pytest.raises(ModelMoraError) as exc:
        await svc.infer("crashy", {"text": "fine"})
    assert exc.value.code is ErrorCode.MODEL_LOAD_FAILED and exc.value.retry_after
    assert manager.counters["crashes"] == 2


async def test_the_warm_spare_becomes_the_worker(
    settings: Settings, store: RegistryStore, minilm_path: Path, make_manager
) -> None:  # type: ignore[no-untyped-def]
    install(
        settings,
        store,
        InstallRequest(model_id="sentence-transformers/all-MiniLM-L6-v2", source=str(minilm_path)),
    )
    spares = SparePool(enabled=True)
    manager, svc = await make_manager(spares)
    await spares.wait_filled()
    spare_pid = spares.pid
    assert spare_pid is not None and spares.rss_bytes() > 100 << 20  # torch is imported in it
    result = await svc.infer("all-MiniLM-L6-v2", {"text": "hello"})
    assert len(result["result"]["embeddings"]) == 384
    assert manager.slots["all-MiniLM-L6-v2"].runner.pid == spare_pid  # type: ignore[union-attr]
    await spares.wait_filled()  # refilled in the background
    assert spares.pid is not None and spares.pid != spare_pid
    assert manager.memory_status()["spare"]["ready"] is True


async def test_the_spare_only_takes_memory_no_model_needs(settings: Settings, make_manager) -> None:  # type: ignore[no-untyped-def]
    settings.resources.max_memory_mb = 300  # less than a torch worker: no room for a spare
    spares = SparePool(enabled=True)
    manager, _svc = await make_manager(spares)
    await spares.wait_filled()
    assert not spares.ready and spares.pid is None
    assert manager.memory_status()["spare"]["ready"] is False


async def test_a_spare_given_up_for_memory_comes_back(
    settings: Settings, store: RegistryStore, tmp_path: Path, make_manager
) -> None:  # type: ignore[no-untyped-def]
    _install(settings, store, tmp_path, "big", memory_mb=300)
    # The spare or the model, not both: a budget sized from this machine's spare (~410 MB with
    # torch's CPU build, ~800 MB with its CUDA build), 600 MB for the CPU one.
    probe = SparePool(enabled=True)
    probe.fill()
    await probe.wait_filled()
    spare_mb = probe.rss_bytes() >> 20
    await probe.close()
    assert spare_mb > 300  # so the two cannot fit together
    settings.resources.max_memory_mb = spare_mb + 190
    spares = SparePool(enabled=True)
    manager, svc = await make_manager(spares)
    await spares.wait_filled()
    assert spares.ready and spares.rss_bytes() > 300 << 20  # so the two cannot fit together
    first_spare = spares.pid
    await svc.infer("big", {"text": "x"}, keep_alive=0)  # evicts the spare, then unloads itself
    assert _state(manager, "big") in ("ready", "unloading", "unloaded")
    # The reaper refills it once the budget has room again.
    await wait_for(lambda: spares.ready, timeout=30, what="the spare refilled")
    assert _state(manager, "big") == "unloaded"
    assert spares.pid != first_spare  # a new spare, not the one given up
