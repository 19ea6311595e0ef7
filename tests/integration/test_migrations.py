"""Schema migrations: replicas starting together, databases made before migrations existed,
the `db` commands, and the head kept equal to the table definitions."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Connection, create_engine
from typer.testing import CliRunner

from modelmora import migrations
from modelmora.cli import app
from modelmora.config import Settings
from modelmora.jobs.sqlite_store import METADATA as JOBS_METADATA
from modelmora.jobs.sqlite_store import SqliteJobStore
from modelmora.jobs.store import JobRecord
from modelmora.registry.catalog import ModelVersion, TaskType
from modelmora.registry.store import METADATA as REGISTRY_METADATA
from modelmora.registry.store import RegistryStore
from tests.conftest import POSTGRES_ADMIN_URL

# -- the schemas as they were before migrations -----------------------------------------------
# Captured from `metadata.create_all` (registry) and the job store's script, as released; a
# database made by them must be recognised, stamped and upgraded without losing a row.

OLD_REGISTRY_DDL = {
    "sqlite": """
CREATE TABLE models (
    name VARCHAR(128) NOT NULL, model_id VARCHAR(256) NOT NULL, task_type VARCHAR(32) NOT NULL,
    active_version VARCHAR(128), display_name VARCHAR(256), description TEXT,
    config JSON NOT NULL, resource_requirements JSON NOT NULL, memory JSON NOT NULL,
    created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL,
    PRIMARY KEY (name)
);
CREATE INDEX ix_models_task_type ON models (task_type);
CREATE TABLE model_versions (
    id INTEGER NOT NULL, model_name VARCHAR(128) NOT NULL, version VARCHAR(128) NOT NULL,
    revision VARCHAR(128), origin TEXT NOT NULL, source_kind VARCHAR(16) NOT NULL,
    path TEXT NOT NULL, files JSON NOT NULL, size_bytes BIGINT NOT NULL,
    installed_at DATETIME NOT NULL,
    PRIMARY KEY (id), UNIQUE (model_name, version),
    FOREIGN KEY(model_name) REFERENCES models (name) ON DELETE CASCADE
);
CREATE INDEX ix_model_versions_model_name ON model_versions (model_name);
""",
    "postgresql": """
CREATE TABLE models (
    name VARCHAR(128) NOT NULL, model_id VARCHAR(256) NOT NULL, task_type VARCHAR(32) NOT NULL,
    active_version VARCHAR(128), display_name VARCHAR(256), description TEXT,
    config JSON NOT NULL, resource_requirements JSON NOT NULL, memory JSON NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL, updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
    PRIMARY KEY (name)
);
CREATE INDEX ix_models_task_type ON models (task_type);
CREATE TABLE model_versions (
    id SERIAL NOT NULL, model_name VARCHAR(128) NOT NULL, version VARCHAR(128) NOT NULL,
    revision VARCHAR(128), origin TEXT NOT NULL, source_kind VARCHAR(16) NOT NULL,
    path TEXT NOT NULL, files JSON NOT NULL, size_bytes BIGINT NOT NULL,
    installed_at TIMESTAMP WITH TIME ZONE NOT NULL,
    PRIMARY KEY (id), UNIQUE (model_name, version),
    FOREIGN KEY(model_name) REFERENCES models (name) ON DELETE CASCADE
);
CREATE INDEX ix_model_versions_model_name ON model_versions (model_name);
""",
}

OLD_REGISTRY_ROWS = [
    "INSERT INTO models (name, model_id, task_type, active_version, display_name, description, config, "
    "resource_requirements, memory, created_at, updated_at) VALUES ('legacy', 'org/legacy', 'txt2embed', "
    "'v2', 'Legacy', 'made before migrations', '{\"batch_size\": 4}', '{\"device\": \"cpu\"}', '{}', "
    "'2026-01-02 03:04:05', '2026-01-02 03:04:05')",
    "INSERT INTO model_versions (model_name, version, revision, origin, source_kind, path, files, "
    "size_bytes, installed_at) VALUES ('legacy', 'v1', NULL, 'file:///src/legacy', 'local', '/m/legacy/v1', "
    "'{\"model.safetensors\": \"ab\"}', 10, '2026-01-02 03:04:05')",
    "INSERT INTO model_versions (model_name, version, revision, origin, source_kind, path, files, "
    "size_bytes, installed_at) VALUES ('legacy', 'v2', NULL, 'file:///src/legacy', 'local', '/m/legacy/v2', "
    "'{\"model.safetensors\": \"cd\"}', 20, '2026-01-02 03:04:06')",
]

OLD_JOBS_SCRIPT = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    request BLOB NOT NULL,
    priority INTEGER NOT NULL,
    status TEXT NOT NULL,
    progress REAL,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error BLOB,
    response BLOB,
    result_key TEXT,
    idempotency_key TEXT UNIQUE,
    request_hash TEXT NOT NULL,
    trace_id TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (status, priority, created_at);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at);
"""

