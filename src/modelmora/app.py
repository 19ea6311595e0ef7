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
from modelmora.auth.authenticator import Authenticator
from modelmora.auth.limiter import KeyLimiter, build_limiter
from modelmora.auth.mode import UnsafeBindError, auth_enabled
from modelmora.auth.store import KeyStore
from modelmora.cluster.forwarder import Forwarder
from modelmora.cluster.membership import Membership, check_cluster_settings, new_replica_id
from modelmora.cluster.view import ModelPresence, ReplicaInfo
from modelmora.config import Settings
from modelmora.contracts.runner import RunnerFactory
from modelmora.jobs.dispatcher import JobDispatcher
from modelmora.jobs.service import JobService, build_job_store
from modelmora.lifecycle.manager import ModelManager
from modelmora.lifecycle.runners import process_runner_factory
from modelmora.lifecycle.zygote_pool import worker_source
from modelmora.observability.metrics import Live, Metrics, ModelLive
from modelmora.observability.tracing import build_span_recorder
from modelmora.registry.catalog import ModelState
from modelmora.registry.model_store import Materialiser, open_model_store
from modelmora.registry.paths import roots_of
from modelmora.registry.policy import InstallPolicy
from modelmora.registry.store import RegistryStore
from modelmora.results.store import ResultStore, build_result_store, require_shared
from modelmora.services.catalog_sync import CatalogSync
from modelmora.services.inference import InferenceService
from modelmora.services.management import ManagementService
from modelmora.services.registry import RegistryService

if TYPE_CHECKING:
    from modelmora.api.grpc_server import GrpcServer

log = logging.getLogger("modelmora.app")


