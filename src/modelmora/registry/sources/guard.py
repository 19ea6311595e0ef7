"""An httpx client for URL sources under an `InstallPolicy`: no request-forgery to the inside.

Two checks, both on every hop of a redirect chain:
- a request hook checks each request's URL (scheme, allowed hosts) before it is sent, the
  redirects httpx follows included;
- the connection pool's network backend resolves the host once, checks every address
  (`InstallPolicy.connect_addresses`) and connects to exactly those addresses. TLS still
  verifies the certificate against the host name (httpcore passes the URL's host as SNI), so
  connecting by address changes nothing for the server on the other end. Checking at connect
  time, with the address we then use, is what defeats DNS rebinding: a name that answers a
  public address to a first lookup and 127.0.0.1 to a second is only ever looked up once.

Environment proxies (HTTP(S)_PROXY) are not used under a policy: a proxy resolves the name
itself, where nothing here could check the address.
"""

from __future__ import annotations

from collections.abc import Iterable

import httpcore
import httpx

from modelmora.registry.policy import InstallPolicy


class GuardedBackend(httpcore.NetworkBackend):
    """httpcore's own sync backend, connecting only to addresses the policy let through."""

    def __init__(self, policy: InstallPolicy, inner: httpcore.NetworkBackend | None = None) -> None:
        self._policy = policy
        self._inner = inner or httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            addresses = self._policy.connect_addresses(host, port)
        except OSError as exc:  # no such host, resolver down: the source is unavailable
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        if not addresses:
            raise httpcore.ConnectError(f"{host} has no address")
        failure: Exception | None = None
        for address in addresses:
            try:
                return self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not a URL source")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class GuardedTransport(httpx.HTTPTransport):
    """httpx's transport with the pool rebuilt on `GuardedBackend` (HTTPTransport has no
    parameter for the backend; everything else, request and error mapping, is its own)."""

    def __init__(self, policy: InstallPolicy) -> None:
        super().__init__(trust_env=False)
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            network_backend=GuardedBackend(policy),
        )


def guarded_client(policy: InstallPolicy, timeout: httpx.Timeout) -> httpx.Client:
    """A client that follows redirects, each one checked like the first request."""

    def check(request: httpx.Request) -> None:
        policy.check_url(str(request.url))

    return httpx.Client(
        transport=GuardedTransport(policy),
        follow_redirects=True,
        timeout=timeout,
        trust_env=False,
        event_hooks={"request": [check]},
    )
