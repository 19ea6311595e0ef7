"""API keys in the registry database (SQLite file and PostgreSQL): only digests stored,
revocation and expiry, the Authenticator reading them, and the `--expires` notation."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from modelmora.auth.authenticator import Authenticator
from modelmora.auth.keys import Scope, digest
from modelmora.auth.store import KeyStore
from modelmora.cli.keys_cmds import parse_expiry
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry.store import RegistryStore


class Now:
    def __init__(self) -> None:
        self.t = datetime(2026, 12, 1, 12, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.t


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RegistryStore]:
    url = (
        f"sqlite:///{tmp_path / 'registry.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    store = RegistryStore(url)
    store.create_schema()
    yield store
    store.close()


def test_only_the_digest_is_stored_and_the_token_authenticates(registry: RegistryStore) -> None:
    keys = KeyStore(registry.engine)
    created = keys.create("search-api", ["infer"])
    assert created.token.startswith(f"mm_{created.record.key_id}_")
    with registry.engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM api_keys WHERE key_id = :k"), {"k": created.record.key_id})
        stored = [str(v) for v in rows.one()]
    assert not any(created.token in value or created.token.split("_")[2] in value for value in stored)
    assert digest(created.token) in stored
    record = keys.get(created.record.key_id)
    assert record is not None and record.scopes == {Scope.INFER} and record.name == "search-api"
    assert keys.get("000000000000") is None
    auth = Authenticator(lookup=keys.get, cache_seconds=0)
    principal = asyncio.run(auth.authenticate(f"Bearer {created.token}"))
    assert principal.key_id == created.record.key_id and not principal.is_admin


def test_revocation_and_expiry(registry: RegistryStore) -> None:
    now = Now()
    keys = KeyStore(registry.engine, now=now)
    before = keys.count_usable()
    short = keys.create("short", "infer", expires_at=now.t + timedelta(hours=1))
    revoked = keys.create("gone", "admin")
    assert keys.count_usable() == before + 2
    first = keys.revoke(revoked.record.key_id).revoked_at
    now.t += timedelta(minutes=5)
    assert keys.revoke(revoked.record.key_id).revoked_at == first  # idempotent
    now.t += timedelta(hours=1)
    assert keys.count_usable() == before  # one revoked, one expired
    auth = Authenticator(lookup=keys.get, cache_seconds=0, now=now)
    for token, why in ((short.token, "expired"), (revoked.token, "revoked")):
        with pytest.raises(ModelMoraError) as err:
            asyncio.run(auth.authenticate(f"Bearer {token}"))
        assert err.value.code is ErrorCode.UNAUTHORIZED and why in err.value.message
    with pytest.raises(ModelMoraError) as missing:
        keys.revoke("ffffffffffff")
    assert missing.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(ModelMoraError, match="past"):
        keys.create("late", "infer", expires_at=now.t - timedelta(seconds=1))


def test_last_use_is_recorded_at_most_once_a_minute(registry: RegistryStore) -> None:
    now = Now()
    keys = KeyStore(registry.engine, now=now)
    created = keys.create("busy", "infer")

    def last_used() -> datetime | None:
        return next(k.last_used_at for k in keys.list() if k.record.key_id == created.record.key_id)

    assert last_used() is None
    keys.get(created.record.key_id)
    assert last_used() == now.t
    first = now.t
    now.t += timedelta(seconds=30)
    keys.get(created.record.key_id)
    assert last_used() == first
    now.t += timedelta(seconds=31)
    keys.get(created.record.key_id)
    assert last_used() == now.t


def test_expiry_notation() -> None:
    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    assert parse_expiry("30d", now) == now + timedelta(days=30)
    assert parse_expiry("12h", now) == now + timedelta(hours=12)
    assert parse_expiry("2w", now) == now + timedelta(weeks=2)
    assert parse_expiry("2027-01-31", now) == datetime(2027, 1, 31, tzinfo=UTC)
    assert parse_expiry("2027-01-31T10:00:00+02:00", now) == datetime(2027, 1, 31, 8, tzinfo=UTC)
    for bad in ("soon", "0d", "30x"):
        with pytest.raises(ValueError):
            parse_expiry(bad, now)
