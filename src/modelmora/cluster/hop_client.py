"""The HTTP/1.1 client of the hop between replicas: keep-alive connections per peer, responses
parsed by httptools (the parser the server's own door uses), bodies delivered as they arrive
(server-sent events pass through token by token).

Hand-built on purpose: httpx cost 0.9 ms of CPU per small POST on loopback where this costs
0.07 ms (measured on this project's 2-core machine, /tmp/hop scripts in the issue 17 note),
and the hop's whole budget is +1 ms of CPU per forwarded request.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httptools

# A peer's response larger than this is cut off (the peer is trusted, but bounded anyway).
MAX_RESPONSE_BYTES = 512 << 20
# Idle connections older than this are closed rather than reused: a peer's keep-alive timeout
# (server.keep_alive_timeout_seconds, 5 s by default) would close them under us.
_MAX_IDLE_SECONDS = 3.0
_MAX_IDLE_PER_PEER = 64


class HopError(ConnectionError):
    """The peer could not be reached or the connection broke. `responded`: part of a
    response had arrived (the peer ran the request, or is running it)."""

    def __init__(self, message: str, *, responded: bool = False) -> None:
        super().__init__(message)
        self.responded = responded


class _Connection(asyncio.Protocol):
    def __init__(self, key: tuple[str, str, int]) -> None:
        self.key = key
        # asyncio's or uvloop's transport (uvloop's is no asyncio.Transport subclass)
        self.transport: Any = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.head: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.chunks: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self.headers: dict[bytes, bytes] = {}
        self.status = 0
        self.complete = False
        self.received = 0
        self.keep_alive = True
        self._field = b""

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(HopError(f"malformed response from peer: {exc}", responded=True))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            self._fail(HopError("peer closed the connection", responded=self.head.done()))

    # -- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.received += len(body)
        if self.received > MAX_RESPONSE_BYTES:
            self._fail(HopError("peer response too large", responded=True))
            return
        self.chunks.put_nowait(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self.chunks.put_nowait(None)

    def _fail(self, error: HopError) -> None:
        if not self.head.done():
            self.head.set_exception(error)
            self.head.exception()  # retrieved here: the waiter may be gone already
        self.chunks.put_nowait(error)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class HopResponse:
    """One response: status and headers at once, the body as it arrives. `close()` (always
    called, by the `async with` of `HopClient.request`) returns the connection to the pool
    when the body was read to its end, else closes it."""

    def __init__(self, client: HopClient, conn: _Connection) -> None:
        self._client = client
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers

    async def chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self._conn.chunks.get()) is not None:
            if isinstance(chunk, BaseException):
                raise chunk
            yield chunk

    async def read(self) -> bytes:
        return b"".join([c async for c in self.chunks()])

    def close(self) -> None:
        conn = self._conn
        if conn.complete and conn.keep_alive and not conn.closed:
            self._client._release(conn)
        else:
            conn.close()


class HopClient:
    def __init__(self, ssl_context: ssl.SSLContext | None, connect_timeout: float) -> None:
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}

    @contextlib.asynccontextmanager
    async def request(
        self, base_url: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> AsyncIterator[HopResponse]:
        """POST `body` to `base_url + path`; the response's head has arrived when this yields.
        A reused connection that the peer had closed is retried once on a new one (the peer
        never saw the request)."""
        parts = urlsplit(base_url)
        host = parts.hostname or ""
        key = (parts.scheme, host, parts.port or (443 if parts.scheme == "https" else 80))
        netloc = parts.netloc.encode()
        head = [b"POST " + path.encode() + b" HTTP/1.1\r\nhost: " + netloc + b"\r\n"]
        head += [name + b": " + value + b"\r\n" for name, value in headers]
        head.append(b"content-length: " + str(len(body)).encode() + b"\r\n\r\n")
        message = b"".join(head) + body
        for attempt in (0, 1):
            conn, reused = self._take(key)
            if conn is None:
                conn = await self._connect(key)
            assert conn.transport is not None
            conn.transport.write(message)
            try:
                await conn.head
            except HopError as exc:
                if reused and attempt == 0 and not exc.responded:
                    continue
                raise
            except BaseException:  # cancelled while waiting: the connection is mid-exchange
                conn.close()
                raise
            response = HopResponse(self, conn)
            try:
                yield response
            finally:
                response.close()
            return

    def _take(self, key: tuple[str, str, int]) -> tuple[_Connection | None, bool]:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < _MAX_IDLE_SECONDS:
                conn._reset()
                return conn, True
            conn.close()
        return None, False

    async def _connect(self, key: tuple[str, str, int]) -> _Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(key),
                    host,
                    port,
                    ssl=self.ssl_context if scheme == "https" else None,
                    server_hostname=host if scheme == "https" else None,
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise HopError(f"cannot reach {scheme}://{host}:{port}: {exc!r}") from None
        return conn

    def _release(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= _MAX_IDLE_PER_PEER:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