# -- PostgreSQL: a fresh database per use ------------------------------------------------------


@pytest.fixture
def pg_database(postgres_url: str) -> Iterator[Callable[[], str]]:
    """A factory of empty databases on the machine's PostgreSQL (`postgres_url` first, so
    this skips or fails as every PostgreSQL test does); each is dropped when done."""
    import psycopg

    admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True)
    base = postgres_url.rsplit("/", 1)[0]
    made: list[str] = []

    def database() -> str:
        name = f"modelmora_mig_{uuid.uuid4().hex[:10]}"
        admin.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return f"{base}/{name}"

    try:
        yield database
    finally:
        for name in made:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@contextmanager
def _connection(url: str) -> Iterator[Connection]:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            yield conn
    finally:
        engine.dispose()


# -- replicas starting together ----------------------------------------------------------------

# What each replica runs: the server's start-up path (ModelMora.start opens the registry with
# create_schema and then the job store), released by one file so that all three arrive at once.
_REPLICA = """
import asyncio, sys, time
from pathlib import Path
from modelmora.registry.store import RegistryStore
url, jobs, ready, go = sys.argv[1:5]
store = RegistryStore(url)
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.001)
store.create_schema()
store.close()
if jobs:
    from modelmora.jobs.sqlite_store import SqliteJobStore
    job_store = SqliteJobStore(Path(jobs))
    asyncio.run(job_store.open())
    asyncio.run(job_store.close())
"""


def _start_together(url: str, jobs: Path | None, gate: Path, replicas: int = 3) -> None:
    gate.mkdir(parents=True)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _REPLICA, url, str(jobs or ""), str(gate / f"ready{i}"), str(gate / "go")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(replicas)
    ]
    try:
        deadline = time.monotonic() + 120
        while not all((gate / f"ready{i}").exists() for i in range(replicas)):
            failed = [p for p in procs if p.poll() is not None]
            assert not failed, failed[0].communicate()[1]
            assert time.monotonic() < deadline, "the replicas never got ready"
            time.sleep(0.01)
        (gate / "go").touch()
        for p in procs:
            _, stderr = p.communicate(timeout=120)
            assert p.returncode == 0, stderr
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _assert_usable(url: str) -> None:
    assert migrations.current(url, migrations.REGISTRY) == migrations.head(migrations.REGISTRY)
    store = RegistryStore(url)
    try:
        store.add_version(name="m", model_id="org/m", task_type=TaskType.TXT2EMBED, version=_version("v1"))
        assert [r.name for r in store.list()[0]] == ["m"]
    finally:
        store.close()


@pytest.mark.postgres
def test_three_replicas_on_an_empty_postgres_database(pg_database: Callable[[], str], tmp_path: Path) -> None:
    for round_ in range(10):
        url = pg_database()
        _start_together(url, None, tmp_path / f"round{round_}")
        _assert_usable(url)
        with _connection(url) as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM alembic_version").scalar() == 1


def test_three_replicas_on_one_new_sqlite_file(tmp_path: Path) -> None:
    for round_ in range(10):
        folder = tmp_path / f"round{round_}"
        url = f"sqlite:///{folder / 'registry.db'}"
        _start_together(url, folder / "jobs.db", folder / "gate")
        _assert_usable(url)
        jobs_url = f"sqlite:///{folder / 'jobs.db'}"
        assert migrations.current(jobs_url, migrations.JOBS) == migrations.head(migrations.JOBS)


# -- databases made before migrations ----------------------------------------------------------


def _version(v: str) -> ModelVersion:
    return ModelVersion(
        version=v,
        revision=None,
        origin="file:///src/m",
        source_kind="local",
        path=f"/m/{v}",
        files={"model.safetensors": "ef"},
        size_bytes=30,
        installed_at=datetime.now(UTC),
    )


