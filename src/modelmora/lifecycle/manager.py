"""Residency: which models have a worker, lazy loads, in-use counts, crash handling.

One load at a time (a global lock taken only on a cache miss); loaded models keep serving
while another loads. Concurrent first requests for one model share a single load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from modelmora.config import Settings
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.inference.batcher import BatchLimits
from modelmora.inference.scheduler import Admission, ModelScheduler
from modelmora.lifecycle.channel import Event, Loaded, LoadSpec
from modelmora.lifecycle.runners import Runner, RunnerFactory
from modelmora.registry.catalog import ModelRecord, ModelState
from modelmora.registry.store import RegistryStore

log = logging.getLogger("modelmora.lifecycle")


@dataclass
class ModelSlot:
    name: str
    record: ModelRecord
    state: ModelState = ModelState.REGISTERED
    runner: Runner | None = None
    scheduler: ModelScheduler | None = None
    loaded: Loaded | None = None
    version: str | None = None
    refs: int = 0
    last_used: float = 0.0
    loaded_at: float = 0.0
    error: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    load_task: asyncio.Task[None] | None = None
    event_handlers: dict[str, Callable[[Event], None]] = field(default_factory=dict)

    def is_ready(self) -> bool:
        return self.state is ModelState.READY

    def status(self, now: float) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state.value,
            "version": self.version or self.record.active_version,
            "task_type": self.record.task_type.value,
            "device": self.loaded.device if self.loaded else None,
            "pid": self.runner.pid if self.runner else None,
            "queued": self.scheduler.queued if self.scheduler else 0,
            "in_flight": self.refs,
            "idle_seconds": round(now - self.last_used, 3) if self.last_used else None,
            "memory": {
                "rss_bytes": self.runner.rss_bytes() if self.runner else 0,
                "gpu_bytes": self.loaded.gpu_bytes if self.loaded else 0,
            },
            "error": self.error,
        }


class ModelManager:
    def __init__(
        self,
        settings: Settings,
        store: RegistryStore,
        runner_factory: RunnerFactory,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.store = store
        self.runner_factory = runner_factory
        self.clock = clock
        self.slots: dict[str, ModelSlot] = {}
        self.admission = Admission(settings.scheduler.queue_size, settings.scheduler.critical_reserve)
        self._load_lock = asyncio.Lock()
        self._closing = False

    # -- lookup ---------------------------------------------------------------------------

    async def record(self, name: str) -> ModelRecord:
        """The model's record: from memory when it is loaded, else from the database (so a
        CLI install is seen by a running server at the next request)."""
        slot = self.slots.get(name)
        if slot is not None and slot.state is ModelState.READY:
            return slot.record
        return await asyncio.to_thread(self.store.get, name)

    # -- use ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(self, name: str, record: ModelRecord | None = None) -> AsyncIterator[ModelSlot]:
        """Hold a model loaded for the duration of a request (its ref count keeps it from
        being unloaded)."""
        slot = await self.acquire(name, record)
        try:
            yield slot
        finally:
            slot.refs -= 1
            slot.last_used = self.clock()

    async def acquire(self, name: str, record: ModelRecord | None = None) -> ModelSlot:
        if self._closing:
            raise ModelMoraError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        slot = self.slots.get(name)
        if slot is None or slot.state is not ModelState.READY:
            slot = await self._ensure_loaded(name, record)
        slot.refs += 1
        slot.last_used = self.clock()
        return slot

    async def _ensure_loaded(self, name: str, record: ModelRecord | None) -> ModelSlot:
        slot = self.slots.get(name)
        if slot is None:
            if record is None:
                record = await asyncio.to_thread(self.store.get, name)
            slot = ModelSlot(name, record)
            self.slots[name] = slot
        while slot.state is not ModelState.READY:
            if slot.load_task is None:
                now = self.clock()
                if slot.error is not None and now < slot.retry_at:
                    raise ModelMoraError(
                        ErrorCode.MODEL_LOAD_FAILED,
                        f"model {name!r} failed to load: {slot.error}",
                        {"model": name, "reason": slot.error, "failures": slot.failures},
                        retry_after=round(slot.retry_at - now, 3),
                    )
                slot.load_task = asyncio.create_task(self._load(slot), name=f"load-{name}")
            task = slot.load_task
            # Shield: a caller that gives up must not cancel the load others wait for.
            await asyncio.shield(task)
            if not slot.is_ready():
                raise ModelMoraError(
                    ErrorCode.MODEL_LOAD_FAILED,
                    f"model {name!r} failed to load: {slot.error}",
                    {"model": name, "reason": slot.error, "failures": slot.failures},
                    retry_after=max(0.0, round(slot.retry_at - self.clock(), 3)),
                )
        return slot

    async def _load(self, slot: ModelSlot) -> None:
        try:
            async with self._load_lock:
                if self._closing:
                    slot.error = "the server is shutting down"
                    return
                await self._start_worker(slot)
        finally:
            slot.load_task = None

    async def _start_worker(self, slot: ModelSlot) -> None:
        name = slot.name
        # Re-read: `use`, `update` or a reinstall may have changed the record since.
        try:
            slot.record = await asyncio.to_thread(self.store.get, name)
        except ModelMoraError as exc:
            slot.error, slot.state = exc.message, ModelState.FAILED
            self.slots.pop(name, None)
            return
        record = slot.record
        version = record.version()
        config = record.config
        self._transition(slot, ModelState.LOADING, "first request" if not slot.failures else "retry")
        spec = LoadSpec(
            path=version.path,
            task_type=record.task_type.value,
            device=str(config.get("device") or self.settings.resources.default_device),
            dtype=str(config.get("dtype") or self.settings.resources.default_dtype),
            adapter=config.get("adapter") or None,
            options=dict(config.get("options") or {}),
            health_check=self.settings.lifecycle.health_check,
        )
        runner = self.runner_factory(
            name, lambda ev: self._on_event(slot, ev), lambda why: self._on_exit(slot, runner, why)
        )
        started = time.perf_counter()
        try:
            loaded = await runner.start(spec, self.settings.lifecycle.load_timeout_seconds)
        except ModelMoraError as exc:
            slot.failures += 1
            backoff = self.settings.lifecycle.load_backoff_seconds * (2 ** (slot.failures - 1))
            slot.retry_at = self.clock() + min(backoff, 300.0)
            slot.error = exc.message
            self._transition(slot, ModelState.FAILED, exc.message)
            return
        sched = self.settings.scheduler
        slot.runner, slot.loaded, slot.version = runner, loaded, version.version
        slot.scheduler = ModelScheduler(
            name=name,
            runner=runner,
            limits=BatchLimits(
                int(config.get("max_batch_size") or sched.max_batch_size),
                float(config.get("max_wait_ms", sched.max_wait_ms)),
            ),
            admission=self.admission,
            queue_size=sched.queue_size_per_model,
            aging_seconds=sched.aging_seconds,
            clock=self.clock,
        )
        slot.scheduler.start()
        slot.error, slot.failures, slot.loaded_at = None, 0, self.clock()
        self._transition(
            slot, ModelState.READY, f"loaded in {time.perf_counter() - started:.2f} s on {loaded.device}"
        )
        memory = {"rss_bytes": runner.rss_bytes() or loaded.rss_bytes, "gpu_bytes": loaded.gpu_bytes}
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.store.set_memory, name, memory)

    def _transition(self, slot: ModelSlot, state: ModelState, reason: str) -> None:
        previous, slot.state = slot.state, state
        log.info(
            "model state changed",
            extra={"model": slot.name, "from": previous.value, "to": state.value, "reason": reason},
        )

    def _on_event(self, slot: ModelSlot, event: Event) -> None:
        handler = slot.event_handlers.get(event.request_id)
        if handler is not None:
            handler(event)

    def _on_exit(self, slot: ModelSlot, runner: Runner, reason: str) -> None:
        """A worker ended on its own (crash, OOM kill): fail its requests at once."""
        if slot.runner is not runner:
            return
        error = ModelMoraError(
            ErrorCode.WORKER_DIED, f"the worker of {slot.name!r} ended: {reason}", {"model": slot.name}
        )
        if slot.scheduler is not None:
            asyncio.get_running_loop().create_task(slot.scheduler.stop(error))
        slot.runner, slot.scheduler, slot.loaded = None, None, None
        slot.error = reason
        self._transition(slot, ModelState.FAILED, f"worker died: {reason}")
        slot.error = None  # the next request starts it again

    # -- control --------------------------------------------------------------------------

    async def load(self, name: str) -> ModelSlot:
        slot = await self.acquire(name)
        slot.refs -= 1
        return slot

    async def unload(
        self, name: str, reason: str = "requested", force: bool = False, code: ErrorCode = ErrorCode.CANCELLED
    ) -> bool:
        slot = self.slots.get(name)
        if slot is None or slot.runner is None:
            return False
        if slot.refs and not force:
            raise ModelMoraError(
                ErrorCode.MODEL_LOADED, f"model {name!r} has requests in flight", {"in_flight": slot.refs}
            )
        runner, scheduler = slot.runner, slot.scheduler
        slot.runner, slot.scheduler = None, None
        self._transition(slot, ModelState.UNLOADING, reason)
        if scheduler is not None:
            await scheduler.stop(ModelMoraError(code, f"model {name!r} was unloaded: {reason}"))
        await runner.close(self.settings.lifecycle.unload_grace_seconds)
        slot.loaded = None
        self._transition(slot, ModelState.UNLOADED, reason)
        return True

    def in_flight(self) -> int:
        return sum(slot.refs for slot in self.slots.values())

    def statuses(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [slot.status(now) for slot in self.slots.values()]

    def forget(self, name: str) -> None:
        self.slots.pop(name, None)

    async def shutdown(self) -> None:
        self._closing = True
        for name in list(self.slots):
            with contextlib.suppress(Exception):
                await self.unload(name, "server shutdown", force=True, code=ErrorCode.SHUTTING_DOWN)
