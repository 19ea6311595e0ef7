"""Bounded resources at the edge of a real server, driven with raw sockets as an attacker would:
read timeouts, header and buffering caps, multipart part caps, protocol errors as JSON, strict
input. Timeouts are set tiny here; every wait below is on something the server does."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Server, start_server

GUARD = 60.0  # a socket that waits longer than this has failed the test (never hit when passing)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def connect(srv: Server) -> socket.socket:
    host, port = srv.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=GUARD)
    return sock


def read_reply(sock: socket.socket) -> Reply:
    """One HTTP response (interim 1xx answers are returned as they are)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return Reply(status, headers, rest[:length])


def closed_by_server(sock: socket.socket) -> bool:
    """Blocks until the server closes the connection (EOF), or the guard fails the test."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def assert_error_shape(reply: Reply, status: int, code: str) -> dict[str, Any]:
    assert reply.status == status, reply
    assert reply.headers["content-type"] == "application/json"
    body: dict[str, Any] = reply.json()
    assert set(body) == {"error_code", "message", "details", "trace_id"}
    assert body["error_code"] == code
    assert body["trace_id"] == reply.headers["x-trace-id"]
    return body


def head(method: str, path: str, *lines: str) -> bytes:
    fields = "".join(f"{line}\r\n" for line in ("Host: test", *lines))
    return f"{method} {path} HTTP/1.1\r\n{fields}\r\n".encode()


@pytest.fixture(scope="module")
def quick(module_tmp: Path) -> Iterator[Server]:
    """Tiny read timeouts; room for a big multipart body."""
    srv = start_server(
        module_tmp / "quick",
        module_tmp / "quick.log",
        MODELMORA_SERVER__HEADER_TIMEOUT_SECONDS="0.5",
        MODELMORA_SERVER__BODY_TIMEOUT_SECONDS="0.5",
        MODELMORA_SERVER__BODY_DEADLINE_SECONDS="60",
        MODELMORA_SERVER__KEEP_ALIVE_TIMEOUT_SECONDS="0.5",
        MODELMORA_SERVER__MAX_HEADER_BYTES="4096",
        MODELMORA_LIMITS__MAX_MULTIPART_PARTS="1000000",
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tight(module_tmp: Path) -> Iterator[Server]:
    """Default timeouts; bodies of 1 MiB, 3 MiB held at once, 100 multipart parts."""
    srv = start_server(
        module_tmp / "tight",
        module_tmp / "tight.log",
        MODELMORA_LIMITS__MAX_REQUEST_BYTES=str(1 << 20),
        MODELMORA_LIMITS__MAX_BUFFERED_BYTES=str(3 << 20),
        MODELMORA_LIMITS__MAX_MULTIPART_PARTS="100",
    )
    yield srv
    srv.stop()


# -- read timeouts ---------------------------------------------------------------------------


def test_a_connection_that_sends_nothing_is_closed(quick: Server) -> None:
    with connect(quick) as sock:
        assert closed_by_server(sock)


def test_partial_headers_get_408_then_the_connection_closes(quick: Server) -> None:
    with connect(quick) as sock:
        sock.sendall(b"POST /api/v1/infer/m HTTP/1.1\r\nHost: test\r\nContent-Le")
        body = assert_error_shape(read_reply(sock), 408, "REQUEST_TIMEOUT")
        assert "server.header_timeout_seconds" in body["message"]
        assert closed_by_server(sock)


@pytest.mark.parametrize("path", ["/api/v1/infer/m", "/api/v1/models", "/api/v1/infer/m/async"])
def test_a_partial_body_gets_408_then_the_connection_closes(quick: Server, path: str) -> None:
    """The fast path, a FastAPI route and a job submission: every body is read by the edge."""
    with connect(quick) as sock:
        sock.sendall(head("POST", path, "Content-Type: application/json", "Content-Length: 1000") + b'{"in')
        body = assert_error_shape(read_reply(sock), 408, "REQUEST_TIMEOUT")
        assert body["details"]["received_bytes"] == 4
        assert closed_by_server(sock)


def test_an_idle_keep_alive_connection_is_closed(quick: Server) -> None:
    with connect(quick) as sock:
        sock.sendall(head("GET", "/health/live"))
        assert read_reply(sock).status == 200
        assert closed_by_server(sock)


def test_oversized_headers_get_413_in_the_error_shape(quick: Server) -> None:
    with connect(quick) as sock:
        sock.sendall(head("GET", "/health/live", "X-Filler: " + "a" * 8000))
        body = assert_error_shape(read_reply(sock), 413, "PAYLOAD_TOO_LARGE")
        assert body["details"] == {"limit_bytes": 4096}
        assert closed_by_server(sock)


def test_malformed_http_gets_400_in_the_error_shape(quick: Server) -> None:
    with connect(quick) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert_error_shape(read_reply(sock), 400, "BAD_REQUEST")
        assert closed_by_server(sock)


# -- multipart -------------------------------------------------------------------------------

BOUNDARY = b"edgeboundary"


def empty_parts(count: int) -> bytes:
    part = b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="image"\r\n\r\n\r\n'
    return part * count + b"--" + BOUNDARY + b"--\r\n"


def test_80000_empty_parts_are_refused_at_the_cap_without_reading_the_rest(tight: Server) -> None:
    """The issue's body, sent chunked: the answer comes after its first 64 KiB, the rest unsent."""
    body = empty_parts(80_000)
    with connect(tight) as sock:
        sock.sendall(
            head(
                "POST",
                "/api/v1/infer/m",
                f"Content-Type: multipart/form-data; boundary={BOUNDARY.decode()}",
                "Transfer-Encoding: chunked",
            )
        )
        first = body[: 64 << 10]
        sock.sendall(b"%x\r\n%s\r\n" % (len(first), first))
        error = assert_error_shape(read_reply(sock), 413, "PAYLOAD_TOO_LARGE")
        assert error["details"] == {"limit_parts": 100, "setting": "limits.max_multipart_parts"}
        assert closed_by_server(sock)
    assert httpx.get(tight.url + "/health/live", timeout=GUARD).status_code == 200


