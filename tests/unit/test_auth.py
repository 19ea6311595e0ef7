"""API keys, scopes and the bind rule: the pure parts of authentication."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from modelmora.auth.authenticator import Authenticator, bearer_token, require
from modelmora.auth.keys import (
    BOOTSTRAP,
    KeyRecord,
    Scope,
    digest,
    key_id_of,
    new_token,
    parse_scopes,
)
from modelmora.auth.mode import UnsafeBindError, auth_enabled, is_loopback
from modelmora.auth.policy import grpc_scope, rest_scope
from modelmora.config import Settings
from modelmora.errors import ErrorCode, ModelMoraError

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def _record(
    token: str, key_id: str, scopes: frozenset[Scope] = frozenset({Scope.INFER}), **kw: object
) -> KeyRecord:
    return KeyRecord(key_id, "k", digest(token), scopes, NOW - timedelta(days=1), **kw)  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_tokens_are_unique_and_only_their_digest_identifies_them() -> None:
    a, b = new_token(), new_token()
    assert a.token != b.token and a.key_id != b.key_id
    assert key_id_of(a.token) == a.key_id
    assert a.digest == digest(a.token) and a.token not in a.digest


@pytest.mark.parametrize(
    "token",
    ["", "mm_", "mm_xyz_abc", "Bearer x", "mm_0123456789ab_" + "a" * 300, "mm_0123456789AB_" + "a" * 30],
)
def test_malformed_tokens_have_no_key_id(token: str) -> None:
    assert key_id_of(token) is None


def test_scopes_parse_and_admin_implies_infer() -> None:
    assert parse_scopes("infer, admin") == {Scope.INFER, Scope.ADMIN}
    with pytest.raises(ValueError, match="unknown scope"):
        parse_scopes(["root"])
    with pytest.raises(ValueError, match="at least one"):
        parse_scopes("")
    from modelmora.auth.keys import Principal

    require(Principal("a", "a", frozenset({Scope.ADMIN})), Scope.INFER)
    with pytest.raises(ModelMoraError) as err:
        require(Principal("i", "i", frozenset({Scope.INFER})), Scope.ADMIN)
    assert err.value.code is ErrorCode.FORBIDDEN


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("GET", "/health/ready", None),
        ("GET", "/docs", None),
        ("GET", "/metrics", None),
        ("POST", "/infer/m", Scope.INFER),
        ("POST", "/api/v1/infer/m/async", Scope.INFER),
        ("GET", "/api/v1/jobs/abc/result", Scope.INFER),
        ("DELETE", "/api/v1/jobs/abc", Scope.INFER),
        ("GET", "/api/v1/models", Scope.INFER),
        ("POST", "/api/v1/models", Scope.ADMIN),
        ("PUT", "/api/v1/models/victim", Scope.ADMIN),
        ("DELETE", "/api/v1/models/victim", Scope.ADMIN),
        ("POST", "/api/v1/models/m/unload", Scope.ADMIN),
        ("GET", "/api/v1/status", Scope.ADMIN),
        ("GET", "/api/v1/lock", Scope.ADMIN),
        ("GET", "/some/new/route", Scope.ADMIN),  # closed by default
    ],
)
def test_rest_scopes(method: str, path: str, scope: Scope | None) -> None:
    assert rest_scope(method, path, metrics_public=True) is scope


def test_metrics_can_be_keyed() -> None:
    assert rest_scope("GET", "/metrics", metrics_public=False) is Scope.ADMIN


def test_grpc_scopes() -> None:
    assert grpc_scope("/grpc.health.v1.Health/Check") is None
    assert grpc_scope("/modelmora.v1.InferenceService/Infer") is Scope.INFER
    assert grpc_scope("/modelmora.v1.RegistryService/ListModels") is Scope.INFER
    assert grpc_scope("/modelmora.v1.RegistryService/RegisterModel") is Scope.ADMIN
    assert grpc_scope("/modelmora.v1.ManagementService/UnloadModel") is Scope.ADMIN
    assert grpc_scope("/modelmora.v1.Unknown/Thing") is Scope.ADMIN


def _auth(records: dict[str, KeyRecord], clock: Clock, **kw: object) -> tuple[Authenticator, list[str]]:
    looked: list[str] = []

    def lookup(key_id: str) -> KeyRecord | None:
        looked.append(key_id)
        return records.get(key_id)

    return Authenticator(lookup=lookup, cache_seconds=5, clock=clock, now=lambda: NOW, **kw), looked  # type: ignore[arg-type]


def _code(coro: object) -> ErrorCode:
    with pytest.raises(ModelMoraError) as err:
        asyncio.run(coro)  # type: ignore[arg-type]
    return err.value.code


def test_a_valid_key_is_cached_and_a_revocation_lands_after_the_cache_time() -> None:
    t = new_token()
    clock = Clock()
    records = {t.key_id: _record(t.token, t.key_id)}
    auth, looked = _auth(records, clock)
    principal = asyncio.run(auth.authenticate(f"Bearer {t.token}"))
    assert principal.key_id == t.key_id and principal.scopes == {Scope.INFER}
    asyncio.run(auth.authenticate(f"bearer {t.token}"))
    assert looked == [t.key_id]  # the second call came from the cache
    records[t.key_id] = _record(t.token, t.key_id, revoked_at=NOW)
    clock.t = 4.9
    asyncio.run(auth.authenticate(f"Bearer {t.token}"))
    clock.t = 5.1
    assert _code(auth.authenticate(f"Bearer {t.token}")) is ErrorCode.UNAUTHORIZED


def test_wrong_secret_unknown_expired_and_missing_keys_are_refused() -> None:
    t = new_token()
    other = new_token()
    clock = Clock()
    expired = new_token()
    records = {
        t.key_id: _record(t.token, t.key_id),
        expired.key_id: _record(expired.token, expired.key_id, expires_at=NOW - timedelta(seconds=1)),
    }
    auth, looked = _auth(records, clock)
    forged = f"mm_{t.key_id}_{other.token.split('_', 2)[2]}"
    assert _code(auth.authenticate(f"Bearer {forged}")) is ErrorCode.UNAUTHORIZED
    assert _code(auth.authenticate(f"Bearer {other.token}")) is ErrorCode.UNAUTHORIZED
    assert _code(auth.authenticate(f"Bearer {expired.token}")) is ErrorCode.UNAUTHORIZED
    assert _code(auth.authenticate(None)) is ErrorCode.UNAUTHORIZED
    assert _code(auth.authenticate("Basic abc")) is ErrorCode.UNAUTHORIZED
    # A flood of one unknown key id reaches the database once per cache period.
    for _ in range(5):
        _code(auth.authenticate(f"Bearer {other.token}"))
    assert looked.count(other.key_id) == 1
    # Malformed tokens never reach the database.
    _code(auth.authenticate("Bearer not-a-key"))
    assert "not-a-key" not in looked


def test_the_bootstrap_key_is_an_admin_key() -> None:
    boot = "b" * 40
    auth, _ = _auth({}, Clock(), bootstrap_key=boot)
    assert asyncio.run(auth.authenticate(f"Bearer {boot}")) is BOOTSTRAP
    assert _code(auth.authenticate("Bearer " + "c" * 40)) is ErrorCode.UNAUTHORIZED


def test_bearer_parsing() -> None:
    assert bearer_token("Bearer  abc ") == "abc"
    with pytest.raises(ModelMoraError):
        bearer_token("Bearer ")


def _settings(host: str, **auth: object) -> Settings:
    return Settings.model_validate({"server": {"host": host}, "auth": auth})


def test_auto_is_off_on_loopback_and_on_elsewhere() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    assert auth_enabled(_settings("127.0.0.1")) is False
    assert auth_enabled(_settings("0.0.0.0")) is True
    assert auth_enabled(_settings("127.0.0.1", enabled=True)) is True


def test_a_public_bind_without_auth_refuses_to_start_unless_allowed() -> None:
    with pytest.raises(UnsafeBindError, match="refusing to serve"):
        auth_enabled(_settings("0.0.0.0", enabled=False))
    assert auth_enabled(_settings("0.0.0.0", enabled=False, allow_unauthenticated=True)) is False


def test_settings_refuse_short_bootstrap_keys_and_bad_rate_limits() -> None:
    with pytest.raises(ValueError, match="32"):
        _settings("127.0.0.1", bootstrap_key="short")
    with pytest.raises(ValueError):
        _settings("127.0.0.1", rate_limit="lots")
    assert _settings("127.0.0.1", rate_limit="10/second").auth.rate_limit == "10/second"


def test_tls_settings_need_a_key_with_the_certificate_and_a_ca_for_client_auth(tmp_path: Path) -> None:
    cert, key, ca = (tmp_path / n for n in ("c.pem", "k.pem", "ca.pem"))
    with pytest.raises(ValueError, match="both certfile and keyfile"):
        Settings.model_validate({"server": {"tls": {"certfile": str(cert)}}})
    with pytest.raises(ValueError, match="client_auth needs"):
        Settings.model_validate(
            {"server": {"tls": {"certfile": str(cert), "keyfile": str(key), "client_auth": "required"}}}
        )
    tls = Settings.model_validate(
        {"server": {"tls": {"certfile": str(cert), "keyfile": str(key), "ca_certs": str(ca)}}}
    ).server.tls
    assert tls.enabled and tls.client_auth == "none"
    assert not Settings().server.tls.enabled


def test_sdk_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelmora.client.credentials import bearer, grpc_target, resolve_api_key, rest_verify

    monkeypatch.setenv("MODELMORA_API_KEY", "mm_from_env")
    assert resolve_api_key(None) == "mm_from_env" and resolve_api_key("mine") == "mine"
    assert resolve_api_key("") is None  # an explicit "" sends no key
    assert bearer("k") == {"Authorization": "Bearer k"} and bearer(None) == {}
    assert grpc_target("https://h:1", None, None, None) == ("h:1", True)
    assert grpc_target("grpc://h:1", None, None, None) == ("h:1", False)
    assert grpc_target("h:1", None, "ca.pem", None) == ("h:1", True)
    assert grpc_target("h:1", None, None, None) == ("h:1", False)
    assert rest_verify(True, None, None, None) is True and rest_verify(False, None, None, None) is False