class ModelMora:
    """Everything one server process holds. Built without side effects; `lifespan` starts it."""

    def __init__(self, settings: Settings, runner_factory: RunnerFactory = process_runner_factory) -> None:
        self.settings = settings
        # First: a public bind nobody secured must fail before anything is built
        # (UnsafeBindError; `serve` exits 2 with its message).
        auth_on = auth_enabled(settings)
        require_shared(settings)  # several replicas must read each other's results
        check_cluster_settings(settings, auth_on)  # routing: Redis membership, a hop credential
        # Paths in the registry are relative to this node's roots (replicas share the database).
        self.store = RegistryStore(settings.database_url, roots_of(settings))
        self.keys = KeyStore(self.store.engine)
        # One authenticator for both doors (its cache is shared); None: auth off, no check
        # installed at all and every request acts as ANONYMOUS.
        self.auth: Authenticator | None = None
        if auth_on:
            bootstrap = settings.auth.bootstrap_key
            self.auth = Authenticator(
                lookup=self.keys.get,
                bootstrap_key=bootstrap.get_secret_value() if bootstrap is not None else None,
                cache_seconds=settings.auth.cache_seconds,
            )
        spares = worker_source(
            str(settings.resources.worker_start),
            runner_factory is process_runner_factory,
            lambda: [
                (r.task_type.value, r.config.get("adapter")) for r in self.store.list(page_size=10_000)[0]
            ],
        )
        self.metrics = Metrics(__version__)
        self.manager = ModelManager(settings, self.store, runner_factory, spares=spares, metrics=self.metrics)
        self.results: ResultStore = build_result_store(settings)
        spans = build_span_recorder(settings.telemetry.otlp_endpoint, settings.telemetry.service_name)
        # A version whose files this node lacks is fetched from the model store at its load.
        self.model_store = open_model_store(settings)
        if self.model_store is not None:
            self.manager.loader.fetch_files = Materialiser(settings, self.model_store, spans)
        self.inference = InferenceService(settings, self.manager, self.results, spans)
        # The doors (api/) call these two and `inference`, one method per operation.
        # The API's installs obey registry.allowed_sources and testing.* (registry/policy.py).
        self.registry = RegistryService(
            settings, self.store, self.manager, policy=InstallPolicy.from_settings(settings)
        )
        # Catalog writes made anywhere (other replicas, the CLI) reach this replica's models.
        self.catalog_sync = CatalogSync(settings, self.store, self.manager, self.registry)
        # Cluster routing (issue 17): this replica's record in Redis, and the forwarding of
        # requests for models another replica holds. Off without cluster.advertise_url.
        self.replica_id = settings.cluster.replica_id or new_replica_id()
        self.membership = Membership(settings, self.replica_id, self.replica_info, self.replica_shape)
        if settings.cluster.enabled:
            self.inference.forwarder = Forwarder(settings, self.membership, self.presence, self.metrics)
        self.management = ManagementService(
            self.manager, self.inference, self.full_status, self.membership.view
        )
        self.job_store = build_job_store(settings)
        self.dispatcher = JobDispatcher(settings, self.job_store, self.inference, self.results)
        self.jobs = JobService(settings, self.job_store, self.dispatcher, self.results)
        # Per-key rate and concurrency limits: the doors call `limiter.admit(principal)` right
        # after authenticating. None when auth is off or no limit is set.
        self.limiter: KeyLimiter | None = build_limiter(settings, auth_on=auth_on)
        self.ready = False
        self.draining = False
        self.inflight = 0  # HTTP requests in progress, counted by the edge middleware
        self.started_at = time.time()
        # Figures that cost a round trip (job counts, worker stats, result store size): taken
        # by `refresh_figures` before each scrape or status, read by the sync collector.
        self._jobs_by_status: dict[str, int] = {}
        self._result_bytes: int | None = None
        self.metrics.attach_live(self.live_figures)

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
        await self._log_auth()
        await self.manager.start()
        await self.catalog_sync.start()
        # Jobs left queued or processing by a previous run are taken up again from here.
        await self.job_store.open()
        self.dispatcher.start()
        for name in self.settings.lifecycle.preload:
            try:
                await self.manager.load(name, reason="preload")
            except Exception:
                log.exception("preload failed", extra={"model": name})
        self.ready = True
        await self.membership.start()  # after ready: a replica is published once it serves
        log.info(
            "modelmora ready",
            extra={
                "version": __version__,
                "data_dir": str(self.settings.server.data_dir),
                "pid": os.getpid(),
            },
        )

    async def _log_auth(self) -> None:
        if self.auth is None:
            log.info("authentication off", extra={"host": self.settings.server.host})
            return
        keys = await asyncio.to_thread(self.keys.count_usable)
        bootstrap = self.settings.auth.bootstrap_key is not None
        log.info("authentication on", extra={"usable_keys": keys, "bootstrap_key": bootstrap})
        if keys == 0 and not bootstrap:
            log.warning(
                "authentication is on and no API key exists: every call but health is refused "
                "until one is made with `modelmora keys create NAME --scope admin` (or "
                "MODELMORA_AUTH__BOOTSTRAP_KEY is set)"
            )

    async def drain(self) -> None:
        """Readiness turns false and new requests get 503; wait for in-flight requests."""
        self.draining = True
        self.dispatcher.stop_claiming()  # from the first moment, not after the HTTP requests
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
        await self.membership.stop()  # the others stop forwarding here at once
        if self.inference.forwarder is not None:
            await self.inference.forwarder.close()
        # Jobs first: a job still running goes back to the queue instead of failing with
        # SHUTTING_DOWN when the workers stop.
        await self.dispatcher.stop()
        await self.catalog_sync.stop()
        await self.manager.shutdown()
        await self.job_store.close()
        await self.results.close()
        if self.inference.spans is not None:
            self.inference.spans.shutdown()  # flushes the spans still batched
        await asyncio.to_thread(self.store.close)
        log.info("modelmora stopped")

    async def refresh_figures(self) -> None:
        """Ask the workers for their stats and the job store for its counts (each bounded:
        a slow one leaves the previous figures)."""
        timeout = 1.0
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.manager.poll_stats(timeout), timeout + 0.5)
        with contextlib.suppress(Exception):
            self._jobs_by_status = dict(await asyncio.wait_for(self.jobs.counts(), timeout))
        stored_bytes = getattr(self.results, "stored_bytes", None)
        if stored_bytes is not None:
            with contextlib.suppress(Exception):
                self._result_bytes = int(await asyncio.wait_for(stored_bytes(), timeout))

    async def metrics_exposition(self) -> bytes:
        await self.refresh_figures()
        # On the event loop, not a thread: the collector reads the manager's live structures.
        return self.metrics.exposition()

    def live_figures(self) -> Live:
        """The state a scrape reads (read only, on the event loop)."""
        manager = self.manager
        gpu = manager.gpu_bytes_by_model()
        models = []
        for slot in list(manager.slots.values()):
            runner, scheduler = slot.runner, slot.scheduler
            device, gpu_bytes = gpu.get(slot.name, ("", 0))
            models.append(
                ModelLive(
                    name=slot.name,
                    task=slot.record.task_type.value,
                    state=slot.state.value,
                    loaded=runner is not None,
                    queue_by_priority=scheduler.queue_depths() if scheduler is not None else {},
                    in_flight=slot.refs,
                    rss_bytes=runner.rss_bytes() if runner is not None else 0,
                    gpu_bytes=gpu_bytes,
                    device=device or (slot.loaded.device if slot.loaded else ""),
                )
            )
        memory = manager.memory_status()
        probe_devices = getattr(manager.probe, "gpu_devices", None)
        return Live(
            models=models,
            states=tuple(s.value for s in ModelState),
            in_flight=self.inflight,
            queued=manager.admission.queued,
            budget_ram_bytes=memory["budget_ram_bytes"],
            budget_gpu_bytes=memory["budget_gpu_bytes"] or {},
            used_ram_bytes=memory["used_ram_bytes"],
            system_available_bytes=memory["system_available_bytes"],
            spare_rss_bytes=memory["spare"]["rss_bytes"],
            gpus=probe_devices() if probe_devices is not None else [],
            # Exported by one replica only, so that a sum over replicas counts each job once.
            jobs=self._jobs_by_status if self.dispatcher.reports_cluster else {},
            jobs_running=len(self.dispatcher.running),
            jobs_processed=dict(self.dispatcher.counters),
            result_store_bytes=self._result_bytes,
            ready=self.ready and not self.draining,
            uptime_seconds=time.time() - self.started_at,
        )

    def presence(self, name: str) -> ModelPresence | None:
        """This replica's hold on one model, as routing reads it (per request: no copies)."""
        slot = self.manager.slots.get(name)
        if slot is None:
            return None
        scheduler = slot.scheduler
        return ModelPresence(
            name=name,
            state=slot.state.value,
            # Waiting for the model: in its queue, or for its load to end (all its refs then).
            queue_depth=scheduler.queued if scheduler is not None else slot.refs,
            in_flight=slot.refs,
        )

    def replica_shape(self) -> tuple[Any, ...]:
        """What, when it changes, is published at once (checked every 0.1 s: kept cheap)."""
        models = tuple((slot.name, slot.state.value) for slot in self.manager.slots.values())
        return (self.ready and not self.draining, self.draining, models)

    def replica_info(self) -> ReplicaInfo:
        """This replica's record in the cluster view (heartbeated into Redis)."""
        models = []
        for slot in list(self.manager.slots.values()):
            scheduler = slot.scheduler
            models.append(
                ModelPresence(
                    name=slot.name,
                    state=slot.state.value,
                    version=slot.version or slot.record.active_version,
                    queue_depth=scheduler.queued if scheduler is not None else slot.refs,
                    in_flight=slot.refs,
                    device=slot.loaded.device if slot.loaded else None,
                )
            )
        # Not memory_status(): its process-tree figures read /proc/*/smaps (~12 ms a call).
        residency = self.manager.residency
        budget = residency.budget.ram_bytes
        used = sum(r.ram_bytes for r in residency.residents())
        cluster = self.settings.cluster
        return ReplicaInfo(
            id=self.replica_id,
            advertise_url=cluster.advertise_url,
            grpc_url=cluster.grpc_advertise_url,
            heartbeat_at=time.time(),
            version=__version__,
            started_at=self.started_at,
            ready=self.ready and not self.draining,
            draining=self.draining,
            in_flight=self.inflight,
            queued=self.manager.admission.queued,
            memory={
                "budget_ram_bytes": int(budget or 0),
                "used_ram_bytes": int(used or 0),
                "free_ram_bytes": max(0, int(budget or 0) - int(used or 0)),
            },
            models=tuple(models),
        )

    async def full_status(self) -> dict[str, Any]:
        """`status()` with the figures that need a round trip: workers' stats, jobs by status,
        GPU devices (what `GET /api/v1/status`, GetSystemStatus and `modelmora status` show)."""
        await self.refresh_figures()
        body = self.status()
        probe_devices = getattr(self.manager.probe, "gpu_devices", None)
        body["gpus"] = await asyncio.to_thread(probe_devices) if probe_devices is not None else []
        # Cluster-wide counts, the same on every replica (do not add them up: `jobs_running`
        # is this replica's own share).
        body["jobs"] = dict(self._jobs_by_status)
        body["jobs_scope"] = "cluster" if self.settings.jobs.backend == "redis" else "replica"
        body["jobs_running"] = len(self.dispatcher.running)
        body["started_at"] = self.started_at
        return body

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
            "catalog": self.catalog_sync.status(),
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


