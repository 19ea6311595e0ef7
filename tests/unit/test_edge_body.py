"""The edge's body reader on its own: the whole-body deadline, and buffered bytes given back
whatever way a request ends (the e2e suite covers the same over real sockets)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from modelmora.api.edge import EdgeLimits, EdgeMiddleware


class Counter:
    inflight = 0


async def echo_length(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


def edge(**limits: Any) -> EdgeMiddleware:
    return EdgeMiddleware(
        echo_length,
        max_body=1 << 20,
        is_draining=lambda: False,
        counter=Counter(),
        limits=EdgeLimits(max_body=1 << 20, **limits),
    )


async def call(app: EdgeMiddleware, receive: Any, length: int | None) -> tuple[int, dict[bytes, bytes], Any]:
    headers = [(b"content-type", b"application/json")]
    headers.append(
        (b"content-length", str(length).encode())
        if length is not None
        else (b"transfer-encoding", b"chunked")
    )
    scope = {"type": "http", "method": "POST", "path": "/api/v1/models", "headers": headers}
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = sent[0]["status"]
    body = sent[1]["body"]
    return status, dict(sent[0]["headers"]), orjson.loads(body) if status != 200 else body


async def test_a_trickling_body_meets_the_deadline() -> None:
    """Each byte comes well within the chunk timeout; the body as a whole does not."""

    async def trickle() -> dict[str, Any]:
        await asyncio.sleep(0.05)  # the client's pace, not an ordering device
        return {"type": "http.request", "body": b" ", "more_body": True}

    app = edge(body_timeout=10.0, body_deadline=0.3)
    status, headers, body = await call(app, trickle, 1000)
    assert status == 408 and body["error_code"] == "REQUEST_TIMEOUT"
    assert headers[b"connection"] == b"close"
    assert app.buffered == 0


@pytest.mark.parametrize("length", [100, None])
async def test_buffered_bytes_are_given_back(length: int | None) -> None:
    app = edge()
    chunks = [b"x" * 60, b"x" * 40]

    async def receive() -> dict[str, Any]:
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    status, _, body = await call(app, receive, length)
    assert (status, body) == (200, b"100")
    assert app.buffered == 0


async def test_a_chunked_body_is_counted_as_it_arrives() -> None:
    app = edge(max_buffered=1 << 20)
    app.buffered = (1 << 20) - 50  # other requests hold nearly all of it

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"x" * 100, "more_body": True}

    status, headers, body = await call(app, receive, None)
    assert status == 503 and body["error_code"] == "INSUFFICIENT_MEMORY"
    assert headers[b"retry-after"] == b"1"
    assert app.buffered == (1 << 20) - 50
