"""uvicorn's httptools protocol with the limits it lacks, and its errors in the one JSON shape.

uvicorn has a keep-alive timeout but no header read timeout (a connection that sends nothing,
or half a request line, stays open for ever), no cap on header bytes with httptools (h11's
`h11_max_incomplete_event_size` applies to h11 only), and answers malformed HTTP with a plain
text 400. None of that is visible to an ASGI app, which only sees a request once its headers
are complete, so it is done here, in the connection's protocol: `serve` passes the class from
`edge_protocol` as uvicorn's `http`. Body read timeouts and buffering caps are the ASGI edge's
(`api/edge.py`): only the app knows when it is waiting for body bytes.
"""

from __future__ import annotations

import asyncio
import http
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from modelmora.api.edge import error_response_parts
from modelmora.config import ServerSettings
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.observability.tracing import new_trace_id, traceparent_for


def edge_protocol(server: ServerSettings) -> type[asyncio.Protocol]:
    """The protocol class uvicorn instantiates per connection, with this server's limits."""
    return type(
        "EdgeHttpProtocol",
        (EdgeHttpProtocol,),
        {
            "header_timeout": server.header_timeout_seconds,
            "keep_alive_timeout": server.keep_alive_timeout_seconds,
            "max_header_bytes": server.max_header_bytes,
        },
    )


class EdgeHttpProtocol(HttpToolsProtocol):
    header_timeout: ClassVar[float] = 10.0
    keep_alive_timeout: ClassVar[float] = 5.0
    max_header_bytes: ClassVar[int] = 64 << 10

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's own setting is a whole number of seconds; its timer takes any float.
        self.timeout_keep_alive = self.keep_alive_timeout  # type: ignore[assignment]
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._head_started = False  # bytes of a request head have arrived, the head is unfinished
        self._head_too_large = False

    # -- the header read timeout: from the connection (or a request's first byte) to its blank line

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._head_started = True
        if self._head_timer is None:  # a keep-alive connection's next request
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        self._head_started = False
        super().on_headers_complete()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head stalled behind a response still being written: close after it.
            self.cycle.keep_alive = False
            return
        if not self._head_started:  # nothing was sent: an idle connection, closed quietly
            self.transport.close()
            return
        self._write_error(
            ModelMoraError(
                ErrorCode.REQUEST_TIMEOUT,
                f"request headers not complete within {self.header_timeout:g} s "
                "(server.header_timeout_seconds)",
                {"timeout_seconds": self.header_timeout},
            )
        )

    # -- the cap on header bytes, and malformed HTTP

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_header_bytes:
            self._head_too_large = True
            # Raised inside httptools' callback: it surfaces as HttpParserError in
            # data_received, which calls send_400_response (below), which sees the flag.
            raise ValueError("request headers too large")

    def send_400_response(self, msg: str) -> None:
        if self._head_too_large:
            error = ModelMoraError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"request line and headers exceed {self.max_header_bytes} bytes (server.max_header_bytes)",
                {"limit_bytes": self.max_header_bytes},
            )
        else:
            error = ModelMoraError(ErrorCode.BAD_REQUEST, f"malformed HTTP request: {msg}")
        self._write_error(error)

    def _write_error(self, error: ModelMoraError) -> None:
        """A whole response written straight to the socket, then the connection closed: the
        request never reached the app, so the edge cannot answer it. Same body, trace headers
        and `connection: close` as the edge's errors."""
        self._cancel_head_timer()
        trace_id = new_trace_id()
        status, headers, body = error_response_parts(error, trace_id)
        phrase = http.HTTPStatus(status).phrase.encode()
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, phrase)]
        lines += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        lines += [name + b": " + value + b"\r\n" for name, value in headers]
        lines.append(b"traceparent: " + traceparent_for(trace_id).encode() + b"\r\n")
        lines.append(b"x-trace-id: " + trace_id.encode() + b"\r\n")
        lines.append(b"connection: close\r\n\r\n")
        self.transport.write(b"".join(lines) + body)
        self.transport.close()
