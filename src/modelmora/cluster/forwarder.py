"""Forwarding: send a synchronous request to the replica that holds its model, one hop.

The request goes to the holder's REST door (`POST /api/v1/infer/{name}`) whatever door it
came in by (REST, gRPC, the OpenAI routes, a job), so the holder answers it exactly as it
would a direct one; its answer comes back as the same response dict, or the same events for
a stream. Embeddings travel as JSON numbers, exactly what a direct REST caller gets (base64
would have been cheaper to parse, but it is float32 by definition, and an adapter may answer
in float64).

`PeerUnavailable` means "serve it here": the holder could not be reached, broke off before
answering a unary request, or was full or draining. An inference has no side effect, so a
unary request that the holder dropped is run here again; a stream that had started cannot be.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

import orjson

from modelmora.auth.keys import current_principal
from modelmora.cluster import hop
from modelmora.cluster.hop_client import HopClient, HopError
from modelmora.cluster.membership import Membership
from modelmora.cluster.routing import choose
from modelmora.cluster.view import ModelPresence, ReplicaInfo
from modelmora.config import Settings
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.observability.metrics import Metrics
from modelmora.observability.tracing import traceparent_for

log = logging.getLogger("modelmora.cluster")

# The holder's answers that send the request back here rather than to the caller: it was
# full, going away, or lost its worker; a copy here may well serve it.
_FALLBACK = frozenset(
    {ErrorCode.QUEUE_FULL, ErrorCode.SHUTTING_DOWN, ErrorCode.INSUFFICIENT_MEMORY, ErrorCode.WORKER_DIED}
)
_MISCONFIGURED = frozenset({ErrorCode.UNAUTHORIZED, ErrorCode.FORBIDDEN})
# Past the request's own deadline (which the holder enforces and answers 504 for), the most
# the hop waits for a response before giving up on the holder.
_GRACE_SECONDS = 5.0
_JSON = (b"content-type", b"application/json")


class PeerUnavailable(Exception):
    """Serve the request here instead."""


def peer_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """Verifies the peers' certificates (cluster.ca_certs, else server.tls.ca_certs, else the
    system's) and presents this replica's own certificate, for peers that require clients'."""
    tls = settings.server.tls
    cafile = settings.cluster.ca_certs or tls.ca_certs
    context = ssl.create_default_context(cafile=str(cafile) if cafile is not None else None)
    if tls.certfile is not None and tls.keyfile is not None:
        password = tls.keyfile_password.get_secret_value() if tls.keyfile_password is not None else None
        context.load_cert_chain(str(tls.certfile), str(tls.keyfile), password)
    return context


