"""Composition root: build the registry, lifecycle, scheduler and APIs; start, drain, stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI

from modelmora import __version__
from modelmora.config import Settings
from modelmora.jobs.dispatcher import JobDispatcher
from modelmora.jobs.results import ResultStore, build_result_store
from modelmora.jobs.service import JobService, build_job_store
from modelmora.lifecycle.manager import ModelManager
from modelmora.lifecycle.runners import RunnerFactory, process_runner_factory
from modelmora.lifecycle.spare import SparePool
from modelmora.registry.store import RegistryStore
from modelmora.service import InferenceService, RegistryService

if TYPE_CHECKING:
    from modelmora.api.grpc_server import GrpcServer

log = logging.getLogger("modelmora.app")


class ModelMora:
    """Everything one server process holds. Built without side effects; `lifespan` starts it."""

    def __init__(self, settings: Settings, runner_factory: RunnerFactory = process_runner_factory) -> None:
        self.settings = settings
        self.store = RegistryStore(settings.database_url)
        spares = SparePool(settings.resources.warm_spare and runner_factory is process_runner_factory)
        self.manager = ModelManager(settings, self.store, runner_factory, spares=spares)
        self.results: ResultStore = build_result_store(settings)
        self.inference = InferenceService(settings, self.manager, self.results)
        self.registry = RegistryService(settings, self.store, self.manager)
        self.job_store = build_job_store(settings)
        self.dispatcher = JobDispatcher(settings, self.job_store, self.inference, self.results)
        self.jobs = JobService(settings, self.job_store, self.dispatcher, self.results, self.manager)
        self.ready = False
        self.draining = False
        self.inflight = 0  # HTTP requests in progress, counted by the edge middleware
        self.started_at = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        self.settings.server.data_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.store.create_schema)
        await self.manager.start()
        # Jobs left queued or processing by a previous run are taken up again from here.
        await self.job_store.open()
        self.dispatcher.start()
        for name in self.settings.lifecycle.preload:
            try:
                await self.manager.load(name, reason="preload")
            except Exception:
                log.exception("preload failed", extra={"model": name})
        self.ready = True
        log.info(
            "modelmora ready",
            extra={
                "version": __version__,
                "data_dir": str(self.settings.server.data_dir),
                "pid": os.getpid(),
            },
        )

    async def drain(self) -> None:
        """Readiness turns false and new requests get 503; wait for in-flight requests."""
        self.draining = True
        deadline = time.monotonic() + self.settings.server.drain_seconds
        log.info("draining", extra={"in_flight": self.inflight})
        while self.inflight > 0 and time.monotonic() < deadline:  # noqa: ASYNC110 - a counter, polled briefly
            await asyncio.sleep(0.05)
        await self.dispatcher.drain(deadline)
        if self.inflight or self.dispatcher.running:
            log.warning(
                "drain timed out",
                extra={"in_flight": self.inflight, "jobs_running": len(self.dispatcher.running)},
            )

    async def stop(self) -> None:
        self.ready = False
        # Jobs first: a job still running goes back to the queue instead of failing with
        # SHUTTING_DOWN when the workers stop.
        await self.dispatcher.stop()
        await self.manager.shutdown()
        await self.job_store.close()
        await self.results.close()
        await asyncio.to_thread(self.store.close)
        log.info("modelmora stopped")

    def status(self) -> dict[str, Any]:
        models = self.manager.statuses()
        return {
            "version": __version__,
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "ready": self.ready and not self.draining,
            "draining": self.draining,
            "in_flight": self.inflight,
            "queued": self.manager.admission.queued,
            "models": models,
            "workers": sum(1 for m in models if m["pid"] is not None),
            "memory": self.manager.memory_status(),
            "counters": dict(self.manager.counters),
        }


def create_app(settings: Settings, runner_factory: RunnerFactory = process_runner_factory) -> Any:
    """The ASGI application uvicorn serves (for embedding ModelMora in another server)."""
    from modelmora.api.rest import asgi_app

    return asgi_app(ModelMora(settings, runner_factory))


class _DrainingServer(uvicorn.Server):
    """The first SIGTERM/SIGINT drains (ready=false, 503 for new requests, in-flight ones
    finish) before uvicorn stops; a second one stops at once. The gRPC server, when enabled,
    starts once the lifespan has started ModelMora, drains with REST and stops before it."""

    def __init__(self, config: uvicorn.Config, mm: ModelMora, grpc_server: GrpcServer | None = None) -> None:
        super().__init__(config)
        self.mm = mm
        self.grpc = grpc_server
        self._drain_task: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.grpc is not None and not self.should_exit:
            try:
                await self.grpc.start()
            except OSError as exc:  # as uvicorn does for a busy REST port
                log.error(str(exc))
                await self.lifespan.shutdown()
                sys.exit(3)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.grpc is not None:
            await self.grpc.stop(1.0)  # in-flight calls were drained already
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_task is not None or self.should_exit:
            log.warning("second signal: stopping without waiting for requests in flight")
            self.should_exit = self.force_exit = True
            return
        log.info("signal received, draining", extra={"signal": signal.Signals(sig).name})
        loop = asyncio.get_event_loop()
        self._drain_task = loop.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        if self.grpc is not None:
            await self.grpc.drain()
        await self.mm.drain()
        self.should_exit = True


def serve(settings: Settings) -> None:
    from modelmora.api.rest import asgi_app

    mm = ModelMora(settings)
    grpc_server = None
    if settings.server.grpc_enabled:
        from modelmora.api.grpc_server import GrpcServer, run_grpc_only

        if not settings.server.rest_enabled:
            run_grpc_only(mm)
            return
        grpc_server = GrpcServer(mm)
    app = asgi_app(mm)
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_config=None,  # our structlog setup owns the root logger
        access_log=False,
        loop="auto",
        http="auto",
        timeout_graceful_shutdown=max(1, int(settings.server.drain_seconds)),
    )
    _DrainingServer(config, mm, grpc_server).run()
