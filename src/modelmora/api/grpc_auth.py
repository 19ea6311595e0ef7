"""The gRPC door's key check: a server interceptor, so no servicer method can skip it.

Installed only when auth is on (an interceptor costs every call a Python round trip). A
refused call ends with UNAUTHENTICATED or PERMISSION_DENIED and the same error metadata as
any other error of the door; an accepted one runs with its principal in `current_principal`,
for the job service's ownership checks, and its peer address in `current_client`, for the audit
log.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from modelmora.api.grpc_services import abort
from modelmora.auth.authenticator import Authenticator, require
from modelmora.auth.keys import Principal, current_client, current_principal
from modelmora.auth.limiter import KeyLimiter, Release
from modelmora.auth.policy import grpc_scope
from modelmora.errors import ModelMoraError
from modelmora.observability.metrics import Metrics
from modelmora.observability.tracing import trace_id_from

# grpc's classes are generic in its stubs only: these aliases must not run.
if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    Ctx = grpc.aio.ServicerContext[Any, Any]
    Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Handler = Ctx = Any
    Interceptor = grpc.aio.ServerInterceptor
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler]]


def _metadata(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for k, v in details.invocation_metadata or ():  # type: ignore[attr-defined]
        if k == key:
            return v if isinstance(v, str) else v.decode("latin-1")
    return None


class AuthInterceptor(Interceptor):
    def __init__(
        self,
        authenticator: Authenticator,
        metrics: Metrics | None = None,
        limiter: KeyLimiter | None = None,
    ) -> None:
        self.auth = authenticator
        self.metrics = metrics
        self.limiter = limiter

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        needed = grpc_scope(method)
        if handler is None or needed is None:
            return handler
        try:
            principal = await self.auth.authenticate(_metadata(handler_call_details, "authorization"))
            require(principal, needed)
        except ModelMoraError as exc:
            if self.metrics is not None:
                self.metrics.record_grpc(method.rsplit("/", 1)[-1], exc.code.grpc_status)
            trace_id = trace_id_from(_metadata(handler_call_details, "traceparent"))
            return _wrap(handler, _refuse(exc, trace_id))
        admit = None
        if self.limiter is not None:
            # Per-key limits: checked inside the call (below), so that the concurrency slot
            # taken is always given back by the call's own `finally`.
            admit = _Admission(self.limiter, self.metrics, method, handler_call_details)
        return _wrap(handler, _as(principal, admit))


class _Admission:
    """The rate and concurrency check of one call (auth/limiter.py), run as it starts."""

    def __init__(
        self, limiter: KeyLimiter, metrics: Metrics | None, method: str, details: grpc.HandlerCallDetails
    ) -> None:
        self.limiter, self.metrics, self.method, self.details = limiter, metrics, method, details

    async def __call__(self, principal: Principal, context: Ctx) -> Release:
        try:
            return await self.limiter.admit(principal)
        except ModelMoraError as exc:
            if self.metrics is not None:
                self.metrics.record_grpc(self.method.rsplit("/", 1)[-1], exc.code.grpc_status)
            await abort(context, exc, trace_id_from(_metadata(self.details, "traceparent")))
            raise  # abort raised already; for the type checker


Behaviour = Callable[..., Any]


def _nothing() -> None:
    return None


def _refuse(error: ModelMoraError, trace_id: str) -> Callable[[Behaviour, bool], Behaviour]:
    def make(_behaviour: Behaviour, streams_out: bool) -> Behaviour:
        if streams_out:

            async def refuse_stream(_request: Any, context: Ctx) -> AsyncIterator[Any]:
                await abort(context, error, trace_id)
                yield  # pragma: no cover: makes this an async generator

            return refuse_stream

        async def refuse(_request: Any, context: Ctx) -> Any:
            await abort(context, error, trace_id)

        return refuse

    return make


def peer_address(context: Ctx) -> str:
    """The peer as REST's edge writes it: "127.0.0.1:53122", not grpc's "ipv4:127.0.0.1:53122"."""
    peer = context.peer() or "unknown"
    kind, _, address = peer.partition(":")
    return address if kind in ("ipv4", "ipv6") and address else peer


def _as(principal: Principal, admit: _Admission | None) -> Callable[[Behaviour, bool], Behaviour]:
    def make(behaviour: Behaviour, streams_out: bool) -> Behaviour:
        if streams_out:

            async def run_stream(request: Any, context: Ctx) -> AsyncIterator[Any]:
                token = current_principal.set(principal)
                client = current_client.set(peer_address(context))
                release: Release = _nothing
                try:
                    if admit is not None:
                        release = await admit(principal, context)
                    async for item in behaviour(request, context):
                        yield item
                finally:
                    release()
                    current_client.reset(client)
                    current_principal.reset(token)

            return run_stream

        async def run(request: Any, context: Ctx) -> Any:
            token = current_principal.set(principal)
            client = current_client.set(peer_address(context))
            release: Release = _nothing
            try:
                if admit is not None:
                    release = await admit(principal, context)
                return await behaviour(request, context)
            finally:
                release()
                current_client.reset(client)
                current_principal.reset(token)

        return run

    return make


def _wrap(handler: Handler, make: Callable[[Behaviour, bool], Behaviour]) -> Handler:
    """The same handler (kind, (de)serialisers) with its behaviour wrapped."""
    h: Any = handler
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler, False),
        ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
        ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
        ("stream_stream", grpc.stream_stream_rpc_method_handler, True),
    )
    for attr, build, streams_out in kinds:
        behaviour = getattr(h, attr)
        if behaviour is not None:
            return build(  # type: ignore[no-any-return]
                make(behaviour, streams_out),
                request_deserializer=h.request_deserializer,
                response_serializer=h.response_serializer,
            )
    return handler