def _jsonable(value: Any) -> Any:
    """Input data as JSON: raw bytes (a multipart upload) go as base64, as the JSON door takes them."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _error(status: int, body: bytes, headers: dict[bytes, bytes]) -> ModelMoraError:
    try:
        data = orjson.loads(body)
        code = ErrorCode(data["error_code"])
        retry = headers.get(b"retry-after")
        return ModelMoraError(
            code,
            str(data.get("message", "")),
            data.get("details") or {},
            retry_after=float(retry) if retry else None,
        )
    except Exception:
        return ModelMoraError(ErrorCode.INTERNAL_ERROR, f"a peer answered {status} without an error body")


class Forwarder:
    def __init__(
        self,
        settings: Settings,
        membership: Membership,
        local: Callable[[str], ModelPresence | None],
        metrics: Metrics,
    ) -> None:
        self.cfg = settings.cluster
        self.membership = membership
        self.local = local  # this replica's presence for a model, as of now
        self.metrics = metrics
        secret = self.cfg.secret
        self._static = [
            _JSON,
            (hop.HOP, membership.id.encode()),
            *([(hop.CLUSTER_KEY, secret.get_secret_value().encode())] if secret is not None else []),
        ]
        self.client = HopClient(peer_ssl_context(settings), self.cfg.connect_timeout_seconds)

    def route(self, name: str) -> ReplicaInfo | None:
        """The peer to send `name`'s request to; None: serve here (routing off, a request that
        came over the hop already, no peer holding the model with room)."""
        if not self.cfg.forward or hop.forwarded_from.get() is not None:
            return None
        peers = self.membership.peers()
        if not peers:
            return None
        return choose(name, self.membership.id, self.local(name), peers, self.cfg.saturation_queue_depth)

    def _request(
        self, body: dict[str, Any], trace_id: str | None, stream: bool
    ) -> tuple[list[tuple[bytes, bytes]], bytes]:
        headers = [*self._static, (hop.PRINCIPAL, hop.encode_principal(current_principal.get()))]
        if trace_id:
            headers.append((b"traceparent", traceparent_for(trace_id).encode()))
        if stream:
            headers.append((b"accept", b"text/event-stream"))
        body = {**body, "input_data": _jsonable(body["input_data"]), "stream": stream}
        return headers, orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)

    async def infer(
        self,
        peer: ReplicaInfo,
        name: str,
        body: dict[str, Any],
        timeout: float,
        trace_id: str | None,
        disconnected: asyncio.Future[Any] | None,
    ) -> dict[str, Any]:
        """The holder's response, as `InferenceService.infer` returns it. `body`: the request's
        input_data, parameters, priority, timeout_seconds, keep_alive."""
        assert peer.advertise_url is not None
        headers, payload = self._request(body, trace_id, stream=False)
        started = time.monotonic()
        exchange = self.client.request(peer.advertise_url, f"/api/v1/infer/{name}", headers, payload)
        try:
            async with _watch(disconnected), asyncio.timeout(timeout + _GRACE_SECONDS), exchange as r:
                data = await r.read()
                status, rheaders = r.status, r.headers
        except HopError as exc:
            self._unreachable(peer, name, exc)
            raise PeerUnavailable from None
        except TimeoutError:
            self.metrics.forwarded.labels(name, "error").inc()
            raise ModelMoraError(
                ErrorCode.INFERENCE_TIMEOUT, f"no answer from replica {peer.id} within {timeout:g} s"
            ) from None
        except ModelMoraError:
            raise
        except Exception:  # a bug here must not fail the caller: serve it locally, loudly
            log.exception("forwarding failed unexpectedly", extra={"model": name, "peer": peer.id})
            self.metrics.forwarded.labels(name, "fallback").inc()
            raise PeerUnavailable from None
        if status != 200:
            raise self._refused(peer, name, status, data, rheaders)
        self.membership.mark_up(peer.id)
        self.metrics.forwarded.labels(name, "forwarded").inc()
        response: dict[str, Any] = orjson.loads(data)
        timing = response.get("timing")
        if isinstance(timing, dict) and "total_time_ms" in timing:  # the caller's whole wait
            elapsed_ms = (time.monotonic() - started) * 1000
            timing["total_time_ms"] = round(max(timing["total_time_ms"], elapsed_ms), 3)
        return response

    async def stream(
        self,
        peer: ReplicaInfo,
        name: str,
        body: dict[str, Any],
        timeout: float,
        trace_id: str | None,
        disconnected: asyncio.Future[Any] | None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The holder's events, as `InferenceService.stream` yields them. PeerUnavailable
        (and the holder's refusal, as ModelMoraError) come before the first event only."""
        assert peer.advertise_url is not None
        headers, payload = self._request(body, trace_id, stream=True)
        sent = 0
        exchange = self.client.request(peer.advertise_url, f"/api/v1/infer/{name}", headers, payload)
        try:
            async with _watch(disconnected), asyncio.timeout(timeout + _GRACE_SECONDS), exchange as r:
                if r.status != 200:
                    raise self._refused(peer, name, r.status, await r.read(), r.headers)
                self.metrics.forwarded.labels(name, "forwarded").inc()
                buffer = b""
                async for chunk in r.chunks():
                    buffer += chunk
                    while (end := buffer.find(b"\n\n")) >= 0:
                        event, buffer = _sse_event(buffer[:end]), buffer[end + 2 :]
                        if event is not None:
                            sent += 1
                            yield event
        except HopError as exc:
            if not sent:
                self._unreachable(peer, name, exc)
                raise PeerUnavailable from None
            error = ModelMoraError(ErrorCode.WORKER_DIED, f"replica {peer.id} went away mid-stream")
            yield {"event": "error", "data": error.to_body(trace_id)}
        except TimeoutError:
            error = ModelMoraError(
                ErrorCode.INFERENCE_TIMEOUT, f"no answer from replica {peer.id} within {timeout:g} s"
            )
            if not sent:
                raise error from None
            yield {"event": "error", "data": error.to_body(trace_id)}

    def _unreachable(self, peer: ReplicaInfo, name: str, exc: HopError) -> None:
        self.membership.mark_down(peer.id)
        self.metrics.forwarded.labels(name, "fallback").inc()
        log.warning(
            "forwarding failed, serving here", extra={"model": name, "peer": peer.id, "error": str(exc)}
        )

    def _refused(
        self, peer: ReplicaInfo, name: str, status: int, body: bytes, headers: dict[bytes, bytes]
    ) -> Exception:
        error = _error(status, body, headers)
        if error.code in _MISCONFIGURED:
            # This replica already checked the caller for this route: a holder refusing the
            # hop has another cluster.secret (or none). Serve here, and say so.
            log.warning(
                "a replica refused the hop: check that every replica has the same cluster.secret",
                extra={"peer": peer.id, "error_code": error.code.value},
            )
            self.membership.mark_down(peer.id)
            self.metrics.forwarded.labels(name, "fallback").inc()
            return PeerUnavailable()
        if error.code in _FALLBACK:
            if error.code is ErrorCode.SHUTTING_DOWN:
                self.membership.mark_down(peer.id)
            self.metrics.forwarded.labels(name, "fallback").inc()
            return PeerUnavailable()
        self.metrics.forwarded.labels(name, "error").inc()
        return error

    async def close(self) -> None:
        await self.client.close()


def _sse_event(block: bytes) -> dict[str, Any] | None:
    kind, data = None, None
    for line in block.split(b"\n"):
        if line.startswith(b"event: "):
            kind = line[7:].decode()
        elif line.startswith(b"data: "):
            data = orjson.loads(line[6:])
    if kind is None or data is None:
        return None
    return {"event": kind, "data": data}


class _watch:
    """Cancels the request when the caller goes away (`disconnected` completes); the hop's
    connection closes with it, which the holder sees as its own client leaving."""

    def __init__(self, disconnected: asyncio.Future[Any] | None) -> None:
        self.disconnected = disconnected
        self.task: asyncio.Task[Any] | None = None

    def _cancel(self, _: object) -> None:
        if self.task is not None:
            self.task.cancel()

    async def __aenter__(self) -> None:
        if self.disconnected is not None:
            self.task = asyncio.current_task()
            self.disconnected.add_done_callback(self._cancel)

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> bool:
        if self.disconnected is None:
            return False
        self.disconnected.remove_done_callback(self._cancel)
        cancelled = kind is asyncio.CancelledError and self.disconnected.done()
        # cancelled by us alone (no one else asked too): the caller left
        if cancelled and self.task is not None and self.task.uncancel() == 0:
            raise ModelMoraError(ErrorCode.CANCELLED, "the client went away")
        return False
