"""The manager with the zygote as its worker source: crash, kill, unload and health-check tests
of test_lifecycle.py run again unchanged (the `make_manager` below hands them a zygote and
checks that every worker was forked), then what only the zygote does: it stays after a load,
it counts once in the budget with the forks' USS, and it is given up first under pressure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from modelmora.config import Settings, load_settings
from modelmora.lifecycle.eviction import SPARE
from modelmora.lifecycle.manager import ModelManager, ModelSlot
from modelmora.lifecycle.runners import ProcessRunner, process_runner_factory
from modelmora.lifecycle.spare import WorkerSource
from modelmora.lifecycle.zygote_pool import BASE_MODULES, ZygotePool, fork_supported
from modelmora.registry.store import RegistryStore
from modelmora.services.inference import InferenceService
from tests.integration.test_lifecycle import (  # noqa: F401 - collected here again, forked
    _install,
    _state,
    store,
    test_a_crash_loop_backs_off,
    test_failed_health_check_marks_unhealthy_retries_then_recovers,
    test_keep_alive_global_per_request_and_forever,
)

pytestmark = pytest.mark.skipif(not fork_supported(), reason="the zygote needs Linux")

Builder = Callable[..., Awaitable[tuple[ModelManager, InferenceService]]]


@pytest.fixture
def runner_kind() -> str:
    """The tests taken from test_lifecycle.py that run over both runners: here, forks only."""
    return "process"


@pytest.fixture
async def make_manager(settings: Settings, store: RegistryStore) -> AsyncIterator[Builder]:  # noqa: F811
    managers: list[ModelManager] = []
    forked: list[bool] = []

    async def build(
        spares: WorkerSource | None = None, kind: str = "process"
    ) -> tuple[ModelManager, InferenceService]:
        assert kind == "process", "forks are process workers"
        pool = spares or ZygotePool(True, modules=BASE_MODULES)
        manager = ModelManager(settings, store, process_runner_factory, spares=pool)
        await manager.start()
        await pool.wait_filled()
        assert pool.ready, "the zygote did not start"
        original = manager.loader._start_worker

        async def start_worker(slot: ModelSlot) -> None:
            await original(slot)
            if isinstance(slot.runner, ProcessRunner):
                forked.append(slot.runner.forked)

        manager.loader._start_worker = start_worker  # type: ignore[method-assign]
        managers.append(manager)
        return manager, InferenceService(settings, manager)

    yield build
    for manager in managers:
        await manager.shutdown()
    assert forked and all(forked), "a worker was not forked from the zygote"


async def test_the_zygote_stays_after_a_load_and_counts_once(
    settings: Settings,
    store: RegistryStore,  # noqa: F811
    tmp_path: Path,
    make_manager: Builder,
) -> None:
    for name in ("a", "b"):
        _install(settings, store, tmp_path, name, ballast_mb=50)
    manager, svc = await make_manager()
    zygote_pid = manager.spares.pid
    await svc.infer("a", {"text": "x"})
    await svc.infer("b", {"text": "x"})
    assert manager.spares.ready and manager.spares.pid == zygote_pid  # not consumed by the loads
    status = manager.memory_status()
    assert status["spare"]["kind"] == "zygote" and status["spare"]["pid"] == zygote_pid
    residents = {r.name: r.ram_bytes for r in manager.residency.residents()}
    assert set(residents) == {"a", "b", SPARE}
    for name in ("a", "b"):
        runner = manager.slots[name].runner
        assert isinstance(runner, ProcessRunner) and runner.forked
        memory = runner.memory()
        # The budget counts the fork's own pages (50 MiB of ballast and a little), not what
        # it shares with the zygote; the zygote's RSS counts those once.
        assert 50 << 20 < residents[name] < memory["rss_bytes"]
        assert manager.slots[name].status(0.0)["memory"]["pss_bytes"] > 0
        assert store.get(name).memory["uss_bytes"] > 50 << 20  # kept for the next estimate
    assert residents[SPARE] == pytest.approx(manager.spares.rss_bytes(), rel=0.2)
    tree = status["tree"]
    assert tree["processes"] >= 4 and tree["pss_bytes"] < tree["rss_bytes"]
    assert status["used_ram_bytes"] == pytest.approx(sum(residents.values()), rel=0.2)


async def test_the_zygote_is_given_up_first_under_pressure_and_comes_back(
    settings: Settings,
    store: RegistryStore,  # noqa: F811
    tmp_path: Path,
) -> None:
    _install(settings, store, tmp_path, "big", memory_mb=300, ballast_mb=250)
    # Room for the model (300 MiB declared, less what a fork shares) or for the zygote
    # (~35 MiB without torch) next to it, not both.
    settings.resources.max_memory_mb = 290
    pool = ZygotePool(True, modules=BASE_MODULES)
    manager = ModelManager(settings, store, process_runner_factory, spares=pool)
    await manager.start()
    try:
        await pool.wait_filled()
        first = pool.pid
        assert pool.ready and first is not None
        svc = InferenceService(settings, manager)
        await svc.infer("big", {"text": "x"}, keep_alive=0)
        assert manager.counters["evictions"] == 0  # the zygote went, no model did
        assert pool.pid != first
        for _ in range(300):  # the reaper starts a new zygote once the model is gone
            if pool.ready:
                break
            await asyncio.sleep(0.1)
        assert _state(manager, "big") == "unloaded"
        assert pool.ready and pool.pid != first
    finally:
        await manager.shutdown()


def test_worker_start_setting_and_the_deprecated_warm_spare(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("MODELMORA_RESOURCES__WORKER_START", "MODELMORA_RESOURCES__WARM_SPARE"):
        monkeypatch.delenv(key, raising=False)
    assert load_settings().resources.worker_start == "zygote"
    assert load_settings(overrides={"resources": {"worker_start": "fresh"}}).resources.worker_start == "fresh"
    monkeypatch.setenv("MODELMORA_RESOURCES__WARM_SPARE", "false")
    with pytest.warns(FutureWarning, match="worker_start"):
        assert load_settings().resources.worker_start == "fresh"
    monkeypatch.setenv("MODELMORA_RESOURCES__WARM_SPARE", "true")
    with pytest.warns(FutureWarning):
        assert load_settings().resources.worker_start == "spare"
    monkeypatch.setenv("MODELMORA_RESOURCES__WORKER_START", "zygote")  # the new name wins
    assert load_settings().resources.worker_start == "zygote"
