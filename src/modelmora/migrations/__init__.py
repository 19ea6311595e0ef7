"""Schema migrations (Alembic) for the registry database and the SQLite job store.

Each database has its own script directory in this package (`registry/`, `jobs/`), configured
here in code, so no alembic.ini is read at run time. `upgrade` is what a server runs at start:

- Replicas may start together on one empty database, so the upgrade runs under a lock: a
  PostgreSQL advisory lock taken in the migrating transaction (released by its commit), or a
  `flock` on `<file>.lock` for SQLite. The second replica waits, then finds the head and does
  nothing. A PostgreSQL database already at head is recognised without taking the lock.
- The whole upgrade is one transaction: PostgreSQL has transactional DDL, and SQLite gets it
  here by issuing `BEGIN IMMEDIATE` itself (pysqlite would otherwise commit before each DDL).
- A database made before migrations existed (by `metadata.create_all`: the tables, no
  `alembic_version`) is stamped with the baseline revision, then upgraded.

This module imports nothing of the project: the stores call it, and the table definitions a
new revision is generated against are handed in by the caller (`new_revision`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, MetaData, create_engine, event, inspect, make_url, text
from sqlalchemy.pool import NullPool

log = logging.getLogger("modelmora.migrations")
# Alembic says "Context impl ..." and "Will assume ... DDL" each time a database is looked at,
# i.e. at every start; what changed is logged here instead, once.
logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)

_HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Database:
    """One migrated database kind: its script directory and what its baseline created."""

    name: str
    baseline: str
    baseline_tables: frozenset[str]
    # PostgreSQL advisory lock key (advisory locks are per database, so a constant suffices).
    lock_key: int

    @property
    def script_location(self) -> Path:
        return _HERE / self.name


REGISTRY = Database("registry", "0001", frozenset({"models", "model_versions"}), 0x6D6D5F7265670001)
JOBS = Database("jobs", "0001", frozenset({"jobs"}), 0x6D6D5F6A6F620001)


def config(db: Database, connection: Connection | None = None, metadata: MetaData | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(db.script_location))
    # Revision files are modules of this package: v<rev>_<slug>.py, a valid module name.
    cfg.set_main_option("file_template", "v%%(rev)s_%%(slug)s")
    cfg.attributes["connection"] = connection
    cfg.attributes["target_metadata"] = metadata
    return cfg


def head(db: Database) -> str:
    heads = ScriptDirectory.from_config(config(db)).get_heads()
    if len(heads) != 1:  # two revisions written on two branches with the same parent
        raise RuntimeError(f"{db.name} migrations have {len(heads)} heads {heads}: merge them")
    return heads[0]


def _engine(url: str) -> Engine:
    if make_url(url).get_backend_name() != "sqlite":
        return create_engine(url, poolclass=NullPool)
    engine = create_engine(url, poolclass=NullPool, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_conn: Any, _record: Any) -> None:
        # Both stores run SQLite in WAL mode and say so on every connection; a file still in
        # rollback mode makes two such connections deadlock on the switch ("database is
        # locked" at once, whatever the busy timeout). The first migration, under the file
        # lock, switches a new file before anyone else opens it.
        dbapi_conn.execute("PRAGMA journal_mode=WAL")
        dbapi_conn.isolation_level = None  # we say BEGIN ourselves, so DDL is transactional

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # An upgrade takes the write lock up front, so it never acts on a stale read.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("immediate") else "BEGIN")

    return engine


def _sqlite_file(url: str) -> Path | None:
    database = make_url(url).database
    if make_url(url).get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    return Path(database)


def _revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


@contextlib.contextmanager
def _file_lock(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def current(url: str, db: Database) -> str | None:
    """The revision the database is at; None for a database not created yet (an SQLite file
    is not created by asking) or one made before migrations existed."""
    file = _sqlite_file(url)
    if file is not None and not file.exists():
        return None
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return _revision(conn)
    finally:
        engine.dispose()


def upgrade(url: str, db: Database, revision: str = "head") -> str:
    """Bring the database to `revision` (the latest by default) under the lock; returns the
    revision it is at afterwards."""
    target = head(db) if revision == "head" else revision
    file = _sqlite_file(url)
    engine = _engine(url)
    try:
        # SQLite: every look at the file is under the file lock (it is cheap, and nobody
        # opens a new file before it is in WAL mode); PostgreSQL: no lock for the look.
        with _file_lock(file):
            with engine.connect() as conn:
                if _revision(conn) == target:  # the usual restart: no write, no wait
                    return target
            with engine.connect().execution_options(immediate=True) as conn, conn.begin():
                if engine.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": db.lock_key})
                before = _revision(conn)
                if before is None:
                    _stamp_if_premigration(conn, db)
                command.upgrade(config(db, conn), target)
                after = _revision(conn)
        if after != before:
            log.info("database schema upgraded", extra={"database": db.name, "from": before, "to": after})
        return after or target
    finally:
        engine.dispose()


def _stamp_if_premigration(conn: Connection, db: Database) -> None:
    tables = set(inspect(conn).get_table_names()) & db.baseline_tables
    if not tables:
        return  # an empty database: the baseline creates everything
    if tables != db.baseline_tables:
        raise RuntimeError(
            f"the {db.name} database has tables {sorted(tables)} but not "
            f"{sorted(db.baseline_tables - tables)} and no migration history: repair it by hand"
        )
    MigrationContext.configure(conn).stamp(ScriptDirectory.from_config(config(db)), db.baseline)
    log.info("stamped a database made before migrations", extra={"database": db.name, "as": db.baseline})


def new_revision(db: Database, message: str, metadata: MetaData, *, autogenerate: bool = True) -> Path:
    """Write the next revision file (for developers, into this package's source tree): with
    `autogenerate`, its operations are the difference between `metadata` and the schema at
    the current head, computed on a scratch SQLite database. Review the file before commit."""
    rev_id = f"{int(head(db)) + 1:04d}"
    with tempfile.TemporaryDirectory() as scratch:
        url = f"sqlite:///{Path(scratch) / 'scratch.db'}"
        upgrade(url, db)
        engine = _engine(url)
        try:
            with engine.begin() as conn:
                script = command.revision(
                    config(db, conn, metadata), message, autogenerate=autogenerate, rev_id=rev_id
                )
        finally:
            engine.dispose()
    if script is None or isinstance(script, list):
        raise RuntimeError(f"alembic wrote no single revision for {db.name}")
    return Path(script.path)


def schema_diff(url: str, metadata: MetaData) -> list[Any]:
    """What `metadata` has that the database lacks, or the reverse (empty: they agree)."""
    from alembic.autogenerate import compare_metadata

    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return list(
                compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
            )
    finally:
        engine.dispose()