def _check_legacy_registry(url: str) -> None:
    assert migrations.current(url, migrations.REGISTRY) is None  # no history yet
    store = RegistryStore(url)
    try:
        store.create_schema()
        assert migrations.current(url, migrations.REGISTRY) == migrations.head(migrations.REGISTRY)
        record = store.get("legacy")
        assert record.model_id == "org/legacy"
        assert record.task_type is TaskType.TXT2EMBED
        assert record.active_version == "v2"
        assert (record.display_name, record.description) == ("Legacy", "made before migrations")
        assert record.config == {"batch_size": 4}
        assert record.resource_requirements == {"device": "cpu"}
        assert record.created_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        assert [(v.version, v.path, v.files, v.size_bytes) for v in record.versions] == [
            ("v1", "legacy/v1", {"model.safetensors": "ab"}, 10),  # relative since 0003
            ("v2", "legacy/v2", {"model.safetensors": "cd"}, 20),
        ]
        # and it takes writes: a new version, the old rows beside it
        store.add_version(
            name="legacy", model_id="org/legacy", task_type=TaskType.TXT2EMBED, version=_version("v3")
        )
        assert [v.version for v in store.get("legacy").versions] == ["v1", "v2", "v3"]
        store.create_schema()  # a restart: nothing to do
        assert len(store.get("legacy").versions) == 3
    finally:
        store.close()


def test_sqlite_registry_made_before_migrations_is_stamped_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_REGISTRY_DDL["sqlite"])
        for row in OLD_REGISTRY_ROWS:
            db.execute(row)
    _check_legacy_registry(f"sqlite:///{path}")


@pytest.mark.postgres
def test_postgres_registry_made_before_migrations_is_stamped_and_keeps_its_rows(
    pg_database: Callable[[], str],
) -> None:
    url = pg_database()
    with _connection(url) as conn:
        for statement in OLD_REGISTRY_DDL["postgresql"].split(";"):
            if statement.strip():
                conn.exec_driver_sql(statement)
        for row in OLD_REGISTRY_ROWS:
            conn.exec_driver_sql(
                row.replace("03:04:05'", "03:04:05+00'").replace("03:04:06'", "03:04:06+00'")
            )
    _check_legacy_registry(url)


def test_a_half_made_registry_is_refused_not_stamped(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_REGISTRY_DDL["sqlite"].split("CREATE TABLE model_versions")[0])
    with pytest.raises(RuntimeError, match="model_versions"):
        RegistryStore(f"sqlite:///{path}").create_schema()
    assert migrations.current(f"sqlite:///{path}", migrations.REGISTRY) is None


def _schema(path: Path) -> list[tuple[str, str, str | None]]:
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name != 'alembic_version' "
            "AND tbl_name != 'alembic_version' ORDER BY name"
        ).fetchall()


async def test_job_store_made_before_migrations_is_stamped_and_keeps_its_jobs(tmp_path: Path) -> None:
    old = tmp_path / "old" / "jobs.db"
    old.parent.mkdir()
    with sqlite3.connect(old) as db:
        db.executescript(OLD_JOBS_SCRIPT)
        db.execute(
            "INSERT INTO jobs (job_id, model, request, priority, status, created_at, completed_at, "
            "idempotency_key, request_hash, response, attempts) VALUES "
            "('j-done', 'm', ?, 2, 'completed', 100.0, 101.0, 'key-1', 'h1', ?, 1)",
            (b'{"input_data": {"texts": ["a"]}}', b'{"embeddings": [[1.0]]}'),
        )
        db.execute(
            "INSERT INTO jobs (job_id, model, request, priority, status, created_at, request_hash) "
            "VALUES ('j-queued', 'm', ?, 3, 'queued', 102.0, 'h2')",
            (b'{"input_data": {"texts": ["b"]}}',),
        )
    url = f"sqlite:///{old}"
    assert migrations.current(url, migrations.JOBS) is None

    store = SqliteJobStore(old)
    await store.open()
    try:
        done = await store.get("j-done")
        assert done is not None
        assert (done.status.value, done.priority, done.attempts) == ("completed", 2, 1)
        assert done.request == {"input_data": {"texts": ["a"]}}
        assert done.response == b'{"embeddings": [[1.0]]}'
        assert done.idempotency_key == "key-1"
        # Made with auth off (there was no auth then): the anonymous caller's, whose key
        # still names the job.
        assert done.owner == "anonymous"
        replay = JobRecord(
            job_id="j-new", model="m", request={}, priority=3, created_at=101.5,
            idempotency_key="key-1", request_hash="h1",
        )  # fmt: skip
        assert await store.create(replay, 100) == (done, False)
        queued = await store.get("j-queued")
        assert queued is not None and queued.status.value == "queued"
        assert await store.counts() == {
            "queued": 1, "processing": 0, "completed": 1, "failed": 0, "cancelled": 0,
        }  # fmt: skip
    finally:
        await store.close()
    assert migrations.current(url, migrations.JOBS) == migrations.head(migrations.JOBS)

    # A file made now has the very tables and indexes the old script made.
    new = tmp_path / "new" / "jobs.db"
    fresh = SqliteJobStore(new)
    await fresh.open()
    await fresh.close()
    assert _schema(new) == _schema(old)


