"""The catalog service on a real SQLite registry and real model folders: every catalog write
(install, update, use, uninstall, a lock applied) fires exactly one event once committed,
reads and failed writes fire none, and a loaded model is refused or unloaded on uninstall."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from modelmora.config import Settings, load_settings
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.lifecycle.manager import ModelManager
from modelmora.lifecycle.runners import in_process_runner_factory
from modelmora.registry.installer import InstallRequest
from modelmora.registry.store import RegistryStore
from modelmora.services.events import CatalogChange, CatalogEvent
from modelmora.services.registry import RegistryService, inline
from tests.conftest import make_fake_model


@pytest.fixture
def store(settings: Settings) -> Iterator[RegistryStore]:
    store = RegistryStore(settings.database_url)
    store.create_schema()
    yield store
    store.close()


class Recorder:
    def __init__(self, service: RegistryService) -> None:
        self.events: list[CatalogEvent] = []
        service.subscribe(self.heard)

    def heard(self, event: CatalogEvent) -> None:
        self.events.append(event)

    def take(self) -> list[CatalogEvent]:
        taken, self.events = self.events, []
        return taken


def event(kind: CatalogChange, model: str, version: str | None) -> CatalogEvent:
    return CatalogEvent(kind, model, version)


async def test_each_catalog_write_fires_exactly_one_event(
    settings: Settings, store: RegistryStore, tmp_path: Path
) -> None:
    registry = RegistryService(settings, store)
    seen = Recorder(registry)
    folder = make_fake_model(tmp_path / "emb")

    await registry.install(InstallRequest(source=str(folder), version="v1"))
    assert seen.take() == [event(CatalogChange.INSTALLED, "emb", "v1")]
    other_files = make_fake_model(tmp_path / "emb-next", load_ms=1)
    record = await registry.install(InstallRequest(source=str(other_files), name="emb", version="v2"))
    assert record["active_version"] == "v2"
    assert seen.take() == [event(CatalogChange.INSTALLED, "emb", "v2")]

    assert (await registry.use("emb", "v1"))["active_version"] == "v1"
    assert seen.take() == [event(CatalogChange.ACTIVATED, "emb", "v1")]

    updated = await registry.update("emb", {"max_batch_size": 8}, {"display_name": "Embedder"})
    assert updated["config"]["max_batch_size"] == 8 and updated["display_name"] == "Embedder"
    assert seen.take() == [event(CatalogChange.UPDATED, "emb", None)]

    # Reads write nothing and say nothing.
    lock_path = tmp_path / "modelmora.lock"
    document = await registry.lock(lock_path)
    assert [m["name"] for m in document["models"]] == ["emb"] and lock_path.is_file()
    assert (await registry.verify("emb"))["verified"] is True
    assert (await registry.list())["meta"]["total"] == 1
    assert (await registry.get("emb"))["active_version"] == "v1"
    assert seen.take() == []

    assert (await registry.uninstall("emb@v2"))["versions"] == ["v2"]
    assert seen.take() == [event(CatalogChange.UNINSTALLED, "emb", "v2")]
    assert await registry.uninstall("emb") == {"deleted": "emb", "versions": ["v1"]}
    assert seen.take() == [event(CatalogChange.UNINSTALLED, "emb", None)]
    assert not (settings.models_dir / "emb").exists()

    # The lock applied on another data dir: one event per model it installs, none when present.
    other = load_settings(None, {"server": {"data_dir": str(tmp_path / "other")}})
    other_store = RegistryStore(other.database_url)
    other_store.create_schema()
    try:
        fresh = RegistryService(other, other_store, offload=inline)  # as the CLI runs it
        heard = Recorder(fresh)
        outcomes = await fresh.apply_lock(lock_path)
        assert [(e.name, outcome) for e, outcome in outcomes] == [("emb", "installed")]
        assert heard.take() == [event(CatalogChange.INSTALLED, "emb", "v1")]
        assert [outcome for _, outcome in await fresh.apply_lock(lock_path)] == ["present"]
        assert heard.take() == []
    finally:
        other_store.close()


async def test_a_refused_write_fires_nothing(
    settings: Settings, store: RegistryStore, tmp_path: Path
) -> None:
    registry = RegistryService(settings, store)
    seen = Recorder(registry)
    await registry.install(InstallRequest(source=str(make_fake_model(tmp_path / "emb")), version="v1"))
    seen.take()
    attempts = [
        (
            registry.install(InstallRequest(source=str(tmp_path / "emb"), version="v1")),
            ErrorCode.MODEL_EXISTS,
        ),
        (registry.install(InstallRequest(source=str(tmp_path / "nowhere"))), ErrorCode.SOURCE_UNAVAILABLE),
        (registry.use("emb", "v9"), ErrorCode.MODEL_NOT_FOUND),
        (registry.update("emb", {"max_batch_size": "lots"}), ErrorCode.VALIDATION_ERROR),
        (registry.update("emb", {}, {"colour": "red"}), ErrorCode.VALIDATION_ERROR),
        (registry.uninstall("ghost"), ErrorCode.MODEL_NOT_FOUND),
        (registry.uninstall("../etc"), ErrorCode.VALIDATION_ERROR),
    ]
    for call, code in attempts:
        with pytest.raises(ModelMoraError) as caught:
            await call
        assert caught.value.code == code
    assert seen.take() == []
    assert (await registry.get("emb"))["versions"][0]["version"] == "v1"


async def test_a_failing_observer_neither_fails_the_write_nor_silences_the_others(
    settings: Settings, store: RegistryStore, tmp_path: Path
) -> None:
    registry = RegistryService(settings, store)

    def broken(_event: CatalogEvent) -> None:
        raise RuntimeError("observer bug")

    registry.subscribe(broken)
    seen = Recorder(registry)
    stop = registry.subscribe(seen.heard)
    await registry.install(InstallRequest(source=str(make_fake_model(tmp_path / "emb")), version="v1"))
    assert seen.take() == [event(CatalogChange.INSTALLED, "emb", "v1")] * 2
    stop()
    await registry.use("emb", "v1")
    assert seen.take() == [event(CatalogChange.ACTIVATED, "emb", "v1")]


@pytest.fixture
async def manager(settings: Settings, store: RegistryStore) -> AsyncIterator[ModelManager]:
    manager = ModelManager(settings, store, in_process_runner_factory)
    await manager.start()
    yield manager
    await manager.shutdown()


async def test_uninstall_refuses_a_loaded_model_unless_forced(
    settings: Settings, store: RegistryStore, manager: ModelManager, tmp_path: Path
) -> None:
    registry = RegistryService(settings, store, manager)
    seen = Recorder(registry)
    installed = await registry.install(InstallRequest(source=str(make_fake_model(tmp_path / "emb"))))
    await manager.load("emb")
    assert (await registry.get("emb"))["state"] == "ready"  # live state, from the manager
    seen.take()
    with pytest.raises(ModelMoraError) as refused:
        await registry.uninstall("emb")
    assert refused.value.code == ErrorCode.MODEL_LOADED and seen.take() == []
    assert await registry.uninstall("emb", force=True) == {
        "deleted": "emb",
        "versions": [installed["active_version"]],
    }
    assert seen.take() == [event(CatalogChange.UNINSTALLED, "emb", None)]
    assert "emb" not in manager.slots