def test_health_answers_while_a_big_multipart_body_is_parsed(quick: Server) -> None:
    """80,000 parts under a cap that admits them: parsed off the event loop, so a probe sent
    once the whole body is on its way is answered before the multipart request is."""
    body = empty_parts(80_000)
    with connect(quick) as sock:
        sock.sendall(
            head(
                "POST",
                "/api/v1/infer/m",
                f"Content-Type: multipart/form-data; boundary={BOUNDARY.decode()}",
                f"Content-Length: {len(body)}",
            )
            + body
        )
        assert httpx.get(quick.url + "/health/live", timeout=GUARD).status_code == 200
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(1)  # the multipart request has not been answered yet
        sock.setblocking(True)
        sock.settimeout(GUARD)
        reply = read_reply(sock)
    # Parsed whole, then refused by the inference layer: an error in the one shape, not a hang.
    assert reply.status in (404, 413, 422)
    assert set(reply.json()) == {"error_code", "message", "details", "trace_id"}


def test_multipart_fields_are_typed_strictly(tight: Server) -> None:
    def form(**fields: str) -> bytes:
        parts = [b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="image"\r\n\r\nxx\r\n']
        for name, value in fields.items():
            parts.append(
                b"--"
                + BOUNDARY
                + f'\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
            )
        return b"".join(parts) + b"--" + BOUNDARY + b"--\r\n"

    ctype = {"content-type": f"multipart/form-data; boundary={BOUNDARY.decode()}"}
    for fields, field in (
        ({"keep_alive": "Infinity"}, "keep_alive"),
        ({"timeout_seconds": "nan"}, "timeout_seconds"),
        ({"stream": "yes"}, "stream"),
    ):
        reply = tight.client.post("/api/v1/infer/m", content=form(**fields), headers=ctype)
        assert reply.status_code == 422, reply.text
        assert reply.json()["details"]["errors"][0]["field"] == field


# -- buffered bytes --------------------------------------------------------------------------


def probe_admitted(srv: Server) -> tuple[bool, Reply | None]:
    """A 1 MiB body announced with `Expect: 100-continue`: the edge either reads it (uvicorn
    sends 100 Continue at its first read) or refuses it from its headers alone."""
    with connect(srv) as sock:
        sock.sendall(
            head(
                "POST",
                "/api/v1/infer/m",
                "Content-Type: application/json",
                f"Content-Length: {1 << 20}",
                "Expect: 100-continue",
            )
        )
        reply = read_reply(sock)
        return (True, None) if reply.status == 100 else (False, reply)


def wait_for(predicate: Any) -> Any:
    """Poll observable server state (each try is a full request), bounded by GUARD tries."""
    for _ in range(int(GUARD * 20)):
        result = predicate()
        if result:
            return result
    raise AssertionError("the server never reached the state waited for")


def test_total_buffered_bytes_are_capped(tight: Server) -> None:
    assert probe_admitted(tight)[0]
    holders = []
    try:
        for path in ("/api/v1/infer/m", "/api/v1/models", "/api/v1/infer/m"):
            sock = connect(tight)
            holders.append(sock)
            sock.sendall(
                head("POST", path, "Content-Type: application/json", f"Content-Length: {1 << 20}")
                + b" " * (512 << 10)
            )
        # Three unfinished 1 MiB bodies hold the 3 MiB: the fourth is refused from its headers.
        refused = wait_for(lambda: (lambda r: r[1] if not r[0] else None)(probe_admitted(tight)))
        body = assert_error_shape(refused, 503, "INSUFFICIENT_MEMORY")
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["connection"] == "close"
        assert body["details"]["setting"] == "limits.max_buffered_bytes"
        # Bodies-free requests still pass.
        assert tight.client.get("/health/live").status_code == 200
    finally:
        for sock in holders:
            sock.close()
    # Their bytes are given back once their connections are gone.
    wait_for(lambda: probe_admitted(tight)[0])


# -- strict input ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/jobs", "/api/v1/models"])
@pytest.mark.parametrize("query", ["page=9223372036854775807", "page=1000001", "page=0", "page_size=100000"])
def test_page_bounds_are_validation_errors(tight: Server, path: str, query: str) -> None:
    reply = tight.client.get(f"{path}?{query}")
    assert reply.status_code == 422, reply.text
    assert reply.json()["error_code"] == "VALIDATION_ERROR"


@pytest.mark.parametrize(
    "body",
    [
        b'{"input_data": {"text": "a"}, "priority": true}',
        b'{"input_data": {"text": "a"}, "keep_alive": Infinity}',
        b'{"input_data": {"text": "a"}, "keep_alive": NaN}',
        b'{"input_data": {"text": "a"}, "stream": "false"}',
    ],
)
@pytest.mark.parametrize("path", ["/api/v1/infer/m", "/api/v1/infer/m/async"])
def test_non_strict_bodies_are_refused_before_anything_runs(tight: Server, body: bytes, path: str) -> None:
    """422 VALIDATION_ERROR, not MODEL_NOT_FOUND: the body is refused before the model is looked up."""
    reply = tight.client.post(path, content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 422, reply.text
    assert reply.json()["error_code"] == "VALIDATION_ERROR"


def test_registry_bodies_refuse_non_finite_numbers(tight: Server) -> None:
    reply = tight.client.post(
        "/api/v1/models",
        content=b'{"source": "/nonexistent", "config": {"keep_alive_seconds": Infinity}}',
        headers={"content-type": "application/json"},
    )
    assert reply.status_code == 422, reply.text
    assert reply.json()["details"]["errors"][0]["field"] == "config"
