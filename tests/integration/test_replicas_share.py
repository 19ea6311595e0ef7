"""Replicas that share one registry (issue 15), in process: two "nodes" are two data dirs on
one registry database and one model store. Paths are stored relative to each node's roots; a
node without a version's files fetches them from the store once, checksums verified; every
catalog write bumps the catalog version in order (NOTIFY on PostgreSQL); a replica's
`CatalogSync` brings its loaded models in line with writes made elsewhere; several replicas
refuse unshared results."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from sqlalchemy import text

from modelmora.config import ConfigurationError, Settings, load_settings
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.lifecycle.manager import ModelManager
from modelmora.lifecycle.runners import in_process_runner_factory
from modelmora.registry.installer import InstallRequest
from modelmora.registry.model_store import DirModelStore, Materialiser, ModelStore, open_model_store
from modelmora.registry.paths import roots_of
from modelmora.registry.store import RegistryStore
from modelmora.services.catalog_sync import CatalogSync
from modelmora.services.registry import RegistryService, inline
from tests.conftest import make_fake_model, new_bucket

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def node(tmp_path: Path, name: str, database_url: str, model_store: str | None, **extra: Any) -> Settings:
    return load_settings(
        overrides={
            "server": {"data_dir": str(tmp_path / name)},
            "registry": {"database_url": database_url, "model_store": model_store, **extra},
        }
    )


@pytest.fixture(params=["dir", "s3"])
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "dir":
        return str(tmp_path / "shared-store")
    endpoint: str = request.getfixturevalue("s3_endpoint")
    return f"s3://{new_bucket(endpoint)}/models"


@pytest.fixture
def nodes(
    tmp_path: Path, store_location: str, request: pytest.FixtureRequest
) -> Iterator[tuple[Settings, Settings]]:
    url = f"sqlite:///{tmp_path / 'shared' / 'registry.db'}"
    extra = {}
    if store_location.startswith("s3://"):
        extra["s3_endpoint_url"] = request.getfixturevalue("s3_endpoint")
    yield node(tmp_path, "a", url, store_location, **extra), node(tmp_path, "b", url, store_location, **extra)


def open_store(settings: Settings) -> RegistryStore:
    store = RegistryStore(settings.database_url, roots_of(settings))
    store.create_schema()
    return store


class CountingStore:
    """The real store, counting the files read from it (one fetch per node)."""

    def __init__(self, inner: ModelStore) -> None:
        self.inner = inner
        self.location = inner.location
        self.reads = 0

    def has(self, name: str, version: str) -> bool:
        return self.inner.has(name, version)

    def put(self, name: str, version: str, folder: Path, files: dict[str, str], advance: Any) -> None:
        self.inner.put(name, version, folder, files, advance)

    def reader(self, name: str, version: str, rel: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        self.reads += 1
        return self.inner.reader(name, version, rel)

    def delete(self, name: str, version: str) -> None:
        self.inner.delete(name, version)


async def test_paths_are_relative_in_the_database_and_local_on_each_node(
    nodes: tuple[Settings, Settings], tmp_path: Path
) -> None:
    a, b = nodes
    store_a, store_b = open_store(a), open_store(b)
    try:
        await RegistryService(a, store_a, offload=inline).install(
            InstallRequest(source=str(make_fake_model(tmp_path / "emb")), version="v1")
        )
        with store_a.engine.connect() as conn:
            assert conn.execute(text("SELECT path FROM model_versions")).scalar() == "emb/v1"
        assert store_a.get("emb").version().path == str(a.models_dir / "emb" / "v1")
        assert store_b.get("emb").version().path == str(b.models_dir / "emb" / "v1")
    finally:
        store_a.close()
        store_b.close()


async def test_install_uploads_once_and_another_node_fetches_on_its_first_load(
    nodes: tuple[Settings, Settings], tmp_path: Path
) -> None:
    a, b = nodes
    folder = make_fake_model(tmp_path / "emb")
    (folder / "weights.bin").write_bytes(b"\x07" * 300_000)
    store_a, store_b = open_store(a), open_store(b)
    shared = open_model_store(a)
    assert shared is not None
    manager = ModelManager(b, store_b, in_process_runner_factory)
    counting = CountingStore(shared)
    manager.loader.fetch_files = Materialiser(b, counting)
    try:
        await RegistryService(a, store_a, offload=inline).install(
            InstallRequest(source=str(folder), version="v1")
        )
        assert shared.has("emb", "v1")
        local = b.models_dir / "emb" / "v1"
        assert not local.exists()
        # Concurrent first requests on node B: one fetch, then the load.
        slots = await asyncio.gather(*(manager.load("emb") for _ in range(5)))
        assert all(slot.is_ready() for slot in slots)
        assert counting.reads == 2  # modelmora.json and weights.bin, once each
        assert (local / "weights.bin").read_bytes() == b"\x07" * 300_000
        assert not [p for p in local.parent.iterdir() if p.name.endswith(".partial")]
    finally:
        await manager.shutdown()
        store_a.close()
        store_b.close()


async def test_a_store_copy_that_differs_from_the_registry_fails_the_load(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    where = tmp_path / "shared-store"
    a, b = node(tmp_path, "a", url, str(where)), node(tmp_path, "b", url, str(where))
    a.lifecycle.load_retries = 0
    b.lifecycle.load_retries = 0
    store_a, store_b = open_store(a), open_store(b)
    manager = ModelManager(b, store_b, in_process_runner_factory)
    manager.loader.fetch_files = Materialiser(b, DirModelStore(where))
    try:
        await RegistryService(a, store_a, offload=inline).install(
            InstallRequest(source=str(make_fake_model(tmp_path / "emb")), version="v1")
        )
        (where / "emb" / "v1" / "modelmora.json").write_text('{"task_type": "txt2embed"}')
        with pytest.raises(ModelMoraError) as failed:
            await manager.load("emb")
        assert failed.value.code is ErrorCode.CHECKSUM_MISMATCH  # not retried, like a damaged local copy
        assert "differs from the registry" in (manager.slots["emb"].error or "")
        assert not (b.models_dir / "emb").exists() or not any((b.models_dir / "emb").iterdir())
    finally:
        await manager.shutdown()
        store_a.close()
        store_b.close()


async def test_a_lock_applied_on_a_fresh_node_fills_its_disk_from_the_store(
    nodes: tuple[Settings, Settings], tmp_path: Path
) -> None:
    a, b = nodes
    store_a, store_b = open_store(a), open_store(b)
    try:
        registry_a = RegistryService(a, store_a, offload=inline)
        await registry_a.install(InstallRequest(source=str(make_fake_model(tmp_path / "emb")), version="v1"))
        lock = tmp_path / "modelmora.lock"
        await registry_a.lock(lock)
        registry_b = RegistryService(b, store_b, offload=inline)
        outcomes = [outcome for _, outcome in await registry_b.apply_lock(lock)]
        assert outcomes == ["fetched"]
        assert (b.models_dir / "emb" / "v1" / "modelmora.json").is_file()
        assert [outcome for _, outcome in await registry_b.apply_lock(lock)] == ["present"]
    finally:
        store_a.close()
        store_b.close()


async def test_every_catalog_write_bumps_the_version_with_its_change(
    settings: Settings, tmp_path: Path
) -> None:
    store = open_store(settings)
    try:
        registry = RegistryService(settings, store, offload=inline)
        assert store.catalog_version() == 0
        await registry.install(
            InstallRequest(source=str(make_fake_model(tmp_path / "e1")), name="emb", version="v1")
        )
        await registry.install(
            InstallRequest(source=str(make_fake_model(tmp_path / "e2")), name="emb", version="v2")
        )
        await registry.update("emb", {"max_batch_size": 4})
        await registry.use("emb", "v1")
        await registry.uninstall("emb@v2")
        with pytest.raises(ModelMoraError):
            await registry.use("emb", "v9")  # a failed write bumps nothing
        found = store.changes_since(0)
        assert found is not None
        changes, current = found
        assert current == store.catalog_version() == 5
        assert [(c.version, c.kind, c.model_version) for c in changes] == [
            (1, "installed", "v1"),
            (2, "installed", "v2"),
            (3, "updated", None),
            (4, "activated", "v1"),
            (5, "uninstalled", "v2"),
        ]
        assert changes[-1].details == {
            "versions": [{"version": "v2", "source_kind": "local", "path": "emb/v2"}]
        }
        assert store.changes_since(5) == ([], 5)
    finally:
        store.close()


@pytest.mark.postgres
async def test_postgres_notifies_listeners_when_the_write_commits(postgres_url: str, tmp_path: Path) -> None:
    import psycopg
    from sqlalchemy import make_url

    settings = node(tmp_path, "a", postgres_url, None)
    store = open_store(settings)
    listen_url = make_url(postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        with store.engine.begin() as conn:  # a database shared with other tests of the session
            conn.execute(text("DELETE FROM models"))
        registry = RegistryService(settings, store, offload=inline)
        await registry.install(InstallRequest(source=str(make_fake_model(tmp_path / "emb")), version="v1"))
        async with await psycopg.AsyncConnection.connect(listen_url, autocommit=True) as conn:
            await conn.execute("LISTEN modelmora_catalog")
            await registry.update("emb", {"max_batch_size": 2})
            notify = await anext(aiter(conn.notifies(timeout=30)))
        assert int(notify.payload) == store.catalog_version()
    finally:
        with contextlib.suppress(Exception):
            await RegistryService(settings, store, offload=inline).uninstall("emb")
        store.close()


async def test_catalog_sync_brings_another_replicas_loaded_model_in_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    where = str(tmp_path / "shared-store")
    a, b = node(tmp_path, "a", url, where), node(tmp_path, "b", url, where)
    store_a, store_b = open_store(a), open_store(b)
    registry_a = RegistryService(a, store_a, offload=inline)
    manager = ModelManager(b, store_b, in_process_runner_factory)
    manager.loader.fetch_files = Materialiser(b, DirModelStore(Path(where)))
    sync = CatalogSync(b, store_b, manager)
    try:
        for version in ("v1", "v2"):
            folder = make_fake_model(tmp_path / f"emb-{version}")
            await registry_a.install(InstallRequest(source=str(folder), name="emb", version=version))
        await registry_a.use("emb", "v1")
        await sync.start()
        slot = await manager.load("emb")
        assert slot.version == "v1"
        first_runner = slot.runner

        await registry_a.update("emb", {"parameters": {"normalize": True}})  # no reload needed
        await sync.sync()
        assert slot.runner is first_runner and slot.record.config["parameters"] == {"normalize": True}

        await registry_a.use("emb", "v2")  # the next load takes v2; the old worker goes
        await sync.sync()
        assert slot.runner is None
        assert (await manager.load("emb")).version == "v2"

        await registry_a.update("emb", {"max_batch_size": 3})  # the worker was started with it
        await sync.sync()
        assert slot.runner is None
        reloaded = await manager.load("emb")
        assert reloaded.scheduler is not None and reloaded.scheduler.limits.max_batch_size == 3

        copy = b.models_dir / "emb" / "v2"
        assert copy.is_dir()  # fetched from the store at the load
        await registry_a.uninstall("emb", force=True)
        await sync.sync()
        assert "emb" not in manager.slots
        assert not copy.exists() and not (b.models_dir / "emb").exists()
        assert sync.version == store_b.catalog_version() and sync.applied == 4  # since its start
    finally:
        await sync.stop()
        await manager.shutdown()
        store_a.close()
        store_b.close()


def test_several_replicas_refuse_results_that_only_one_can_read(settings: Settings) -> None:
    from modelmora.app import ModelMora

    data = str(settings.server.data_dir)
    redis_files = {"server": {"data_dir": data}, "jobs": {"backend": "redis"}}
    with pytest.raises(ConfigurationError, match="results are not shared"):
        ModelMora(load_settings(overrides=redis_files))
    shared = load_settings(overrides={**redis_files, "results": {"shared": True}})
    assert shared.results.is_shared
    ModelMora(shared)  # builds (starting would connect to Redis)
    assert load_settings(overrides={"results": {"backend": "s3"}}).results.is_shared
    shutil.rmtree(data, ignore_errors=True)
