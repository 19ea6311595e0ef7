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

from modelmora.api.grpc_services import Door, InferenceServicer, ManagementServicer, RegistryServicer
from modelmora.v1 import modelmora_pb2 as pb
from modelmora.v1 import modelmora_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from modelmora.app import ModelMora

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
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", cfg.grpc_max_receive_message_bytes),
                ("grpc.max_send_message_length", cfg.grpc_max_send_message_bytes),
                # A busy port must fail the start, not be silently shared with another server.
                ("grpc.so_reuseport", 0),
            ]
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
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot bind gRPC to {address}: {exc}") from None
        if port == 0:
            raise OSError(f"cannot bind gRPC to {address}")
        await server.start()
        self._server, self.port = server, port
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("gRPC serving", extra={"address": _address(cfg.host, port)})
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
