"""Turn an `Authorization` header into a Principal, fast on the hot path.

A verified key is cached for `auth.cache_seconds`, so a warm request costs one SHA-256 and a
dict look-up, not a database round trip; a revocation or expiry reaches every replica within
that time. Unknown key ids are cached too (bounded), so a caller sending random tokens cannot
turn each request into a database query.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime

from modelmora.auth.keys import (
    BOOTSTRAP,
    KeyRecord,
    Principal,
    Scope,
    digest,
    has_scope,
    key_id_of,
    same_digest,
)
from modelmora.errors import ErrorCode, ModelMoraError

KeyLookup = Callable[[str], KeyRecord | None]
_CACHE_ENTRIES = 10_000


def unauthorized(message: str) -> ModelMoraError:
    return ModelMoraError(ErrorCode.UNAUTHORIZED, message)


def forbidden(principal: Principal, needed: Scope) -> ModelMoraError:
    return ModelMoraError(
        ErrorCode.FORBIDDEN,
        f"this API key lacks the {needed.value!r} scope",
        {"needed_scope": needed.value, "key": principal.key_id or principal.name},
    )


class Authenticator:
    def __init__(
        self,
        *,
        lookup: KeyLookup | None,
        bootstrap_key: str | None = None,
        cache_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._lookup = lookup
        self._bootstrap = digest(bootstrap_key) if bootstrap_key else None
        self._ttl = cache_seconds
        self._clock = clock
        self._now = now
        # key id -> (record or None for "no such key", when fetched)
        self._cache: OrderedDict[str, tuple[KeyRecord | None, float]] = OrderedDict()

    def cached(self, token: str) -> Principal | None:
        """The principal when the answer is known without I/O (the hot path), else None."""
        key_id = key_id_of(token)
        if key_id is None:
            return self._not_a_key(token)
        hit = self._cache.get(key_id)
        if hit is None or self._clock() - hit[1] > self._ttl:
            return None
        return self._check(token, hit[0])

    async def authenticate(self, authorization: str | None) -> Principal:
        """The caller, or ModelMoraError(UNAUTHORIZED)."""
        token = bearer_token(authorization)
        principal = self.cached(token)
        if principal is not None:
            return principal
        key_id = key_id_of(token)
        assert key_id is not None  # cached() answered for malformed tokens
        record = await asyncio.to_thread(self._lookup, key_id) if self._lookup is not None else None
        self._remember(key_id, record)
        return self._check(token, record)

    def forget(self, key_id: str) -> None:
        """Drop a cached key (this replica revoked it: no need to wait for the cache)."""
        self._cache.pop(key_id, None)

    def _not_a_key(self, token: str) -> Principal:
        if self._bootstrap is not None and hmac.compare_digest(digest(token), self._bootstrap):
            return BOOTSTRAP
        raise unauthorized("invalid API key")

    def _check(self, token: str, record: KeyRecord | None) -> Principal:
        if record is None or not same_digest(token, record.digest):
            if self._bootstrap is not None and hmac.compare_digest(digest(token), self._bootstrap):
                return BOOTSTRAP
            raise unauthorized("invalid API key")
        # Only a caller holding the real token learns why it no longer works.
        if record.revoked_at is not None:
            raise unauthorized(f"API key {record.key_id} was revoked")
        if not record.usable_at(self._now()):
            raise unauthorized(f"API key {record.key_id} expired")
        return Principal(record.key_id, record.name, record.scopes)

    def _remember(self, key_id: str, record: KeyRecord | None) -> None:
        self._cache[key_id] = (record, self._clock())
        self._cache.move_to_end(key_id)
        while len(self._cache) > _CACHE_ENTRIES:
            self._cache.popitem(last=False)


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise unauthorized(
            "an API key is required: send it as 'Authorization: Bearer <key>' (an operator "
            "creates one with `modelmora keys create NAME --scope infer`)"
        )
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise unauthorized("the Authorization header must be 'Bearer <key>'")
    return token.strip()


def require(principal: Principal, needed: Scope | None) -> None:
    if needed is not None and not has_scope(principal.scopes, needed):
        raise forbidden(principal, needed)
