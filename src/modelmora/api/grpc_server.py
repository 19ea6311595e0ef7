"""The gRPC server (grpc.aio) in the same process and event loop as uvicorn.

Serves `modelmora.v1` (api/grpc_services.py), the standard `grpc.health.v1` health service and
server reflection. Its calls count in `ModelMora.inflight`, so one drain waits for REST and gRPC
alike; health turns NOT_SERVING when the drain starts.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING, Any, cast

import grpc
from grpc_health.v1 import _async as health_aio  # the aio HealthServicer (health.aio)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from modelmora.api.grpc_auth import AuthInterceptor
from modelmora.api.grpc_services import Door, InferenceServicer, ManagementServicer, RegistryServicer
from modelmora.v1 import modelmora_pb2 as pb
from modelmora.v1 import modelmora_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from modelmora.app import ModelMora
    from modelmora.config import TlsSettings

log = logging.getLogger("modelmora.api.grpc")

SERVICE_NAMES = tuple(
    pb.DESCRIPTOR.services_by_name[name].full_name for name in pb.DESCRIPTOR.services_by_name
)


class _Handlers:
    """Stands in for the server while the generated `add_..._to_server` registers: keeps the
    method handlers it builds, so one of them can be swapped before the real registration."""

    handlers: dict[str, Any]

    def add_generic_rpc_handlers(self, _handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, _service: str, handlers: dict[str, Any]) -> None:
        self.handlers = handlers


def add_inference_service(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """The generated registration, except that GetJobResult has no response serializer: its
    servicer yields `JobResultChunk` messages already encoded (the same bytes on the wire)."""
    recorder = _Handlers()
    pb_grpc.add_InferenceServiceServicer_to_server(servicer, cast(Any, recorder))
    handlers = recorder.handlers
    handlers["GetJobResult"] = grpc.unary_stream_rpc_method_handler(
        servicer.GetJobResult,
        request_deserializer=pb.GetJobResultRequest.FromString,
        response_serializer=None,  # bytes pass through as they are
    )
    name = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    cast(Any, server).add_registered_method_handlers(name, handlers)  # grpcio >= 1.63, not in the stubs


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """`server.tls` as gRPC credentials; None: plaintext. grpcio has no "ask for a client
    certificate but accept none" mode: `client_auth: optional` does not ask on this door."""
    if tls.certfile is None or tls.keyfile is None:
        return None
    try:
        pair = (tls.keyfile.read_bytes(), tls.certfile.read_bytes())
        roots = tls.ca_certs.read_bytes() if tls.ca_certs is not None else None
    except OSError as exc:
        raise OSError(f"server.tls: {exc}") from None
    return grpc.ssl_server_credentials(
        [pair],
        root_certificates=roots if tls.client_auth == "required" else None,
        require_client_auth=tls.client_auth == "required",
    )


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcServer:
    def __init__(self, mm: ModelMora) -> None:
        self.mm = mm
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health_aio.HealthServicer()

    async def start(self) -> int:
        """Bind and serve; returns the bound port (useful when `grpc_port` is 0)."""
        cfg = self.mm.settings.server
        # The key check, only when auth is on: an interceptor costs every call.
        interceptors = (
            [AuthInterceptor(self.mm.auth, self.mm.metrics, self.mm.limiter)]
            if self.mm.auth is not None
            else []
        )
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", cfg.grpc_max_receive_message_bytes),
                ("grpc.max_send_message_length", cfg.grpc_max_send_message_bytes),
                # A busy port must fail the start, not be silently shared with another server.
                ("grpc.so_reuseport", 0),
            ],
        )
        door = Door(self.mm)
        add_inference_service(InferenceServicer(door), server)
        pb_grpc.add_RegistryServiceServicer_to_server(RegistryServicer(door), server)
        pb_grpc.add_ManagementServiceServicer_to_server(ManagementServicer(door), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = _address(cfg.host, cfg.grpc_port)
        credentials = server_credentials(cfg.tls)
        try:
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot bind gRPC to {address}: {exc}") from None
        if port == 0:
            raise OSError(f"cannot bind gRPC to {address}")
        await server.start()
        self._server, self.port = server, port
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("gRPC serving", extra={"address": _address(cfg.host, port), "tls": credentials is not None})
        return port

    async def drain(self) -> None:
        """Health answers NOT_SERVING from now on; new calls are refused by the door."""
        await self._health.enter_graceful_shutdown()

    async def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None


def run_grpc_only(mm: ModelMora) -> None:
    """`serve` with REST turned off: the same start, drain and stop, without uvicorn. The
    first SIGTERM/SIGINT drains, a second stops at once."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        draining: list[asyncio.Task[None]] = []
        grpc_server = GrpcServer(mm)

        async def drain_then_stop() -> None:
            await grpc_server.drain()
            await mm.drain()
            stop.set()

        def on_signal(sig: signal.Signals) -> None:
            if draining:
                log.warning("second signal: stopping without waiting for requests in flight")
                stop.set()
                return
            log.info("signal received, draining", extra={"signal": sig.name})
            draining.append(loop.create_task(drain_then_stop()))

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        await mm.start()
        try:
            await grpc_server.start()
            await stop.wait()
        finally:
            await grpc_server.stop(1.0)
            await mm.stop()

    asyncio.run(main())
