"""The console's sign-in: an API key exchanged once for a signed session cookie.

The page asks for a key once (`POST /ui/login`), the server checks it as the edge checks any
key and answers with a cookie: HttpOnly (no script reads it), SameSite=Strict (no other site's
page sends it), Secure under TLS, with an expiry (`auth.session_seconds`). The cookie holds the
key's id, name, scopes, expiry and a CSRF token, signed with HMAC-SHA256; nothing is kept on
the server, so any replica sharing `auth.session_secret` accepts it. A state-changing call
(anything but GET/HEAD/OPTIONS) must repeat the CSRF token in `X-CSRF-Token`; the page reads
it from `GET /ui/session`, which another origin cannot read.

The edge (api/edge.py) calls `ConsoleSessions.principal` for a request that carries no
`Authorization` header: a valid session acts as its key would, so scopes, ownership of jobs
and the audit log apply unchanged. A key revoked or expired ends its sessions within
`auth.cache_seconds` (the key is read again, as the authenticator does).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.cookies import SimpleCookie
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from modelmora.api.console import SECURITY_HEADERS
from modelmora.auth.keys import KeyRecord, Principal, Scope
from modelmora.errors import ErrorCode, ModelMoraError

if TYPE_CHECKING:
    from modelmora.app import ModelMora
    from modelmora.auth.authenticator import Authenticator

log = logging.getLogger("modelmora.console")

COOKIE = "mm_console"
CSRF_HEADER = b"x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_VERSION = b"modelmora console session v1"
_MAX_COOKIE_CHARS = 2048

KeyLookup = Callable[[str], KeyRecord | None]


@dataclass(frozen=True, slots=True)
class Session:
    key_id: str | None  # None: the bootstrap key
    name: str
    scopes: frozenset[Scope]
    expires: float  # epoch seconds
    csrf: str

    @property
    def principal(self) -> Principal:
        return Principal(self.key_id, self.name, self.scopes)

    def describe(self) -> dict[str, Any]:
        return {
            "auth": True,
            "signed_in": True,
            "name": self.name,
            "key_id": self.key_id,
            "admin": Scope.ADMIN in self.scopes,
            "scopes": sorted(s.value for s in self.scopes),
            "csrf": self.csrf,
            "expires_at": self.expires,
        }


SIGNED_OUT = {"auth": True, "signed_in": False, "name": None, "admin": False, "csrf": None}
# Auth off: every caller acts with every scope, the page shows everything and needs no token.
OPEN = {"auth": False, "signed_in": True, "name": None, "admin": True, "csrf": None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def unauthorized(message: str) -> ModelMoraError:
    return ModelMoraError(ErrorCode.UNAUTHORIZED, message)


class ConsoleSessions:
    def __init__(
        self,
        authenticator: Authenticator,
        secret: bytes,
        *,
        lifetime: float = 8 * 3600.0,
        lookup: KeyLookup | None = None,
        bootstrap: bool = False,
        cache_seconds: float = 5.0,
        secure: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.authenticator = authenticator
        # Derived, not the setting itself: the same secret may serve other purposes later.
        self._key = hmac.new(secret, _VERSION, hashlib.sha256).digest()
        self.lifetime = lifetime
        self.lookup = lookup
        self.bootstrap = bootstrap
        self.cache_seconds = cache_seconds
        self.secure = secure
        self.clock = clock
        self._checked: dict[str, tuple[KeyRecord | None, float]] = {}  # key id -> (record, when)

    # -- the cookie ---------------------------------------------------------------------------

    def encode(self, session: Session) -> str:
        payload = orjson.dumps(
            {
                "k": session.key_id,
                "n": session.name,
                "s": sorted(s.value for s in session.scopes),
                "e": session.expires,
                "c": session.csrf,
            }
        )
        signature = hmac.new(self._key, payload, hashlib.sha256).digest()
        return f"{_b64(payload)}.{_b64(signature)}"

    def decode(self, value: str) -> Session | None:
        """The session of a cookie value this server signed and that has not expired."""
        if len(value) > _MAX_COOKIE_CHARS or value.count(".") != 1:
            return None
        head, _, tail = value.partition(".")
        try:
            payload, signature = _unb64(head), _unb64(tail)
        except ValueError:
            return None
        if not hmac.compare_digest(hmac.new(self._key, payload, hashlib.sha256).digest(), signature):
            return None
        try:
            data = orjson.loads(payload)
            session = Session(
                data["k"], str(data["n"]), frozenset(Scope(s) for s in data["s"]), float(data["e"]), data["c"]
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
        return session if session.expires > self.clock() else None

    def from_headers(self, headers: dict[bytes, bytes]) -> Session | None:
        raw = headers.get(b"cookie")
        if not raw or COOKIE.encode() not in raw:
            return None
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(raw.decode("latin-1"))
        except Exception:  # a malformed Cookie header: as if there were none
            return None
        morsel = jar.get(COOKIE)
        return self.decode(morsel.value) if morsel is not None else None

    def set_cookie(self, value: str, max_age: int) -> str:
        parts = [f"{COOKIE}={value}", "Path=/", "HttpOnly", "SameSite=Strict", f"Max-Age={max_age}"]
        if self.secure:
            parts.append("Secure")
        return "; ".join(parts)

    # -- signing in, and each request -----------------------------------------------------------

    async def login(self, api_key: str) -> Session:
        """A new session for a valid key; UNAUTHORIZED otherwise (as the edge answers)."""
        principal = await self.authenticator.authenticate(f"Bearer {api_key}")
        if principal.key_id is None and principal.name != "bootstrap":
            raise unauthorized("this key cannot open a console session")
        expires = self.clock() + self.lifetime
        record = await self._record(principal.key_id) if principal.key_id else None
        if record is not None and record.expires_at is not None:  # never outlive the key
            expires = min(expires, record.expires_at.timestamp())
        return Session(principal.key_id, principal.name, principal.scopes, expires, secrets.token_urlsafe(24))

    async def principal(self, headers: dict[bytes, bytes], method: str) -> Principal | None:
        """Who a request with a session cookie acts for; None when it has no valid session
        (the edge then asks for a key). A state-changing call without the session's CSRF
        token is refused (FORBIDDEN), and so is a session whose key was revoked or expired
        (UNAUTHORIZED)."""
        session = self.from_headers(headers)
        if session is None:
            return None
        if method not in SAFE_METHODS:
            sent = headers.get(CSRF_HEADER, b"").decode("latin-1")
            if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
                raise ModelMoraError(
                    ErrorCode.FORBIDDEN,
                    "a console call that changes state must carry the session's CSRF token (X-CSRF-Token)",
                )
        await self.still_valid(session)
        return session.principal

    async def still_valid(self, session: Session) -> None:
        if session.key_id is None:
            if not self.bootstrap:
                raise unauthorized("the bootstrap key of this session is no longer configured")
            return
        record = await self._record(session.key_id)
        if record is None or not record.usable_at(datetime.now(UTC)):
            raise unauthorized(f"API key {session.key_id} was revoked or expired; sign in again")

    async def _record(self, key_id: str) -> KeyRecord | None:
        if self.lookup is None:
            return None
        known = self._checked.get(key_id)
        if known is not None and time.monotonic() - known[1] <= self.cache_seconds:
            return known[0]
        record = await asyncio.to_thread(self.lookup, key_id)
        if len(self._checked) >= 10_000:
            self._checked.clear()
        self._checked[key_id] = (record, time.monotonic())
        return record


def build_sessions(mm: ModelMora) -> ConsoleSessions | None:
    """The console's sessions when the server checks keys (`mm.auth`), else None."""
    if mm.auth is None:
        return None
    settings = mm.settings.auth
    if settings.session_secret is not None:
        secret = settings.session_secret.get_secret_value().encode()
    else:
        secret = secrets.token_bytes(32)
        log.warning(
            "auth.session_secret is not set: console sessions are signed with a random secret "
            "of this process, end when it restarts and are not accepted by other replicas"
        )
    return ConsoleSessions(
        mm.auth,
        secret,
        lifetime=settings.session_seconds,
        lookup=mm.keys.get,
        bootstrap=settings.bootstrap_key is not None,
        cache_seconds=settings.cache_seconds,
        secure=mm.settings.server.tls.enabled,
    )


