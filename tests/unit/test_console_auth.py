"""Console session cookies (api/console_auth.py): signed, shared by replicas with one secret,
expiring, never longer than the key, CSRF-checked for calls that change state."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from modelmora.api.console_auth import COOKIE, ConsoleSessions, Session
from modelmora.auth.authenticator import Authenticator
from modelmora.auth.keys import KeyRecord, Scope, new_token
from modelmora.errors import ErrorCode, ModelMoraError

NOW = 2_000_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def make(secret: bytes, records: dict[str, KeyRecord], clock: Clock) -> ConsoleSessions:
    auth = Authenticator(lookup=records.get, cache_seconds=0)
    return ConsoleSessions(auth, secret, lifetime=3600, lookup=records.get, cache_seconds=0, clock=clock)


def key(scope: Scope, expires_at: datetime | None = None) -> tuple[str, KeyRecord]:
    token = new_token()
    record = KeyRecord(
        token.key_id, f"{scope.value}-key", token.digest, frozenset({scope}), datetime.now(UTC), expires_at
    )
    return token.token, record


def cookie_headers(value: str, csrf: str | None = None) -> dict[bytes, bytes]:
    headers = {b"cookie": f"other=1; {COOKIE}={value}".encode()}
    if csrf is not None:
        headers[b"x-csrf-token"] = csrf.encode()
    return headers


def test_replicas_sharing_the_secret_accept_each_others_sessions() -> None:
    token, record = key(Scope.ADMIN)
    records = {record.key_id: record}
    clock = Clock()
    one, two = make(b"s" * 32, records, clock), make(b"s" * 32, records, clock)
    other = make(b"t" * 32, records, clock)
    session = asyncio.run(one.login(token))
    value = one.encode(session)
    assert two.decode(value) == session
    assert other.decode(value) is None  # another secret
    assert one.decode(value[:-2] + "xx") is None  # tampered
    assert one.decode("garbage") is None and one.decode("a.b.c") is None
    clock.now += 3601
    assert one.decode(value) is None  # expired


def test_a_session_never_outlives_its_key() -> None:
    soon = datetime.now(UTC) + timedelta(minutes=10)
    token, record = key(Scope.INFER, expires_at=soon)
    sessions = make(b"s" * 32, {record.key_id: record}, Clock())
    session = asyncio.run(sessions.login(token))
    assert session.expires == pytest.approx(soon.timestamp())


def test_state_changing_calls_need_the_csrf_token() -> None:
    token, record = key(Scope.ADMIN)
    sessions = make(b"s" * 32, {record.key_id: record}, Clock())
    session = asyncio.run(sessions.login(token))
    value = sessions.encode(session)
    principal = asyncio.run(sessions.principal(cookie_headers(value), "GET"))
    assert principal is not None and principal.key_id == record.key_id and principal.is_admin
    for csrf in (None, "wrong"):
        with pytest.raises(ModelMoraError) as refused:
            asyncio.run(sessions.principal(cookie_headers(value, csrf), "POST"))
        assert refused.value.code is ErrorCode.FORBIDDEN
    assert asyncio.run(sessions.principal(cookie_headers(value, session.csrf), "POST")) == principal
    assert asyncio.run(sessions.principal({}, "GET")) is None


def test_a_wrong_key_opens_no_session_and_a_revoked_one_ends_it() -> None:
    token, record = key(Scope.ADMIN)
    records = {record.key_id: record}
    sessions = make(b"s" * 32, records, Clock())
    with pytest.raises(ModelMoraError) as wrong:
        asyncio.run(sessions.login(new_token().token))
    assert wrong.value.code is ErrorCode.UNAUTHORIZED
    session: Session = asyncio.run(sessions.login(token))
    records[record.key_id] = KeyRecord(
        record.key_id, record.name, record.digest, record.scopes, record.created_at, None, datetime.now(UTC)
    )
    with pytest.raises(ModelMoraError) as revoked:
        asyncio.run(sessions.principal(cookie_headers(sessions.encode(session)), "GET"))
    assert revoked.value.code is ErrorCode.UNAUTHORIZED
