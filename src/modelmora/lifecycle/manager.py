"""Residency: which models have a worker, and the operations on them.

`ModelManager` is what the services call (acquire/release around a request, load, unload,
status); it owns the slots (`lifecycle/state.py`) and composes the load path
(`lifecycle/loading.py`), the memory view (`lifecycle/residency.py`) and the keep-alive
reaper (`lifecycle/keepalive.py`). A model with requests in flight or queued is never evicted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from modelmora.config import Settings
from modelmora.contracts.runner import RunnerFactory
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.inference.scheduler import Admission
from modelmora.lifecycle.eviction import SPARE, Budget
from modelmora.lifecycle.keepalive import KeepAliveReaper
from modelmora.lifecycle.loading import Loader
from modelmora.lifecycle.memory import MemoryProbe, SystemProbe
from modelmora.lifecycle.residency import Residency
from modelmora.lifecycle.spare import SparePool, WorkerSource
from modelmora.lifecycle.state import ModelSlot, UnloadKind, transition
from modelmora.observability.metrics import Metrics
from modelmora.registry.catalog import ModelRecord, ModelState
from modelmora.registry.store import RegistryStore

log = logging.getLogger("modelmora.lifecycle")


class ModelManager:
    def __init__(
        self,
        settings: Settings,
        store: RegistryStore,
        runner_factory: RunnerFactory,
        clock: Callable[[], float] = time.monotonic,
        probe: MemoryProbe | None = None,
        spares: WorkerSource | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.store = store
        self.runner_factory = runner_factory
        self.clock = clock
        self.probe = probe or SystemProbe()
        self.spares: WorkerSource = spares or SparePool(enabled=False)
        self.slots: dict[str, ModelSlot] = {}
        self._draining: set[asyncio.Task[None]] = set()  # workers replaced, finishing their work
        self.admission = Admission(settings.scheduler.queue_size, settings.scheduler.critical_reserve)
        self.counters = {"loads": 0, "load_failures": 0, "unloads": 0, "evictions": 0, "crashes": 0}
        self.residency = Residency(settings, self.slots, self.probe, self.spares)
        self.spares.fits = self.residency.spare_fits
        self.loader = Loader(
            settings,
            store,
            runner_factory,
            clock,
            self.metrics,
            self.spares,
            self.residency,
            self.admission,
            self.counters,
            self._evict,
        )
        self.reaper = KeepAliveReaper(
            self.residency,
            clock,
            lambda name, reason: self.unload(name, reason, kind=UnloadKind.KEEP_ALIVE),
            self.spares,
            self.loader.lock,
            lambda name, reason: self.unload(name, reason, kind=UnloadKind.MEMORY),
        )

    @property
    def budget(self) -> Budget:
        return self.residency.budget

    async def start(self) -> None:
        self.spares.fill()
        self.reaper.start()

    # -- lookup ---------------------------------------------------------------------------

    async def record(self, name: str) -> ModelRecord:
        """The model's record: from memory when it is loaded, else from the database (so a
        CLI install is seen by a running server at the next request)."""
        slot = self.slots.get(name)
        if slot is not None and slot.is_ready():
            return slot.record
        return await asyncio.to_thread(self.store.get, name)

    # -- use ------------------------------------------------------------------------------

    async def acquire(
        self,
        name: str,
        record: ModelRecord | None = None,
        deadline: float | None = None,
        reason: str = "first request",
    ) -> ModelSlot:
        """The model's slot, loaded, with a reference held: it is neither evicted nor
        reaped until `release`."""
        if self.loader.closing:
            raise ModelMoraError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        slot = self.slots.get(name)
        if slot is None or not slot.is_ready():
            if slot is None:
                if record is None:
                    record = await asyncio.to_thread(self.store.get, name)
                slot = self.slots.setdefault(name, ModelSlot(name, record))
            await self.loader.ensure_loaded(slot, deadline, reason)
        slot.refs += 1
        slot.last_used = self.clock()
        return slot

    def release(self, slot: ModelSlot, keep_alive: float | None = None) -> None:
        slot.refs -= 1
        slot.last_used = self.clock()
        if keep_alive is not None:
            slot.keep_alive = keep_alive
        if slot.refs == 0:
            self.loader.idle.set()
            if self.residency.keep_alive_of(slot) == 0:
                self.reaper.wake.set()

    # -- control --------------------------------------------------------------------------

    async def load(self, name: str, reason: str = "explicit load") -> ModelSlot:
        # Bounded like any request: a load waiting for memory gives up with INSUFFICIENT_MEMORY.
        deadline = self.clock() + self.settings.lifecycle.load_timeout_seconds
        slot = await self.acquire(name, deadline=deadline, reason=reason)
        self.release(slot)
        return slot

    async def unload(
        self,
        name: str,
        reason: str | None = None,
        force: bool = False,
        code: ErrorCode = ErrorCode.CANCELLED,
        *,
        kind: UnloadKind = UnloadKind.REQUESTED,
    ) -> bool:
        """Stop the model's worker. `kind` says why (the metric's label); `reason` is the
        text for logs and for the requests it fails (default: the kind)."""
        slot = self.slots.get(name)
        if slot is None or slot.runner is None:
            return False
        if slot.busy and not force:
            raise ModelMoraError(
                ErrorCode.MODEL_LOADED,
                f"model {name!r} has requests in flight",
                {"in_flight": slot.refs, "queued": slot.scheduler.queued if slot.scheduler else 0},
            )
        text = reason or kind.value
        runner, scheduler = slot.runner, slot.scheduler
        slot.runner, slot.scheduler = None, None
        transition(slot, ModelState.UNLOADING, text)
        if scheduler is not None:
            await scheduler.stop(ModelMoraError(code, f"model {name!r} was unloaded: {text}"))
        await runner.close(self.settings.lifecycle.unload_grace_seconds)
        slot.loaded, slot.keep_alive, slot.stats = None, None, None
        self.counters["unloads"] += 1
        self.metrics.unloads.labels(name, kind.value).inc()
        transition(slot, ModelState.UNLOADED, text)
        self.loader.idle.set()
        return True

    async def retire(self, name: str, reason: str) -> bool:
        """The catalog changed under a loaded model (another version made active, a setting
        the worker was started with): the next request loads it anew, while the old worker
        drains what it was given (bounded by `server.drain_seconds`) and then stops. Its
        memory is not counted for the new load meanwhile. False: nothing was loaded."""
        slot = self.slots.get(name)
        if slot is None or slot.runner is None:
            return False
        if not slot.busy:
            return await self.unload(name, reason, kind=UnloadKind.REPLACED)
        runner, scheduler = slot.runner, slot.scheduler
        slot.runner, slot.scheduler, slot.loaded, slot.stats = None, None, None, None
        transition(slot, ModelState.UNLOADED, f"{reason} (the old worker drains)")
        self.counters["unloads"] += 1
        self.metrics.unloads.labels(name, UnloadKind.REPLACED.value).inc()

        async def drain() -> None:
            deadline = self.clock() + self.settings.server.drain_seconds
            while (  # noqa: ASYNC110 - the scheduler has no event for "idle"; polled briefly
                scheduler is not None
                and scheduler.busy
                and self.clock() < deadline
                and not self.loader.closing
            ):
                await asyncio.sleep(0.05)
            if scheduler is not None:
                await scheduler.stop(
                    ModelMoraError(ErrorCode.CANCELLED, f"model {name!r} was replaced: {reason}")
                )
            await runner.close(self.settings.lifecycle.unload_grace_seconds)
            log.info("replaced worker drained", extra={"model": name, "reason": reason})
            self.loader.idle.set()

        task = asyncio.create_task(drain(), name=f"drain-{name}")
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)
        return True

    async def _evict(self, name: str, reason: str) -> None:
        if name == SPARE:
            freed = await self.spares.discard()
            log.info(f"{self.spares.label} given up for memory", extra={"freed_mb": freed // 2**20})
            return
        self.counters["evictions"] += 1
        self.metrics.evictions.labels(name).inc()
        await self.unload(name, f"evicted: {reason}", kind=UnloadKind.EVICTION)

    def forget(self, name: str) -> None:
        self.slots.pop(name, None)

    async def shutdown(self) -> None:
        self.loader.closing = True
        loads = [slot.load_task for slot in self.slots.values() if slot.load_task is not None]
        for task in loads:
            task.cancel()
        await asyncio.gather(*loads, return_exceptions=True)
        await self.reaper.stop()
        await asyncio.gather(*self._draining, return_exceptions=True)
        for name in list(self.slots):
            with contextlib.suppress(Exception):
                await self.unload(
                    name,
                    "server shutdown",
                    force=True,
                    code=ErrorCode.SHUTTING_DOWN,
                    kind=UnloadKind.SHUTDOWN,
                )
        await self.spares.close()

    # -- status ---------------------------------------------------------------------------

    def in_flight(self) -> int:
        return sum(slot.refs for slot in self.slots.values())

    def statuses(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [slot.status(now) for slot in self.slots.values()]

    def memory_status(self) -> dict[str, Any]:
        return self.residency.memory_status()

    def gpu_bytes_by_model(self) -> dict[str, tuple[str, int]]:
        return self.residency.gpu_bytes_by_model()

    async def poll_stats(self, timeout: float = 1.0) -> None:
        """Ask every worker for its figures (over the channel; answered even mid-batch). A
        worker that does not answer in time keeps its previous figures."""
        slots = [s for s in self.slots.values() if s.runner is not None and s.runner.alive]

        async def one(slot: ModelSlot) -> None:
            runner = slot.runner
            if runner is None:
                return
            with contextlib.suppress(Exception):
                slot.stats = await runner.stats(timeout)

        await asyncio.gather(*(one(s) for s in slots))