class LoginRequest(BaseModel):
    api_key: str = Field(min_length=1, max_length=512)


def _json(body: dict[str, Any], status: int = 200, cookie: str | None = None) -> Response:
    headers = {"cache-control": "no-store", **SECURITY_HEADERS}
    if cookie is not None:
        headers["set-cookie"] = cookie
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def build_session_router(sessions: ConsoleSessions | None) -> APIRouter:
    """`/ui/session`, `/ui/login`, `/ui/logout` (open paths: the edge lets them through)."""
    r = APIRouter(include_in_schema=False)

    @r.get("/ui/session")
    async def session_info(request: Request) -> Response:
        if sessions is None:
            return _json(OPEN)
        session = sessions.from_headers({b"cookie": request.headers.get("cookie", "").encode("latin-1")})
        if session is None:
            return _json(SIGNED_OUT)
        try:
            await sessions.still_valid(session)
        except ModelMoraError:
            return _json(SIGNED_OUT, cookie=sessions.set_cookie("", 0))
        return _json(session.describe())

    @r.post("/ui/login")
    async def login(body: LoginRequest) -> Response:
        if sessions is None:
            return _json(OPEN)
        session = await sessions.login(body.api_key)
        max_age = max(1, int(session.expires - sessions.clock()))
        return _json(session.describe(), cookie=sessions.set_cookie(sessions.encode(session), max_age))

    @r.post("/ui/logout")
    async def logout() -> Response:
        if sessions is None:
            return _json(OPEN)
        return _json(SIGNED_OUT, cookie=sessions.set_cookie("", 0))

    return r
