"""The hop's HTTP client (cluster/hop_client.py) against a real socket server: keep-alive
reuse, bodies delivered as they arrive, a connection the peer closed while idle, a peer
that is down or breaks off mid-answer, a caller that gives up."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from modelmora.cluster.forwarder import peer_ssl_context
from modelmora.cluster.hop_client import HopClient, HopError
from modelmora.config import Settings

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Peer:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                self.requests.append(head + await reader.readexactly(length))
                await self.handler(reader, writer, number)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed.set()
        finally:
            writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[Peer]]]:
    peers: list[Peer] = []

    async def start(handler: Handler) -> Peer:
        peer = Peer(handler)
        peer.server = await asyncio.start_server(peer._serve, "127.0.0.1", 0)
        peers.append(peer)
        return peer

    yield start
    for peer in peers:
        assert peer.server is not None
        peer.server.close()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def test_connections_are_kept_alive_and_headers_sent(
    serve: Callable[[Handler], Awaitable[Peer]],
) -> None:
    async def handler(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _n: int) -> None:
        w.write(ok(b'{"ok":1}', b"x-reply: yes\r\n"))

    peer = await serve(handler)
    client = HopClient(None, 1.0)
    for _ in range(3):
        async with client.request(peer.url, "/api/v1/infer/m", [(b"x-modelmora-hop", b"r1")], b"{}") as r:
            assert (r.status, r.headers[b"x-reply"], await r.read()) == (200, b"yes", b'{"ok":1}')
    assert peer.connections == 1
    assert peer.requests[0].startswith(b"POST /api/v1/infer/m HTTP/1.1\r\n")
    assert b"x-modelmora-hop: r1\r\n" in peer.requests[0] and peer.requests[0].endswith(b"\r\n\r\n{}")
    await client.close()


async def test_a_streamed_body_arrives_chunk_by_chunk(serve: Callable[[Handler], Awaitable[Peer]]) -> None:
    release = asyncio.Event()

    async def handler(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _n: int) -> None:
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await w.drain()
        await release.wait()  # the second chunk only once the client has the first
        w.write(b"6\r\nsecond\r\n0\r\n\r\n")

    peer = await serve(handler)
    client = HopClient(None, 1.0)
    async with client.request(peer.url, "/x", [], b"") as r:
        chunks = r.chunks()
        assert await anext(chunks) == b"first"
        release.set()
        assert [c async for c in chunks] == [b"second"]
    await client.close()


async def test_an_idle_connection_the_peer_closed_is_retried_on_a_new_one(
    serve: Callable[[Handler], Awaitable[Peer]],
) -> None:
    async def handler(_r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(ok(b"%d" % n))
        await w.drain()
        if n == 1:
            w.close()  # keep-alive announced, then closed while idle (a peer's keep-alive timeout)

    peer = await serve(handler)
    client = HopClient(None, 1.0)
    async with client.request(peer.url, "/x", [], b"") as r:
        assert await r.read() == b"1"
    await peer.closed.wait()
    async with client.request(peer.url, "/x", [], b"") as r:
        assert await r.read() == b"2"
    await client.close()


async def test_a_peer_that_is_down_or_breaks_off(serve: Callable[[Handler], Awaitable[Peer]]) -> None:
    client = HopClient(None, 1.0)
    with pytest.raises(HopError) as down:
        async with client.request("http://127.0.0.1:1", "/x", [], b""):
            pass
    assert not down.value.responded

    async def half(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _n: int) -> None:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await w.drain()
        w.close()

    peer = await serve(half)
    with pytest.raises(HopError) as broke:
        async with client.request(peer.url, "/x", [], b"") as r:
            await r.read()
    assert broke.value.responded

    async def silent(_r: asyncio.StreamReader, w: asyncio.StreamWriter, _n: int) -> None:
        w.close()

    peer = await serve(silent)
    with pytest.raises(HopError) as closed:
        async with client.request(peer.url, "/x", [], b""):
            pass
    assert not closed.value.responded
    await client.close()


async def test_a_caller_that_gives_up_closes_the_connection(
    serve: Callable[[Handler], Awaitable[Peer]],
) -> None:
    async def never(r: asyncio.StreamReader, _w: asyncio.StreamWriter, _n: int) -> None:
        await r.read()  # no answer; returns at the client's EOF
        raise ConnectionError

    peer = await serve(never)
    client = HopClient(None, 1.0)

    async def call() -> None:
        async with client.request(peer.url, "/x", [], b""):
            pass

    task = asyncio.ensure_future(call())
    while not peer.requests:  # noqa: ASYNC110 - the peer's state, polled briefly
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the peer sees its client leave: how a holder learns to cancel the forwarded work
    async with asyncio.timeout(5):
        await peer.closed.wait()
    await client.close()


async def test_the_hop_over_tls_checks_the_peer_and_shows_its_own_certificate(tmp_path: Path) -> None:
    """A replica with server.tls verifies its peer against the CA and presents its own
    certificate to a peer that requires clients' (mTLS); a peer signed by another CA is not
    reached."""
    ca, other = trustme.CA(), trustme.CA()
    files = {}
    for name, (issuer, host) in {
        "a": (ca, "127.0.0.1"),
        "b": (ca, "127.0.0.1"),
        "x": (other, "127.0.0.1"),
    }.items():
        cert = issuer.issue_cert(host)
        files[name] = (tmp_path / f"{name}.pem", tmp_path / f"{name}.key")
        for blob in cert.cert_chain_pems:
            blob.write_to_path(str(files[name][0]), append=True)
        cert.private_key_pem.write_to_path(str(files[name][1]))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    seen: list[Any] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("peercert"))
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"POST")
        writer.write(ok(b"tls"))
        await writer.drain()
        writer.close()

    async def tls_peer(name: str) -> tuple[asyncio.Server, str]:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "ca.pem"))
        context.load_cert_chain(str(files[name][0]), str(files[name][1]))
        context.verify_mode = ssl.CERT_REQUIRED  # mTLS: the hop must show a certificate
        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=context)
        return server, f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    settings = Settings(
        server={"tls": {"certfile": files["a"][0], "keyfile": files["a"][1], "ca_certs": tmp_path / "ca.pem"}}  # type: ignore[arg-type]
    )
    client = HopClient(peer_ssl_context(settings), 2.0)
    server, url = await tls_peer("b")
    async with client.request(url, "/x", [], b"{}") as r:
        assert await r.read() == b"tls"
    assert seen and seen[0] is not None  # the peer saw this replica's certificate
    server.close()
    server, url = await tls_peer("x")  # signed by a CA this replica does not trust
    with pytest.raises(HopError) as refused:
        async with client.request(url, "/x", [], b"{}"):
            pass
    assert not refused.value.responded
    server.close()
    await client.close()
