"""The registry database: SQLite file by default, PostgreSQL by URL, same SQLAlchemy code.

The server and the CLI may both write (a CLI `install` while the server runs), so SQLite runs
in WAL mode with a busy timeout, and every change is one short transaction.

The schema is Alembic's (modelmora/migrations/registry): a change to the tables below is a new
revision there (`modelmora db revision`), which a test compares with these definitions.

Replicas share this database (issue 15). Two rules make that work:

- Version paths are stored relative to this node's roots (`registry/paths.py`), and turned
  back into this node's absolute paths when read: `ModelVersion.path` is always local.
- Every catalog write (install, update, use, uninstall) bumps the catalog version and
  records what changed in `catalog_changes`, in the write's own transaction, so a write made
  by the CLI counts like one made by a server. On PostgreSQL the transaction also sends a
  NOTIFY on `CATALOG_CHANNEL`, delivered at commit; replicas listen, and poll the version as
  the safety net (`services/catalog_sync.py`). Writers take the version from a one-row
  counter, so versions become visible in order: a reader that has seen version n has seen
  every version before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from modelmora import migrations
from modelmora.contracts.tasks import TaskType
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry.catalog import ModelRecord, ModelVersion
from modelmora.registry.paths import PathRoots, to_local, to_stored

# PostgreSQL NOTIFY channel of catalog changes (the payload is the new catalog version).
CATALOG_CHANNEL = "modelmora_catalog"
# Changes kept in `catalog_changes`; a replica further behind than this reconciles everything.
CHANGES_KEPT = 1000


class _Base(DeclarativeBase):
    pass


def _now() -> datetime:
    return datetime.now(UTC)


class _Model(_Base):
    __tablename__ = "models"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    model_id: Mapped[str] = mapped_column(String(256))
    task_type: Mapped[str] = mapped_column(String(32), index=True)
    active_version: Mapped[str | None] = mapped_column(String(128))
    display_name: Mapped[str | None] = mapped_column(String(256))
    description: Mapped[str | None] = mapped_column(Text)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    resource_requirements: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    memory: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)
    versions: Mapped[list[_Version]] = relationship(
        back_populates="model", cascade="all, delete-orphan", order_by="_Version.installed_at"
    )


class _Version(_Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_name", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(ForeignKey("models.name", ondelete="CASCADE"), index=True)
    version: Mapped[str] = mapped_column(String(128))
    revision: Mapped[str | None] = mapped_column(String(128))
    origin: Mapped[str] = mapped_column(Text)
    source_kind: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    files: Mapped[dict[str, str]] = mapped_column(JSON)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    installed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    model: Mapped[_Model] = relationship(back_populates="versions")


class ApiKeyRow(_Base):
    """An API key (auth/store.py): only the SHA-256 digest of its token is kept. In the
    registry database so that the CLI manages keys without a server and replicas share them."""

    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    digest: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[str] = mapped_column(String(128))  # comma-separated Scope values
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class _CatalogState(_Base):
    """One row (id 1): the catalog version, bumped by every catalog write."""

    __tablename__ = "catalog_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(BigInteger)


class _CatalogChange(_Base):
    """What each catalog version changed (the last CHANGES_KEPT of them)."""

    __tablename__ = "catalog_changes"

    version: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(16))  # installed | updated | activated | uninstalled
    model: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(128))
    # uninstalled: {"versions": [{"version", "source_kind", "path" (as stored)}]}, so that each
    # replica can remove its own copies once the rows are gone.
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


@dataclass(frozen=True)
class CatalogChangeRow:
    version: int
    kind: str
    model: str
    model_version: str | None
    details: dict[str, Any]


# The tables as the code expects them; migrations/registry must produce the same.
METADATA = _Base.metadata


def _aware(value: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes even for timezone=True columns; everything we store is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _to_record(row: _Model, roots: PathRoots | None = None) -> ModelRecord:
    return ModelRecord(
        name=row.name,
        model_id=row.model_id,
        task_type=TaskType(row.task_type),
        active_version=row.active_version,
        versions=[
            ModelVersion(
                version=v.version,
                revision=v.revision,
                origin=v.origin,
                source_kind=v.source_kind,
                path=to_local(roots, v.source_kind, v.path),
                files=dict(v.files),
                size_bytes=v.size_bytes,
                installed_at=_aware(v.installed_at) or _now(),
            )
            for v in row.versions
        ],
        display_name=row.display_name,
        description=row.description,
        config=dict(row.config or {}),
        resource_requirements=dict(row.resource_requirements or {}),
        memory=dict(row.memory or {}),
        created_at=_aware(row.created_at),
        updated_at=_aware(row.updated_at),
    )


def _not_found(name: str) -> ModelMoraError:
    return ModelMoraError(ErrorCode.MODEL_NOT_FOUND, f"model {name!r} is not registered", {"model": name})


class RegistryStore:
    """CRUD over the catalog; returns plain `ModelRecord`s, never ORM objects."""

    def __init__(self, url: str, roots: PathRoots | None = None) -> None:
        """`roots`: this node's model and Hub cache folders (paths are stored relative to
        them); None keeps paths as given (tests that build a store of their own)."""
        self.url = url
        self.roots = roots
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"))
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_schema(self) -> None:
        """Create the schema or upgrade it to the latest revision; safe when several processes
        start on one database at once (see modelmora.migrations)."""
        migrations.upgrade(self.url, migrations.REGISTRY)

    def drop_schema(self) -> None:
        """Drop the tables and the migration history (tests start again from nothing)."""
        METADATA.drop_all(self.engine)
        with self.engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS alembic_version"))

    def close(self) -> None:
        self.engine.dispose()

    def _record(self, row: _Model) -> ModelRecord:
        return _to_record(row, self.roots)

    # -- the catalog version (see the module docstring) ----------------------------------------

    def _bump(
        self,
        s: Session,
        kind: str,
        model: str,
        model_version: str | None,
        details: dict[str, Any] | None = None,
    ) -> int:
        """Next catalog version and its change row, in the caller's transaction. The counter
        row's lock is held to the commit, so concurrent writers get versions in commit order."""
        s.flush()
        version = s.scalar(
            update(_CatalogState)
            .where(_CatalogState.id == 1)
            .values(version=_CatalogState.version + 1)
            .returning(_CatalogState.version)
        )
        if version is None:  # the migration adds the row; a database without it starts now
            version = 1
            s.add(_CatalogState(id=1, version=version))
        s.add(
            _CatalogChange(
                version=version, kind=kind, model=model, model_version=model_version, details=details or {}
            )
        )
        s.execute(delete(_CatalogChange).where(_CatalogChange.version <= version - CHANGES_KEPT))
        if self.engine.dialect.name == "postgresql":
            s.execute(
                text("SELECT pg_notify(:channel, :payload)"),
                {"channel": CATALOG_CHANNEL, "payload": str(version)},
            )
        return int(version)

    def catalog_version(self) -> int:
        """The version of the last committed catalog write (0: none yet)."""
        with self._session() as s:
            return int(s.scalar(select(_CatalogState.version).where(_CatalogState.id == 1)) or 0)

    def changes_since(self, version: int) -> tuple[list[CatalogChangeRow], int] | None:
        """The changes after `version`, oldest first, and the catalog version they lead to;
        None when some of them are no longer kept (the caller reconciles everything)."""
        with self._session() as s:
            current = int(s.scalar(select(_CatalogState.version).where(_CatalogState.id == 1)) or 0)
            if current <= version:
                return [], max(current, version)
            rows = list(
                s.scalars(
                    select(_CatalogChange)
                    .where(_CatalogChange.version > version, _CatalogChange.version <= current)
                    .order_by(_CatalogChange.version)
                )
            )
            if len(rows) != current - version:
                return None
            return [
                CatalogChangeRow(r.version, r.kind, r.model, r.model_version, dict(r.details or {}))
                for r in rows
            ], current

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def _load(self, session: Session, name: str) -> _Model:
        row = session.get(_Model, name)
        if row is None:
            raise _not_found(name)
        return row

    def find(self, name: str) -> ModelRecord | None:
        with self._session() as s:
            row = s.get(_Model, name)
            return self._record(row) if row is not None else None

    def get(self, name: str) -> ModelRecord:
        record = self.find(name)
        if record is None:
            raise _not_found(name)
        return record

    def list(
        self, task_type: str | None = None, page: int = 1, page_size: int = 50
    ) -> tuple[list[ModelRecord], int]:
        with self._session() as s:
            query = select(_Model)
            count = select(func.count()).select_from(_Model)
            if task_type:
                query = query.where(_Model.task_type == task_type)
                count = count.where(_Model.task_type == task_type)
            total = int(s.scalar(count) or 0)
            rows = s.scalars(query.order_by(_Model.name).offset((page - 1) * page_size).limit(page_size))
            return [self._record(r) for r in rows], total

    def add_version(
        self,
        *,
        name: str,
        model_id: str,
        task_type: TaskType,
        version: ModelVersion,
        activate: bool = True,
        display_name: str | None = None,
        description: str | None = None,
        config: dict[str, Any] | None = None,
        resource_requirements: dict[str, Any] | None = None,
    ) -> ModelRecord:
        """Register a model, or add a version to an existing one (same task type only)."""
        try:
            with self._session() as s:
                row = s.get(_Model, name)
                if row is None:
                    row = _Model(
                        name=name,
                        model_id=model_id,
                        task_type=task_type.value,
                        display_name=display_name,
                        description=description,
                        config=config or {},
                        resource_requirements=resource_requirements or {},
                        memory={},
                    )
                    s.add(row)
                else:
                    if any(v.version == version.version for v in row.versions):
                        raise ModelMoraError(
                            ErrorCode.MODEL_EXISTS,
                            f"model {name!r} already has version {version.version!r}",
                            {"model": name, "version": version.version},
                        )
                    if row.task_type != task_type.value:
                        raise ModelMoraError(
                            ErrorCode.MODEL_EXISTS,
                            f"model {name!r} exists with task {row.task_type}, not {task_type.value}",
                            {"model": name, "task_type": row.task_type},
                        )
                row.versions.append(
                    _Version(
                        version=version.version,
                        revision=version.revision,
                        origin=version.origin,
                        source_kind=version.source_kind,
                        path=to_stored(self.roots, version.source_kind, version.path),
                        files=version.files,
                        size_bytes=version.size_bytes,
                        installed_at=version.installed_at,
                    )
                )
                if activate or row.active_version is None:
                    row.active_version = version.version
                row.updated_at = _now()
                s.flush()
                self._bump(s, "installed", name, version.version)
                return self._record(row)
        except IntegrityError as exc:  # a concurrent install of the same name won the race
            raise ModelMoraError(
                ErrorCode.MODEL_EXISTS, f"model {name!r} was registered concurrently", {"model": name}
            ) from exc

    def update(self, name: str, changes: dict[str, Any]) -> ModelRecord:
        """Apply top-level fields (display_name, description, resource_requirements) and
        per-model config keys; a None value removes a config key."""
        with self._session() as s:
            row = self._load(s, name)
            config = dict(row.config or {})
            for key, value in changes.items():
                if key in ("display_name", "description"):
                    setattr(row, key, value)
                elif key == "resource_requirements":
                    row.resource_requirements = dict(value or {})
                elif value is None:
                    config.pop(key, None)
                else:
                    config[key] = value
            row.config = config
            row.updated_at = _now()
            s.flush()
            self._bump(s, "updated", name, None)
            return self._record(row)

    def set_active(self, name: str, version: str) -> ModelRecord:
        with self._session() as s:
            row = self._load(s, name)
            if not any(v.version == version for v in row.versions):
                raise ModelMoraError(
                    ErrorCode.MODEL_NOT_FOUND,
                    f"model {name!r} has no version {version!r}",
                    {"model": name, "version": version, "installed": [v.version for v in row.versions]},
                )
            row.active_version = version
            row.updated_at = _now()
            s.flush()
            self._bump(s, "activated", name, version)
            return self._record(row)

    def set_memory(self, name: str, memory: dict[str, Any]) -> None:
        with self._session() as s:
            row = s.get(_Model, name)
            if row is not None:
                row.memory = memory

    def delete(self, name: str, version: str | None = None) -> ModelRecord:
        """Delete a model (or one version of it); returns what was deleted so the caller can
        remove the files."""
        with self._session() as s:
            row = self._load(s, name)
            before = self._record(row)
            if version is None:
                self._bump(s, "uninstalled", name, None, _gone(row.versions))
                s.delete(row)
                return before
            match = [v for v in row.versions if v.version == version]
            if not match:
                raise ModelMoraError(
                    ErrorCode.MODEL_NOT_FOUND, f"model {name!r} has no version {version!r}", {"model": name}
                )
            self._bump(s, "uninstalled", name, version, _gone(match))
            row.versions.remove(match[0])
            if not row.versions:
                s.delete(row)
            elif row.active_version == version:
                row.active_version = row.versions[-1].version
            before.versions = [v for v in before.versions if v.version == version]
            return before


def _gone(versions: list[_Version]) -> dict[str, Any]:
    return {
        "versions": [{"version": v.version, "source_kind": v.source_kind, "path": v.path} for v in versions]
    }


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
