"""API key tokens: their format, their digest and the constant-time check.

A token is `mm_<key id>_<secret>`: the key id (public, 12 hex digits) finds the stored record
without a scan; the secret is 256 random bits. Only the SHA-256 digest of the whole token is
stored. A slow password hash (bcrypt, argon2) protects guessable passwords; these tokens are
random, so a fast digest is as safe and keeps the check per request in microseconds (the same
choice as GitHub's and Stripe's API tokens).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

TOKEN_PREFIX = "mm_"
# Bounds what a caller can make the server hash: longer headers are refused unread.
MAX_TOKEN_CHARS = 256
_TOKEN = re.compile(r"^mm_([0-9a-f]{12})_([A-Za-z0-9_-]{20,200})$")


class Scope(StrEnum):
    INFER = "infer"  # inference, and the caller's own async jobs
    ADMIN = "admin"  # registry and lifecycle changes, every job, status details (implies infer)


def parse_scopes(values: list[str] | tuple[str, ...] | str) -> frozenset[Scope]:
    items = values.split(",") if isinstance(values, str) else list(values)
    scopes = set()
    for item in items:
        item = item.strip()
        if not item:
            continue
        try:
            scopes.add(Scope(item))
        except ValueError:
            raise ValueError(f"unknown scope {item!r}: use {', '.join(s.value for s in Scope)}") from None
    if not scopes:
        raise ValueError("a key needs at least one scope")
    return frozenset(scopes)


def has_scope(granted: frozenset[Scope], needed: Scope) -> bool:
    return needed in granted or Scope.ADMIN in granted


@dataclass(frozen=True, slots=True)
class NewToken:
    key_id: str
    token: str  # shown once, never stored
    digest: str


def new_token() -> NewToken:
    key_id = secrets.token_hex(6)
    token = f"{TOKEN_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    return NewToken(key_id, token, digest(token))


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def key_id_of(token: str) -> str | None:
    """The key id of a well-formed token, or None (then no lookup is made at all)."""
    if len(token) > MAX_TOKEN_CHARS:
        return None
    match = _TOKEN.match(token)
    return match.group(1) if match else None


def same_digest(token: str, stored: str) -> bool:
    return hmac.compare_digest(digest(token), stored)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A stored key: everything but the token."""

    key_id: str
    name: str
    digest: str
    scopes: frozenset[Scope]
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None

    def usable_at(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts for. `key_id` None: auth is off (every scope) or the bootstrap key."""

    key_id: str | None
    name: str
    scopes: frozenset[Scope]

    @property
    def is_admin(self) -> bool:
        return Scope.ADMIN in self.scopes

    @property
    def owner(self) -> str:
        """What owns the jobs this principal creates (and scopes its idempotency keys)."""
        return self.key_id or self.name


ANONYMOUS = Principal(None, "anonymous", frozenset(Scope))
BOOTSTRAP = Principal(None, "bootstrap", frozenset(Scope))

# Who the current request acts for, set by the door that authenticated it (the ASGI edge, the
# gRPC interceptor) and read where ownership matters (jobs). Auth off: anonymous, every scope.
current_principal: ContextVar[Principal] = ContextVar("modelmora_principal", default=ANONYMOUS)
# Where the request came from ("127.0.0.1:53122", a gRPC peer, "cli" for the command line),
# for the audit log of admin actions.
current_client: ContextVar[str] = ContextVar("modelmora_client", default="local")