# -- the head agrees with the table definitions ------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_registry_head_matches_the_models(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A table change without its revision fails here: `modelmora db revision` writes one."""
    url = (
        f"sqlite:///{tmp_path / 'r.db'}" if backend == "sqlite" else request.getfixturevalue("pg_database")()
    )
    migrations.upgrade(url, migrations.REGISTRY)
    assert migrations.schema_diff(url, REGISTRY_METADATA) == []


def test_job_store_head_matches_its_table(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    migrations.upgrade(url, migrations.JOBS)
    assert migrations.schema_diff(url, JOBS_METADATA) == []


async def test_job_owner_revision_scopes_keys_and_downgrades(tmp_path: Path) -> None:
    """0002: the same idempotency key under two owners is two jobs; going back to 0001 (one
    key space) keeps every job and leaves the key to the oldest."""
    from alembic import command

    path = tmp_path / "jobs.db"
    store = SqliteJobStore(path)
    await store.open()
    try:
        jobs = [
            JobRecord(
                job_id=f"j{i}", model="m", request={}, priority=3, created_at=100.0 + i,
                idempotency_key="same", request_hash="h", owner=owner,
            )
            for i, owner in enumerate(("k1", "k2"))
        ]  # fmt: skip
        for job in jobs:
            assert (await store.create(job, 100))[1] is True
    finally:
        await store.close()
    url = f"sqlite:///{path}"
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            command.downgrade(migrations.config(migrations.JOBS, conn), "0001")
    finally:
        engine.dispose()
    assert migrations.current(url, migrations.JOBS) == "0001"
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT job_id, idempotency_key FROM jobs ORDER BY job_id").fetchall()
    assert rows == [("j0", "same"), ("j1", None)]
    migrations.upgrade(url, migrations.JOBS)
    assert migrations.schema_diff(url, JOBS_METADATA) == []


def test_the_diff_sees_a_change_without_a_revision(tmp_path: Path) -> None:
    """The check above is not vacuous: a column added to the models alone is reported."""
    from sqlalchemy import Column, MetaData, String

    changed = MetaData()
    for table in REGISTRY_METADATA.tables.values():
        table.to_metadata(changed)
    changed.tables["models"].append_column(Column("owner", String(64)))
    url = f"sqlite:///{tmp_path / 'r.db'}"
    migrations.upgrade(url, migrations.REGISTRY)
    diff = migrations.schema_diff(url, changed)
    assert [(d[0], d[2], d[3].name) for d in diff] == [("add_column", "models", "owner")]


# -- the db commands ---------------------------------------------------------------------------


def test_db_current_and_upgrade_commands(settings: Settings) -> None:
    runner = CliRunner()
    data = settings.server.data_dir
    args = ["--data-dir", str(data), "db"]
    head = migrations.head(migrations.REGISTRY)

    result = runner.invoke(app, [*args, "current"])
    assert result.exit_code == 0, result.output
    assert f"registry: none (head is {head}" in result.output
    assert "jobs: none" in result.output
    assert not (data / "registry.db").exists()  # asking creates nothing

    # A registry made before migrations: upgrade stamps it and keeps its rows.
    data.mkdir(parents=True)
    with sqlite3.connect(data / "registry.db") as db:
        db.executescript(OLD_REGISTRY_DDL["sqlite"])
        for row in OLD_REGISTRY_ROWS:
            db.execute(row)
    result = runner.invoke(app, [*args, "upgrade"])
    assert result.exit_code == 0, result.output
    assert f"registry: upgraded no history -> {head}" in result.output
    assert f"jobs: upgraded no history -> {migrations.head(migrations.JOBS)}" in result.output

    result = runner.invoke(app, [*args, "current"])
    assert result.exit_code == 0, result.output
    assert f"registry: {head} (head)" in result.output
    assert f"jobs: {migrations.head(migrations.JOBS)} (head)" in result.output
    store = RegistryStore(settings.database_url)
    try:
        assert [v.version for v in store.get("legacy").versions] == ["v1", "v2"]
    finally:
        store.close()

    result = runner.invoke(app, [*args, "upgrade"])  # again: nothing to do
    assert result.exit_code == 0, result.output
    assert f"registry: at {head} (head)" in result.output


def test_db_commands_report_an_unreachable_database(settings: Settings, tmp_path: Path) -> None:
    config = tmp_path / "unreachable.yaml"
    config.write_text("registry:\n  database_url: postgresql+psycopg://nobody@127.0.0.1:1/none\n")
    for command in ("upgrade", "current"):
        result = CliRunner().invoke(app, ["--config", str(config), "db", command])
        assert result.exit_code == 1, result.output
        assert "error: registry (postgresql+psycopg://nobody@127.0.0.1:1/none)" in result.output
