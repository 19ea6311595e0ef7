"""The manager reacts to typed reasons, never to message text: why a load failed
(`LoadFailure`, carried from the worker on `LoadFailed`) and why a model was unloaded
(`UnloadKind`, the unload metric's label). Each case gives a message that says something
else, so a reaction keyed by text would pick the wrong branch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from modelmora.config import Settings
from modelmora.contracts.channel import (
    BatchDone,
    Healthy,
    Loaded,
    LoadFailure,
    LoadSpec,
    WorkerStats,
    WorkItem,
)
from modelmora.contracts.runner import EventHandler, ExitHandler, Runner
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.lifecycle.manager import ModelManager
from modelmora.lifecycle.runners import in_process_runner_factory
from modelmora.lifecycle.state import LoadError, UnloadKind
from modelmora.registry.catalog import ModelState
from modelmora.registry.installer import InstallRequest, install
from modelmora.registry.store import RegistryStore
from modelmora.services.registry import RegistryService
from tests.conftest import make_fake_model


@pytest.fixture
def store(settings: Settings) -> RegistryStore:
    s = RegistryStore(settings.database_url)
    s.create_schema()
    return s


def _install(settings: Settings, store: RegistryStore, tmp: Path, name: str, **options: object) -> None:
    folder = make_fake_model(tmp / f"src-{name}", **options)
    memory_mb = options.get("ballast_mb")
    install(
        settings,
        store,
        InstallRequest(
            source=str(folder),
            name=name,
            resource_requirements={"memory_mb": memory_mb} if memory_mb else {},
        ),
    )


@pytest.fixture
async def managers() -> AsyncIterator[list[ModelManager]]:
    made: list[ModelManager] = []
    yield made
    for manager in made:
        await manager.shutdown()


class FailingRunner:
    """A worker whose load fails with a given typed reason and message (the Runner seam)."""

    def __init__(self, failure: LoadFailure, message: str) -> None:
        self.failure, self.message = failure, message

    @property
    def alive(self) -> bool:
        return False

    @property
    def pid(self) -> int | None:
        return None

    async def start(self, spec: LoadSpec, timeout: float) -> Loaded:
        raise LoadError(self.failure, self.message)

    async def infer(self, items: list[WorkItem], priority: int = 3) -> BatchDone:
        raise AssertionError("never loaded")

    async def cancel(self, request_ids: list[str]) -> None:
        pass

    async def health(self, timeout: float = 5.0) -> Healthy:
        raise AssertionError("never loaded")

    async def stats(self, timeout: float = 1.0) -> WorkerStats:
        raise AssertionError("never loaded")

    async def close(self, grace: float) -> None:
        pass

    def rss_bytes(self) -> int:
        return 0


def _failing(failure: LoadFailure, message: str) -> Callable[[str, EventHandler, ExitHandler], Runner]:
    def factory(name: str, on_event: EventHandler, on_exit: ExitHandler) -> Runner:
        return FailingRunner(failure, message)

    return factory


@pytest.mark.parametrize(
    ("failure", "message", "state"),
    [
        (LoadFailure.HEALTH_CHECK, "RuntimeError: the sample came back empty", ModelState.UNHEALTHY),
        (LoadFailure.ERROR, "health check failed: words of an adapter's own", ModelState.FAILED),
        (LoadFailure.TIMEOUT, "health check failed: and yet a timeout", ModelState.FAILED),
        (LoadFailure.WORKER_DIED, "health check failed: and yet the worker died", ModelState.FAILED),
    ],
)
async def test_a_failed_load_leaves_the_state_its_reason_says(
    settings: Settings,
    store: RegistryStore,
    tmp_path: Path,
    managers: list[ModelManager],
    failure: LoadFailure,
    message: str,
    state: ModelState,
) -> None:
    settings.lifecycle.load_retries = 0
    _install(settings, store, tmp_path, "m")
    manager = ModelManager(settings, store, _failing(failure, message))
    managers.append(manager)
    with pytest.raises(ModelMoraError) as exc:
        await manager.load("m")
    assert exc.value.code is ErrorCode.MODEL_LOAD_FAILED
    assert message in exc.value.message  # the text still reaches people
    slot = manager.slots["m"]
    assert (slot.failure, slot.state) == (failure, state)


async def test_a_failing_health_check_is_typed_from_the_worker_to_the_manager(
    settings: Settings, store: RegistryStore, tmp_path: Path, managers: list[ModelManager]
) -> None:
    settings.lifecycle.load_retries = 0
    _install(settings, store, tmp_path, "sick", fail_health=True)
    _install(settings, store, tmp_path, "broken", fail_load=True)
    manager = ModelManager(settings, store, in_process_runner_factory)
    managers.append(manager)
    for name in ("sick", "broken"):
        with pytest.raises(ModelMoraError):
            await manager.load(name)
    assert (manager.slots["sick"].failure, manager.slots["sick"].state) == (
        LoadFailure.HEALTH_CHECK,
        ModelState.UNHEALTHY,
    )
    assert (manager.slots["broken"].failure, manager.slots["broken"].state) == (
        LoadFailure.ERROR,
        ModelState.FAILED,
    )


def _unloads(manager: ModelManager, name: str) -> dict[str, float]:
    counts = {}
    for kind in UnloadKind:
        value = manager.metrics.registry.get_sample_value(
            "modelmora_model_unloads_total", {"model": name, "reason": kind.value}
        )
        if value:
            counts[kind.value] = value
    return counts


async def _until(condition: Callable[[], bool], limit: float = 15.0) -> None:
    for _ in range(int(limit / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_each_unload_kind_is_counted_under_its_own_label(
    settings: Settings, store: RegistryStore, tmp_path: Path, managers: list[ModelManager]
) -> None:
    settings.resources.max_memory_mb = 50  # room for one 30 MB model, not two
    for name in ("asked", "idle", "victim", "newcomer", "gone", "last"):
        _install(settings, store, tmp_path, name, ballast_mb=30 if name in ("victim", "newcomer") else 0)
    manager = ModelManager(settings, store, in_process_runner_factory)
    managers.append(manager)
    await manager.start()

    # Requested, with a reason whose words name another kind.
    await manager.load("asked")
    assert await manager.unload("asked", "evicted: keep-alive expired at server shutdown")
    # Keep-alive: a request that asks for none.
    slot = await manager.acquire("idle")
    manager.release(slot, keep_alive=0)
    await _until(lambda: manager.slots["idle"].state is ModelState.UNLOADED)
    # Eviction: the second 30 MB model needs the first one's room.
    await manager.load("victim")
    await manager.load("newcomer")
    assert manager.slots["victim"].state is ModelState.UNLOADED
    # Uninstall, through the registry service every door calls.
    await manager.load("gone")
    await RegistryService(settings, store, manager).uninstall("gone", force=True)
    # Shutdown.
    await manager.load("last")
    await manager.shutdown()

    assert _unloads(manager, "asked") == {"requested": 1}
    assert _unloads(manager, "idle") == {"keep_alive": 1}
    assert _unloads(manager, "victim") == {"eviction": 1}
    assert _unloads(manager, "gone") == {"uninstall": 1}
    assert _unloads(manager, "last") == {"shutdown": 1}
