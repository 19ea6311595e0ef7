"""The ASGI edge in front of every route: trace ids, body limits, drain, one error shape.

A plain ASGI middleware (not BaseHTTPMiddleware): it adds no task per request. Every request
body is read here, before any route runs, so that one place bounds it: its size
(`limits.max_request_bytes`), the wait for each chunk and for the whole body
(`server.body_timeout_seconds`, `body_deadline_seconds`), and the bytes that all requests in
progress hold at once (`limits.max_buffered_bytes`). A multipart body is parsed as it arrives,
off the event loop (`fastpath.MultipartForm`), never held whole.

With auth on, the API key is checked here too, before any route runs and before the body is
read: the inference fast path answers `/infer` before FastAPI, so a FastAPI dependency alone
would leave inference (JSON, multipart, SSE) open.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextvars import Token
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from modelmora.api import fastpath, openai_errors
from modelmora.auth.authenticator import Authenticator, require
from modelmora.auth.keys import Principal, current_client, current_principal
from modelmora.auth.keys import Scope as AuthScope
from modelmora.auth.limiter import KeyLimiter, Release
from modelmora.auth.policy import rest_scope
from modelmora.cluster import hop
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.observability import tracing
from modelmora.observability.metrics import Metrics, current_protocol
from modelmora.observability.tracing import current_trace_id, trace_id_from, traceparent_for

if TYPE_CHECKING:
    from modelmora.api.console_auth import ConsoleSessions
    from modelmora.config import Settings

log = logging.getLogger("modelmora.api")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]
# (model name, body schema, body, receive, send, request headers): the inference fast path.
FastHandler = Callable[[str, Any, bytes, Receive, Send, dict[bytes, bytes]], Awaitable[None]]

# Probes and metrics answer while draining: orchestrators need them to see the drain.
_ALWAYS_OPEN = ("/health/", "/metrics", "/api/v1/metrics")
_FORM = b"application/x-www-form-urlencoded"


def error_response_parts(
    error: ModelMoraError, trace_id: str | None
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = orjson.dumps(error.to_body(trace_id))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.retry_after is not None:
        headers.append((b"retry-after", str(max(1, round(error.retry_after))).encode()))
    if error.code is ErrorCode.UNAUTHORIZED:  # RFC 6750: how to authenticate
        headers.append((b"www-authenticate", b'Bearer realm="modelmora"'))
    return error.code.http_status, headers, body


@dataclass(frozen=True)
class EdgeLimits:
    """What the edge bounds per request body (docs/security.md, "Limits")."""

    max_body: int
    max_buffered: int = 128 << 20
    body_timeout: float = 30.0
    body_deadline: float = 300.0
    max_parts: int = 300

    @classmethod
    def from_settings(cls, settings: Settings) -> EdgeLimits:
        return cls(
            max_body=settings.limits.max_request_bytes,
            max_buffered=settings.limits.max_buffered_bytes,
            body_timeout=settings.server.body_timeout_seconds,
            body_deadline=settings.server.body_deadline_seconds,
            max_parts=settings.limits.max_multipart_parts,
        )


class EdgeMiddleware:
    def __init__(
        self,
        app: Any,
        *,
        max_body: int,
        is_draining: Callable[[], bool],
        counter: Any,
        fast: FastHandler | None = None,
        metrics: Metrics | None = None,
        tracing_on: Callable[[], bool] = lambda: False,
        limits: EdgeLimits | None = None,
        auth: Authenticator | None = None,
        metrics_public: bool = True,
        limiter: KeyLimiter | None = None,
        sessions: ConsoleSessions | None = None,
        cluster_secret: str | None = None,
    ) -> None:
        self.app = app
        # The credential of requests forwarded by another replica (cluster/hop.py).
        self.cluster_secret = cluster_secret
        # The web console's signed session cookie, accepted instead of a key (console_auth.py).
        self.sessions = sessions
        # None: auth off, nothing checked, every request acts as ANONYMOUS.
        self.auth = auth
        # Per-key rate and concurrency limits, right after the key check; None: no limit set.
        self.limiter = limiter
        self.metrics_public = metrics_public
        self.metrics = metrics
        self.tracing_on = tracing_on
        self.fast = fast
        self.limits = limits or EdgeLimits(max_body=max_body, max_buffered=max(max_body, 128 << 20))
        self.max_body = self.limits.max_body
        self.is_draining = is_draining
        self.counter = counter  # has .inflight (int), read by the drain
        # Body bytes that requests in progress hold or have been promised (a declared
        # Content-Length is reserved whole, before its first byte is read).
        self.buffered = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        traceparent = headers.get(b"traceparent", b"").decode("latin-1")
        trace_id = trace_id_from(traceparent)
        token = current_trace_id.set(trace_id)
        door = current_protocol.set("rest")
        if self.tracing_on():
            tracing.current_parent_span.set(tracing.parent_span_from(traceparent))
        extra = [(b"traceparent", traceparent_for(trace_id).encode()), (b"x-trace-id", trace_id.encode())]
        started = False
        status = 0

        async def send_with_trace(message: Message) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        reader = _BodyReader(self, receive, headers)
        peer = scope.get("client")
        client = current_client.set(f"{peer[0]}:{peer[1]}" if peer else "unknown")
        principal: Token[Principal] | None = None
        forwarded: Token[str | None] | None = None
        release: Release | None = None  # the caller's concurrency slot (auth/limiter.py)

        async def reject(error: ModelMoraError) -> None:
            # -- the OpenAI-compatible routes answer in OpenAI's error shape (api/openai_errors.py)
            if openai_errors.is_v1(scope["path"]):
                status, hdrs, body = openai_errors.error_response_parts(error, scope["path"])
            else:
                status, hdrs, body = error_response_parts(error, trace_id)
            # --
            if not reader.done:  # the rest of the body is never read: the connection must go
                hdrs.append((b"connection", b"close"))
            await send_with_trace({"type": "http.response.start", "status": status, "headers": hdrs})
            await send_with_trace({"type": "http.response.body", "body": body})

        try:
            path: str = scope["path"]
            if self.is_draining() and not path.startswith(_ALWAYS_OPEN):
                await reject(
                    ModelMoraError(ErrorCode.SHUTTING_DOWN, "the server is shutting down", retry_after=5)
                )
                return
            if hop.HOP in headers:
                # Forwarded by another replica: its credential, the caller it checked (and
                # counted against the caller's limits: not counted again), never forwarded on.
                try:
                    carried = hop.verify_hop(headers, self.cluster_secret, self.auth is not None)
                    needed = rest_scope(scope["method"], path, self.metrics_public)
                    if carried is not None and needed is not None:
                        require(carried, needed)
                        principal = current_principal.set(carried)
                except ModelMoraError as exc:
                    await reject(exc)
                    return
                forwarded = hop.forwarded_from.set(headers[hop.HOP].decode("latin-1"))
            elif self.auth is not None:
                needed = rest_scope(scope["method"], path, self.metrics_public)
                if needed is not None:
                    try:
                        caller = await self._authenticate(
                            headers.get(b"authorization"), needed, headers, scope["method"]
                        )
                        principal = current_principal.set(caller)
                        if self.limiter is not None:
                            release = await self.limiter.admit(caller)
                    except ModelMoraError as exc:
                        await reject(exc)  # before the body is read: it is never read
                        return
            ctype = headers.get(b"content-type", b"")
            if scope["method"] in ("POST", "PUT") and (not ctype or ctype.startswith(_FORM)):
                # `curl -d '{...}'` sends a form content type; every body here is JSON.
                scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"] + [
                    (b"content-type", b"application/json")
                ]
            route = fastpath.match(scope["method"], path, ctype) if self.fast is not None else None
            self.counter.inflight += 1
            try:
                reader.admit()
                if route is not None and self.fast is not None:
                    schema = route[1]
                    if isinstance(schema, fastpath.MultipartForm):
                        parsed = await schema.parse(reader.chunks(), self.limits.max_parts)
                        await self.fast(route[0], parsed, b"", receive, send_with_trace, headers)
                    else:
                        body = await reader.read_all()
                        await self.fast(route[0], schema, body, receive, send_with_trace, headers)
                else:
                    # Read here whole, within the limits: the parsers downstream would turn
                    # an error raised mid-read into a generic 400.
                    app_receive = _replay(await reader.read_all(), receive) if reader.has_body else receive
                    await self.app(scope, app_receive, send_with_trace)
            except ModelMoraError as exc:  # raised while no app handler was in place
                if not started:
                    await reject(exc)
            except Exception as exc:  # a bug: answer in the one error shape, with the trace id
                if not started:  # else FastAPI's handler has answered and logged it
                    log.exception("unhandled error", extra={"path": path})
                    await reject(
                        ModelMoraError(ErrorCode.INTERNAL_ERROR, f"internal error: {type(exc).__name__}")
                    )
            finally:
                self.counter.inflight -= 1
                reader.release()
        finally:
            current_trace_id.reset(token)
            current_protocol.reset(door)
            current_client.reset(client)
            if principal is not None:
                current_principal.reset(principal)
            if forwarded is not None:
                hop.forwarded_from.reset(forwarded)
            if release is not None:
                release()  # the response has been sent, streamed ones included
            if self.metrics is not None and status:
                self.metrics.record_http(_handler(scope["path"]), status)

    async def _authenticate(
        self,
        authorization: bytes | None,
        needed: AuthScope,
        headers: dict[bytes, bytes] | None = None,
        method: str = "GET",
    ) -> Principal:
        """The caller, allowed `needed`; else UNAUTHORIZED (401) or FORBIDDEN (403). A key seen
        within `auth.cache_seconds` costs one SHA-256 and a dict look-up, no I/O."""
        assert self.auth is not None
        # -- the web console's session (api/console_auth.py) -----------------------------------
        # No Authorization header but a valid session cookie: the call acts as the key that
        # signed in (CSRF token checked for calls that change state). A request with a header
        # is judged by its header alone.
        if authorization is None and self.sessions is not None and headers is not None:
            session_caller = await self.sessions.principal(headers, method)
            if session_caller is not None:
                require(session_caller, needed)
                return session_caller
        # -- end of the console's session -------------------------------------------------------
        caller = await self.auth.authenticate(
            authorization.decode("latin-1") if authorization is not None else None
        )
        require(caller, needed)
        return caller


# Bounded `handler` labels for HTTP metrics: route groups by path prefix, never the raw path.
_HANDLERS = (
    ("/api/v1/infer/", "infer"),
    ("/infer/", "infer"),
    ("/api/v1/jobs", "jobs"),
    ("/api/v1/results/", "results"),
    ("/api/v1/models", "models"),
    ("/api/v1/status", "status"),
    ("/api/v1/stats", "status"),
    ("/api/v1/cluster", "status"),
    ("/ui", "console"),
    ("/api/v1/lock", "models"),
    ("/api/v1/metrics", "metrics"),
    ("/metrics", "metrics"),
    ("/health/", "health"),
    ("/v1/embeddings", "v1_embeddings"),
    ("/v1/chat/completions", "v1_chat_completions"),
    ("/v1/completions", "v1_completions"),
    ("/v1/images/", "v1_images"),
    ("/v1/models", "v1_models"),
    ("/docs", "docs"),
    ("/redoc", "docs"),
    ("/openapi.json", "docs"),
)


def _handler(path: str) -> str:
    for prefix, name in _HANDLERS:
        if path.startswith(prefix):
            if name == "infer" and path.endswith("/async"):
                return "jobs"
            return name
    return "other"


class _BodyReader:
    """One request's body, read within the edge's limits; its bytes count against the bytes
    all requests hold (`EdgeMiddleware.buffered`) until the request ends (`release`)."""

    def __init__(self, edge: EdgeMiddleware, receive: Receive, headers: dict[bytes, bytes]) -> None:
        self.edge = edge
        self.limits = edge.limits
        self.receive = receive
        length = headers.get(b"content-length")
        self.declared = int(length) if length is not None and length.isdigit() else None
        self.has_body = bool(self.declared) or (self.declared is None and b"transfer-encoding" in headers)
        self.done = not self.has_body
        self.size = 0
        self.reserved = 0
        self.deadline = 0.0

    def admit(self) -> None:
        """Refuse up front what the declared length already rules out; reserve the rest."""
        if self.declared is not None and self.declared > self.limits.max_body:
            raise _too_large(self.declared, self.limits.max_body)
        if self.declared:
            self._reserve(self.declared)
        self.deadline = asyncio.get_running_loop().time() + self.limits.body_deadline

    def _reserve(self, size: int) -> None:
        edge = self.edge
        if edge.buffered + size > self.limits.max_buffered:
            raise ModelMoraError(
                ErrorCode.INSUFFICIENT_MEMORY,
                f"the server holds {edge.buffered} bytes of request bodies; {size} more would pass "
                f"its limit of {self.limits.max_buffered} (limits.max_buffered_bytes)",
                {"limit_bytes": self.limits.max_buffered, "setting": "limits.max_buffered_bytes"},
                retry_after=1,
            )
        edge.buffered += size
        self.reserved += size

    def release(self) -> None:
        self.edge.buffered -= self.reserved
        self.reserved = 0

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        loop = asyncio.get_running_loop()
        while not self.done:
            wait = min(self.limits.body_timeout, self.deadline - loop.time())
            try:
                if wait <= 0:
                    raise TimeoutError
                async with asyncio.timeout(wait):
                    message: Message = await self.receive()
            except TimeoutError:
                raise ModelMoraError(
                    ErrorCode.REQUEST_TIMEOUT,
                    "request body not received in time: no bytes for "
                    f"{self.limits.body_timeout:g} s (server.body_timeout_seconds) or not complete "
                    f"within {self.limits.body_deadline:g} s (server.body_deadline_seconds)",
                    {
                        "received_bytes": self.size,
                        "body_timeout_seconds": self.limits.body_timeout,
                        "body_deadline_seconds": self.limits.body_deadline,
                    },
                ) from None
            if message["type"] != "http.request":
                self.done = True  # nobody is left to answer
                raise ModelMoraError(ErrorCode.CANCELLED, "client disconnected before the body was complete")
            chunk: bytes = message.get("body", b"")
            self.size += len(chunk)
            if self.size > self.limits.max_body:
                raise _too_large(self.size, self.limits.max_body)
            if self.size > self.reserved:  # a chunked body: reserved as it arrives
                self._reserve(self.size - self.reserved)
            self.done = not message.get("more_body", False)
            if chunk:
                yield chunk

    async def read_all(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        message: Message = await receive()  # later: only the disconnect
        return message

    return replay


def _too_large(size: int, limit: int) -> ModelMoraError:
    return ModelMoraError(
        ErrorCode.PAYLOAD_TOO_LARGE,
        f"request body of {size} bytes or more exceeds the limit of {limit} bytes",
        {"limit_bytes": limit},
    )