def _ssl_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's ssl_* options from `server.tls` (none when it has no certificate)."""
    import ssl

    tls = settings.server.tls
    if tls.certfile is None:
        return {}
    for path in (tls.certfile, tls.keyfile, tls.ca_certs):
        if path is not None and not path.is_file():
            raise OSError(f"server.tls: no such file {path}")
    password = tls.keyfile_password
    return {
        "ssl_certfile": str(tls.certfile),
        "ssl_keyfile": str(tls.keyfile),
        "ssl_keyfile_password": password.get_secret_value() if password is not None else None,
        "ssl_ca_certs": str(tls.ca_certs) if tls.ca_certs is not None else None,
        "ssl_cert_reqs": {
            "none": ssl.CERT_NONE,
            "optional": ssl.CERT_OPTIONAL,
            "required": ssl.CERT_REQUIRED,
        }[tls.client_auth],
    }


def serve(settings: Settings) -> None:
    from modelmora.api.rest import asgi_app

    try:
        mm = ModelMora(settings)
        ssl_options = _ssl_options(settings)
    except (UnsafeBindError, OSError) as exc:
        log.error(str(exc))
        sys.exit(2)  # a configuration the operator must change, as for a bad setting
    grpc_server = None
    if settings.server.grpc_enabled:
        from modelmora.api.grpc_server import GrpcServer, run_grpc_only

        if not settings.server.rest_enabled:
            run_grpc_only(mm)
            return
        grpc_server = GrpcServer(mm)
    from modelmora.api.http_protocol import edge_protocol

    app = asgi_app(mm)
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_config=None,  # our structlog setup owns the root logger
        access_log=False,
        loop="auto",
        # httptools with a header timeout, a header size cap and JSON protocol errors
        # (api/http_protocol.py); the body's limits are the edge's (docs/security.md).
        http=edge_protocol(settings.server),
        timeout_keep_alive=max(1, round(settings.server.keep_alive_timeout_seconds)),  # the class's wins
        h11_max_incomplete_event_size=settings.server.max_header_bytes,  # if h11 is ever chosen
        timeout_graceful_shutdown=max(1, int(settings.server.drain_seconds)),
        **ssl_options,
    )
    _DrainingServer(config, mm, grpc_server).run()
