"""Turn an `Authorization` header into a Principal, fast on the hot path.

A verified key is cached for `auth.cache_seconds`, so a warm request costs one SHA-256 and a
dict look-up by that digest, not a database round trip; a revocation or expiry reaches every replica within
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
    MAX_TOKEN_CHARS,
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
        # The hot path: digest of a token verified recently -> (its principal, until when on
        # `clock` the answer holds: the record's fetch plus the cache time, or its expiry if
        # sooner). A dict look-up by digest leaks nothing usable about a token, and a steady
        # caller costs one SHA-256, no regex, no datetime, no allocation.
        self._verified: dict[str, tuple[Principal, float]] = {}

    def cached(self, token: str) -> Principal | None:
        """The principal when the answer is known without I/O (the hot path), else None."""
        if len(token) <= MAX_TOKEN_CHARS:
            hit = self._verified.get(digest(token))
            if hit is not None and self._clock() <= hit[1]:
                return hit[0]
        key_id = key_id_of(token)
        if key_id is None:
            return self._not_a_key(token)
        known = self._cache.get(key_id)
        if known is None or self._clock() - known[1] > self._ttl:
            return None
        return self._check(token, known[0], known[1])

    async def authenticate(self, authorization: str | None) -> Principal:
        """The caller, or ModelMoraError(UNAUTHORIZED)."""
        token = bearer_token(authorization)
        principal = self.cached(token)
        if principal is not None:
            return principal
        key_id = key_id_of(token)
        assert key_id is not None  # cached() answered for malformed tokens
        fetched = self._clock()
        record = await asyncio.to_thread(self._lookup, key_id) if self._lookup is not None else None
        self._remember(key_id, record, fetched)
        return self._check(token, record, fetched)

    def forget(self, key_id: str) -> None:
        """Drop a cached key (this replica revoked it: no need to wait for the cache)."""
        self._cache.pop(key_id, None)
        for known, (principal, _) in list(self._verified.items()):
            if principal.key_id == key_id:
                del self._verified[known]

    def _not_a_key(self, token: str) -> Principal:
        if self._bootstrap is not None and hmac.compare_digest(digest(token), self._bootstrap):
            return BOOTSTRAP
        raise unauthorized("invalid API key")

    def _check(self, token: str, record: KeyRecord | None, fetched: float) -> Principal:
        if record is None or not same_digest(token, record.digest):
            if self._bootstrap is not None and hmac.compare_digest(digest(token), self._bootstrap):
                return BOOTSTRAP
            raise unauthorized("invalid API key")
        # Only a caller holding the real token learns why it no longer works.
        if record.revoked_at is not None:
            raise unauthorized(f"API key {record.key_id} was revoked")
        now = self._now()
        if not record.usable_at(now):
            raise unauthorized(f"API key {record.key_id} expired")
        principal = Principal(record.key_id, record.name, record.scopes)
        until = fetched + self._ttl
        if record.expires_at is not None:
            until = min(until, self._clock() + (record.expires_at - now).total_seconds())
        if len(self._verified) >= _CACHE_ENTRIES:
            del self._verified[next(iter(self._verified))]  # the oldest
        self._verified[record.digest] = (principal, until)
        return principal

    def _remember(self, key_id: str, record: KeyRecord | None, fetched: float) -> None:
        self._cache[key_id] = (record, fetched)
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
