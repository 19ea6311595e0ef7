"""The registry store on a real SQLite file and on the machine's PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from modelmora.contracts.tasks import TaskType
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry.catalog import ModelVersion
from modelmora.registry.store import RegistryStore


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RegistryStore]:
    url = (
        f"sqlite:///{tmp_path / 'reg.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    s = RegistryStore(url)
    s.drop_schema()
    s.create_schema()
    yield s
    s.drop_schema()
    s.close()


def _version(v: str, files: dict[str, str] | None = None) -> ModelVersion:
    return ModelVersion(
        version=v,
        revision="a" * 40,
        origin="hf://org/m",
        source_kind="hub",
        path=f"/models/m/{v}",
        files=files or {"model.safetensors": "0" * 64},
        size_bytes=1234,
        installed_at=datetime.now(UTC),
    )


def test_register_get_and_versions(store: RegistryStore) -> None:
    rec = store.add_version(name="m", model_id="org/m", task_type=TaskType.TXT2EMBED, version=_version("v1"))
    assert rec.active_version == "v1" and rec.model_id == "org/m"
    rec = store.add_version(name="m", model_id="org/m", task_type=TaskType.TXT2EMBED, version=_version("v2"))
    assert rec.active_version == "v2"
    assert [v.version for v in rec.versions] == ["v1", "v2"]
    assert store.get("m").version("v1").files == {"model.safetensors": "0" * 64}
    assert store.get("m").versions[0].installed_at.tzinfo is not None
    assert store.set_active("m", "v1").active_version == "v1"
    with pytest.raises(ModelMoraError) as exc:
        store.set_active("m", "v9")
    assert exc.value.code is ErrorCode.MODEL_NOT_FOUND


def test_same_version_twice_and_task_conflict(store: RegistryStore) -> None:
    store.add_version(name="m", model_id="org/m", task_type=TaskType.TXT2EMBED, version=_version("v1"))
    for task, version in ((TaskType.TXT2EMBED, "v1"), (TaskType.TXT2TXT, "v2")):
        with pytest.raises(ModelMoraError) as exc:
            store.add_version(name="m", model_id="org/m", task_type=task, version=_version(version))
        assert exc.value.code is ErrorCode.MODEL_EXISTS
    assert [v.version for v in store.get("m").versions] == ["v1"]


def test_list_filter_and_pages(store: RegistryStore) -> None:
    for i in range(5):
        task = TaskType.TXT2EMBED if i % 2 == 0 else TaskType.TXT2TXT
        store.add_version(name=f"m{i}", model_id=f"org/m{i}", task_type=task, version=_version("v1"))
    page, total = store.list(None, page=2, page_size=2)
    assert total == 5 and [r.name for r in page] == ["m2", "m3"]
    embed, total = store.list("txt2embed")
    assert total == 3 and {r.name for r in embed} == {"m0", "m2", "m4"}


def test_update_and_delete(store: RegistryStore) -> None:
    store.add_version(name="m", model_id="org/m", task_type=TaskType.TXT2EMBED, version=_version("v1"))
    store.add_version(name="m", model_id="org/m", task_type=TaskType.TXT2EMBED, version=_version("v2"))
    rec = store.update("m", {"max_batch_size": 8, "display_name": "M", "device": "cpu"})
    assert rec.config == {"max_batch_size": 8, "device": "cpu"} and rec.display_name == "M"
    assert store.update("m", {"device": None}).config == {"max_batch_size": 8}
    store.set_memory("m", {"rss_bytes": 10})
    assert store.get("m").memory == {"rss_bytes": 10}
    deleted = store.delete("m", "v2")
    assert [v.version for v in deleted.versions] == ["v2"]
    assert store.get("m").active_version == "v1"
    store.delete("m")
    assert store.find("m") is None
    with pytest.raises(ModelMoraError) as exc:
        store.get("m")
    assert exc.value.code is ErrorCode.MODEL_NOT_FOUND


def test_two_store_instances_see_each_other(store: RegistryStore) -> None:
    """The CLI and the server are two processes on one database."""
    other = RegistryStore(store.url)
    try:
        other.add_version(name="x", model_id="x", task_type=TaskType.TXT2EMBED, version=_version("v1"))
        assert store.get("x").active_version == "v1"
    finally:
        other.close()
