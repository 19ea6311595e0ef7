"""The ASGI edge in front of every route: trace ids, body size limit, drain, one error shape.

A plain ASGI middleware (not BaseHTTPMiddleware): it adds no task or copy per request.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from modelmora.api import fastpath
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.observability import tracing
from modelmora.observability.metrics import Metrics, current_protocol
from modelmora.observability.tracing import current_trace_id, trace_id_from, traceparent_for

log = logging.getLogger("modelmora.api")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[Message], Any]
# (model name, body schema, body, receive, send): the inference fast path.
FastHandler = Callable[[str, Any, bytes, Receive, Send], Awaitable[None]]

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
    return error.code.http_status, headers, body


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
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.tracing_on = tracing_on
        self.fast = fast
        self.max_body = max_body
        self.is_draining = is_draining
        self.counter = counter  # has .inflight (int), read by the drain

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

        async def reject(error: ModelMoraError) -> None:
            status, hdrs, body = error_response_parts(error, trace_id)
            await send_with_trace({"type": "http.response.start", "status": status, "headers": hdrs})
            await send_with_trace({"type": "http.response.body", "body": body})

        try:
            path: str = scope["path"]
            if self.is_draining() and not path.startswith(_ALWAYS_OPEN):
                await reject(
                    ModelMoraError(ErrorCode.SHUTTING_DOWN, "the server is shutting down", retry_after=5)
                )
                return
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                await reject(_too_large(int(length), self.max_body))
                return
            ctype = headers.get(b"content-type", b"")
            if scope["method"] in ("POST", "PUT") and (not ctype or ctype.startswith(_FORM)):
                # `curl -d '{...}'` sends a form content type; every body here is JSON.
                scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"] + [
                    (b"content-type", b"application/json")
                ]
            app_receive = receive
            route = fastpath.match(scope["method"], path, ctype) if self.fast is not None else None
            body: bytes | None = None
            if route is not None or (length is None and scope["method"] in ("POST", "PUT", "PATCH")):
                # The inference fast path takes the body whole; a chunked body has no length
                # to check up front, so it is read here within the limit too (the parsers
                # downstream would turn an error raised mid-read into a generic 400).
                body, size = await _read_limited(receive, self.max_body)
                if body is None:
                    await reject(_too_large(size, self.max_body))
                    return
                app_receive = _replay(body, receive)

            self.counter.inflight += 1
            try:
                if route is not None and self.fast is not None:
                    await self.fast(route[0], route[1], body or b"", receive, send_with_trace)
                else:
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
        finally:
            current_trace_id.reset(token)
            current_protocol.reset(door)
            if self.metrics is not None and status:
                self.metrics.record_http(_handler(scope["path"]), status)


# Bounded `handler` labels for HTTP metrics: route groups by path prefix, never the raw path.
_HANDLERS = (
    ("/api/v1/infer/", "infer"),
    ("/infer/", "infer"),
    ("/api/v1/jobs", "jobs"),
    ("/api/v1/results/", "results"),
    ("/api/v1/models", "models"),
    ("/api/v1/status", "status"),
    ("/api/v1/lock", "models"),
    ("/api/v1/metrics", "metrics"),
    ("/metrics", "metrics"),
    ("/health/", "health"),
    ("/docs", "docs"),
    ("/openapi.json", "docs"),
)


def _handler(path: str) -> str:
    for prefix, name in _HANDLERS:
        if path.startswith(prefix):
            if name == "infer" and path.endswith("/async"):
                return "jobs"
            return name
    return "other"


async def _read_limited(receive: Receive, limit: int) -> tuple[bytes | None, int]:
    """The whole body, or None once it passes `limit` (with the size read so far)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message: Message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), size
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None, size
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), size


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
