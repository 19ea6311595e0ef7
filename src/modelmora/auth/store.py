"""API keys in the registry database: created, listed, revoked, and looked up per key id.

The token is returned once by `create` and never stored: only its SHA-256 digest is (see
auth/keys.py for why a fast digest suffices). The Authenticator calls `get` on a cache miss, at
most once per key per `auth.cache_seconds` on each replica; that look-up also records when the
key was last used, at most once a minute, so a busy key does not turn reads into writes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import sessionmaker

from modelmora.auth.keys import KeyRecord, Scope, new_token, parse_scopes
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry.store import ApiKeyRow

_TOUCH_EVERY = timedelta(minutes=1)
MAX_NAME_CHARS = 128


@dataclass(frozen=True, slots=True)
class StoredKey:
    """What `keys list` shows: the record (no secret) and when it last authenticated."""

    record: KeyRecord
    last_used_at: datetime | None


@dataclass(frozen=True, slots=True)
class CreatedKey:
    record: KeyRecord
    token: str  # shown to the operator once; not recoverable afterwards


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes even for timezone=True columns; all we store is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _record(row: ApiKeyRow) -> KeyRecord:
    return KeyRecord(
        key_id=row.key_id,
        name=row.name,
        digest=row.digest,
        scopes=parse_scopes(row.scopes),
        created_at=_aware(row.created_at) or datetime.now(UTC),
        expires_at=_aware(row.expires_at),
        revoked_at=_aware(row.revoked_at),
    )


class KeyStore:
    """The `api_keys` table, on the registry store's engine (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._now = now

    def create(
        self, name: str, scopes: frozenset[Scope] | list[str] | str, expires_at: datetime | None = None
    ) -> CreatedKey:
        name = name.strip()
        if not name or len(name) > MAX_NAME_CHARS:
            raise ModelMoraError(
                ErrorCode.VALIDATION_ERROR, f"a key name has 1 to {MAX_NAME_CHARS} characters"
            )
        granted = scopes if isinstance(scopes, frozenset) else parse_scopes(scopes)
        now = self._now()
        if expires_at is not None:
            expires_at = expires_at if expires_at.tzinfo else expires_at.replace(tzinfo=UTC)
            if expires_at <= now:
                raise ModelMoraError(ErrorCode.VALIDATION_ERROR, "the expiry is in the past")
        token = new_token()
        row = ApiKeyRow(
            key_id=token.key_id,
            name=name,
            digest=token.digest,
            scopes=",".join(sorted(s.value for s in granted)),
            created_at=now,
            expires_at=expires_at,
        )
        with self._sessions.begin() as session:
            session.add(row)
        return CreatedKey(_record(row), token.token)

    def get(self, key_id: str) -> KeyRecord | None:
        """The Authenticator's look-up (run in a thread by it)."""
        with self._sessions.begin() as session:
            row = session.get(ApiKeyRow, key_id)
            if row is None:
                return None
            record = _record(row)
            now = self._now()
            last = _aware(row.last_used_at)
            if record.usable_at(now) and (last is None or now - last > _TOUCH_EVERY):
                session.execute(update(ApiKeyRow).where(ApiKeyRow.key_id == key_id).values(last_used_at=now))
            return record

    def list(self) -> list[StoredKey]:
        with self._sessions.begin() as session:
            rows = session.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at, ApiKeyRow.key_id))
            return [StoredKey(_record(r), _aware(r.last_used_at)) for r in rows]

    def revoke(self, key_id: str) -> KeyRecord:
        """Revoke now (idempotent: a revoked key keeps its first revocation time)."""
        with self._sessions.begin() as session:
            row = session.get(ApiKeyRow, key_id)
            if row is None:
                raise ModelMoraError(
                    ErrorCode.NOT_FOUND, f"no API key {key_id!r} (see `modelmora keys list`)", {"key": key_id}
                )
            if row.revoked_at is None:
                row.revoked_at = self._now()
            return _record(row)

    def count_usable(self) -> int:
        """Keys that authenticate now (not revoked, not expired): logged at start."""
        now = self._now()
        with self._sessions.begin() as session:
            query = (
                select(func.count())
                .select_from(ApiKeyRow)
                .where(ApiKeyRow.revoked_at.is_(None))
                .where((ApiKeyRow.expires_at.is_(None)) | (ApiKeyRow.expires_at > now))
            )
            return int(session.scalar(query) or 0)
