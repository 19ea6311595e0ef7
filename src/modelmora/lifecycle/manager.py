"""Residency: which models have a worker, lazy loads, memory budgets, keep-alive, crashes.

One load at a time (a lock taken only on a cache miss); loaded models keep serving while
another loads. Concurrent first requests for one model share a single load. Before a load the
pure `plan_load` decides, over a snapshot, whether the model fits, which idle models to evict
(the warm spare first, then least recently used), or whether to wait for a busy one to become
idle. A model with requests in flight or queued is never evicted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelmora.config import Settings
from modelmora.contracts.channel import Event, Loaded, LoadSpec, WorkerStats
from modelmora.contracts.runner import Runner, RunnerFactory
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.inference.batcher import BatchLimits
from modelmora.inference.scheduler import Admission, ModelScheduler
from modelmora.lifecycle.eviction import SPARE, Budget, Need, Plan, Resident, expired, plan_load
from modelmora.lifecycle.memory import (
    CUDA_CONTEXT_BYTES,
    TORCH_WORKER_BASE_BYTES,
    MemoryProbe,
    SystemProbe,
    accounted_bytes,
    budget_from_settings,
    estimate_need,
    fork_measurements,
    memory_breakdown,
    process_tree_memory,
    weights_bytes,
)
from modelmora.lifecycle.spare import SparePool, WorkerSource
from modelmora.observability.metrics import Metrics
from modelmora.registry.catalog import ModelRecord, ModelState
from modelmora.registry.store import RegistryStore
from modelmora.tasks.base import uses_spare

log = logging.getLogger("modelmora.lifecycle")

# A worker that dies this soon after its load is crash-looping: back off before the next start.
CRASH_LOOP_SECONDS = 60.0
MAX_BACKOFF_SECONDS = 300.0


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
    keep_alive: float | None = None  # set by a request's keep_alive; None: the model's default
    error: str | None = None
    failures: int = 0
    crashes: int = 0
    retry_at: float = 0.0
    waiters: int = 0
    memory_plan: Plan | None = None  # set while the load waits for memory
    load_task: asyncio.Task[None] | None = None
    stats: WorkerStats | None = None  # the worker's last answer to `stats` (see poll_stats)
    event_handlers: dict[str, Callable[[Event], None]] = field(default_factory=dict)

    def is_ready(self) -> bool:
        return self.state is ModelState.READY

    @property
    def busy(self) -> bool:
        return self.refs > 0 or (self.scheduler is not None and self.scheduler.busy)

    def _reported_gpu_bytes(self) -> int:
        if self.loaded is None:
            return 0
        return self.stats.gpu_bytes if self.stats is not None else self.loaded.gpu_bytes

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
            "keep_alive_seconds": self.keep_alive,
            "memory": {
                "rss_bytes": self.runner.rss_bytes() if self.runner else 0,
                **(memory_breakdown(self.runner) if self.runner else {}),
                "gpu_bytes": self._reported_gpu_bytes(),
            },
            "failures": self.failures,
            "error": self.error,
        }


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
        self.spares.fits = self._spare_fits
        self.budget: Budget = budget_from_settings(settings.resources, self.probe)
        self.slots: dict[str, ModelSlot] = {}
        self.admission = Admission(settings.scheduler.queue_size, settings.scheduler.critical_reserve)
        self.counters = {"loads": 0, "load_failures": 0, "unloads": 0, "evictions": 0, "crashes": 0}
        self._load_lock = asyncio.Lock()
        self._idle = asyncio.Event()  # set whenever a model may have become evictable
        self._reap_wake = asyncio.Event()
        self._reaper: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        self.spares.fill()
        self._reaper = asyncio.create_task(self._reap_loop(), name="keep-alive-reaper")

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
        if self._closing:
            raise ModelMoraError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        slot = self.slots.get(name)
        if slot is None or not slot.is_ready():
            slot = await self._ensure_loaded(name, record, deadline, reason)
        slot.refs += 1
        slot.last_used = self.clock()
        return slot

    def release(self, slot: ModelSlot, keep_alive: float | None = None) -> None:
        slot.refs -= 1
        slot.last_used = self.clock()
        if keep_alive is not None:
            slot.keep_alive = keep_alive
        if slot.refs == 0:
            self._idle.set()
            if self._keep_alive_of(slot) == 0:
                self._reap_wake.set()

    async def _ensure_loaded(
        self, name: str, record: ModelRecord | None, deadline: float | None, reason: str
    ) -> ModelSlot:
        slot = self.slots.get(name)
        if slot is None:
            if record is None:
                record = await asyncio.to_thread(self.store.get, name)
            slot = ModelSlot(name, record)
            self.slots[name] = slot
        while not slot.is_ready():
            if slot.load_task is None:
                now = self.clock()
                if slot.error is not None and now < slot.retry_at:
                    raise self._load_failed(slot)
                slot.load_task = asyncio.create_task(self._load(slot, reason), name=f"load-{name}")
            task = slot.load_task
            slot.waiters += 1
            try:
                timeout = None if deadline is None else max(0.0, deadline - self.clock())
                # Shield: a caller that gives up must not cancel the load others wait for.
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except TimeoutError:
                raise self._gave_up_waiting(slot) from None
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if task.cancelled() and current is not None and not current.cancelling():
                    continue  # that load was abandoned just before we came: start our own
                raise
            finally:
                slot.waiters -= 1
                if slot.waiters == 0 and slot.memory_plan is not None and not task.done():
                    task.cancel()  # waiting for memory, and nobody wants the model any more
            if not slot.is_ready():
                raise self._load_failed(slot)
        return slot

    def _load_failed(self, slot: ModelSlot) -> ModelMoraError:
        if slot.memory_plan is not None and slot.memory_plan.action == "impossible":
            return _insufficient(slot.name, slot.memory_plan)
        return ModelMoraError(
            ErrorCode.MODEL_LOAD_FAILED,
            f"model {slot.name!r} failed to load: {slot.error}",
            {"model": slot.name, "reason": slot.error, "failures": slot.failures, "state": slot.state.value},
            retry_after=max(1.0, round(slot.retry_at - self.clock(), 3)),
        )

    def _gave_up_waiting(self, slot: ModelSlot) -> ModelMoraError:
        if slot.memory_plan is not None:
            return _insufficient(slot.name, slot.memory_plan)
        if slot.error is not None:
            return self._load_failed(slot)
        return ModelMoraError(
            ErrorCode.INFERENCE_TIMEOUT,
            f"the deadline passed while model {slot.name!r} was loading",
            {"model": slot.name, "state": slot.state.value},
        )

    # -- loading --------------------------------------------------------------------------

    async def _load(self, slot: ModelSlot, reason: str) -> None:
        """Load with retries: each failure (including a failed health check) backs off
        exponentially; after the last one, requests get MODEL_LOAD_FAILED until `retry_at`."""
        lifecycle = self.settings.lifecycle
        slot.memory_plan = None
        try:
            for attempt in range(lifecycle.load_retries + 1):
                if self._closing:
                    slot.error = "the server is shutting down"
                    return
                try:
                    await self._load_once(slot, reason if not attempt else f"retry {attempt}")
                    return
                except ModelMoraError as exc:
                    if exc.code is ErrorCode.INSUFFICIENT_MEMORY:
                        slot.error = exc.message
                        self._transition(slot, ModelState.FAILED, exc.message)
                        return
                    slot.failures += 1
                    slot.error = exc.message
                    self.counters["load_failures"] += 1
                    self.metrics.loads.labels(slot.name, "failure").inc()
                    unhealthy = exc.message.startswith("health check failed")
                    self._transition(
                        slot, ModelState.UNHEALTHY if unhealthy else ModelState.FAILED, exc.message
                    )
                    backoff = _backoff(lifecycle.load_backoff_seconds, slot.failures)
                    slot.retry_at = self.clock() + backoff
                    if attempt < lifecycle.load_retries:
                        await asyncio.sleep(backoff)
        except asyncio.CancelledError:
            reason = "nobody waits for it any more" if not self._closing else "server shutdown"
            self._transition(slot, ModelState.UNLOADED, f"load abandoned: {reason}")
            raise
        finally:
            slot.load_task = None

    async def _load_once(self, slot: ModelSlot, reason: str) -> None:
        # Re-read: `use`, `update` or a reinstall may have changed the record since.
        slot.record = await asyncio.to_thread(self.store.get, slot.name)
        self._transition(slot, ModelState.LOADING, reason)
        need = self._need(slot.record)
        while True:
            async with self._load_lock:
                self._idle.clear()
                # A load that will take the warm spare turns the spare's memory into the model's.
                takes_spare = self.spares.consumed_by(
                    slot.record.task_type.value, slot.record.config.get("adapter")
                )
                residents = self._residents(exclude=slot.name, spare=not takes_spare)
                plan = plan_load(residents, self.spares.adjust_need(need, slot.record.memory), self.budget)
                if plan.action == "impossible":
                    slot.memory_plan = plan
                    raise _insufficient(slot.name, plan)
                if plan.action in ("load", "evict_then_load"):
                    slot.memory_plan = None
                    for victim in plan.victims:
                        await self._evict(victim, plan.reason)
                    await self._start_worker(slot)
                    await self._settle_overshoot(slot)
                    return
            # Every candidate is busy: wait (outside the lock) for one to become idle.
            if slot.memory_plan is None:
                log.info("load waits for memory", extra={"model": slot.name, "reason": plan.reason})
            slot.memory_plan = plan
            await self._idle.wait()

    def _need(self, record: ModelRecord) -> Need:
        version = record.version()
        device = str(record.config.get("device") or self.settings.resources.default_device)
        if device == "auto":
            device = "cuda:0" if self.probe.gpu_total_bytes() else "cpu"
        sizes = _file_sizes(Path(version.path), version.files)
        # Measured at the last load wins; else what the user declared; else an estimate.
        measured: dict[str, Any] | None = record.memory or None
        declared = record.resource_requirements
        if measured is None and declared.get("memory_mb"):
            measured = {
                "rss_bytes": int(declared["memory_mb"]) << 20,
                "gpu_bytes": int(declared.get("gpu_memory_mb") or 0) << 20,
            }
        return estimate_need(
            record.name,
            device,
            measured,
            weights_bytes(sizes),
            uses_torch=uses_spare(record.task_type.value, record.config.get("adapter")),
        )

    def _gpu_bytes(self, slot: ModelSlot, by_pid: dict[int, int]) -> int:
        """VRAM of a worker as NVML sees its process (CUDA context included); without NVML,
        what torch reserved plus the context's usual size."""
        if slot.loaded is None or not slot.loaded.device.startswith("cuda"):
            return 0
        pid = slot.runner.pid if slot.runner else None
        if pid is not None and pid in by_pid:
            return by_pid[pid]
        reported = slot.stats.gpu_bytes if slot.stats is not None else slot.loaded.gpu_bytes
        return reported + CUDA_CONTEXT_BYTES

    def _residents(self, exclude: str | None = None, spare: bool = True) -> list[Resident]:
        residents = []
        on_gpu = any(s.loaded and s.loaded.device.startswith("cuda") for s in self.slots.values())
        by_pid = self.probe.gpu_bytes_by_pid() if on_gpu else {}
        for slot in self.slots.values():
            if slot.runner is None or slot.name == exclude:
                continue
            device = slot.loaded.device if slot.loaded else "cpu"
            residents.append(
                Resident(
                    name=slot.name,
                    ram_bytes=accounted_bytes(slot.runner),
                    gpu_bytes=self._gpu_bytes(slot, by_pid),
                    device=device,
                    busy=slot.busy,
                    last_used=slot.last_used,
                    keep_alive=self._keep_alive_of(slot),
                    loading=slot.state is ModelState.LOADING,
                )
            )
        if spare and self.spares.ready:
            residents.append(
                Resident(SPARE, self.spares.rss_bytes(), 0, "cpu", busy=False, last_used=0.0, keep_alive=-1)
            )
        return residents

    async def _settle_overshoot(self, slot: ModelSlot) -> None:
        """The estimate may have been low: measured now, evict idle models until back
        within the budget (never the one just loaded, never a busy one)."""
        device = slot.loaded.device if slot.loaded else "cpu"
        residents = [
            dataclasses.replace(r, busy=True) if r.name == slot.name else r for r in self._residents()
        ]
        plan = plan_load(residents, Need("<after-load>", 0, 0, device), self.budget)
        if plan.action == "evict_then_load":
            for victim in plan.victims:
                await self._evict(victim, "over budget after a load: " + plan.reason)
        elif plan.action != "load":
            log.warning(
                "over the memory budget after a load", extra={"model": slot.name, "reason": plan.reason}
            )

    def _spare_fits(self) -> bool:
        """A spare is a convenience: it may only take memory no model needs (no eviction)."""
        size = self.spares.last_rss_bytes or TORCH_WORKER_BASE_BYTES
        plan = plan_load(self._residents(spare=False), Need(SPARE, size, 0, "cpu"), self.budget)
        return plan.action == "load"

    async def _evict(self, name: str, reason: str) -> None:
        if name == SPARE:
            freed = await self.spares.discard()
            log.info(f"{self.spares.label} given up for memory", extra={"freed_mb": freed // 2**20})
            return
        self.counters["evictions"] += 1
        self.metrics.evictions.labels(name).inc()
        await self.unload(name, f"evicted: {reason}")

    async def _start_worker(self, slot: ModelSlot) -> None:
        name, record = slot.name, slot.record
        version = record.version()
        config = record.config
        spec = LoadSpec(
            path=version.path,
            task_type=record.task_type.value,
            device=str(config.get("device") or self.settings.resources.default_device),
            dtype=str(config.get("dtype") or self.settings.resources.default_dtype),
            adapter=config.get("adapter") or None,
            options=dict(config.get("options") or {}),
            health_check=self.settings.lifecycle.health_check,
        )

        def on_event(ev: Event) -> None:
            self._on_event(slot, ev)

        def on_exit(why: str) -> None:
            self._on_exit(slot, runner, why)

        runner: Runner | None = None
        if self.spares.serves(spec.task_type, spec.adapter):
            runner = self.spares.take(name, on_event, on_exit)
        from_spare = runner is not None
        if runner is None:
            runner = self.runner_factory(name, on_event, on_exit)
        started = time.perf_counter()
        try:
            loaded = await runner.start(spec, self.settings.lifecycle.load_timeout_seconds)
        except BaseException:
            if from_spare:
                self.spares.fill()
            raise
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
            metrics=self.metrics,
        )
        slot.scheduler.start()
        slot.error, slot.failures, slot.loaded_at = None, 0, self.clock()
        slot.last_used = slot.loaded_at
        self.counters["loads"] += 1
        seconds = time.perf_counter() - started
        self.metrics.loads.labels(name, "success").inc()
        self.metrics.load_seconds.labels(name, record.task_type.value).observe(seconds)
        self._transition(
            slot,
            ModelState.READY,
            f"loaded in {seconds:.2f} s on {loaded.device}"
            + (f" ({self.spares.label})" if from_spare else ""),
        )
        by_pid = self.probe.gpu_bytes_by_pid() if loaded.device.startswith("cuda") else {}
        memory = {
            "rss_bytes": runner.rss_bytes() or loaded.rss_bytes,
            **fork_measurements(runner),
            "gpu_bytes": self._gpu_bytes(slot, by_pid),
            "device": loaded.device,
        }
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.store.set_memory, name, memory)
        slot.record.memory = memory
        if from_spare:
            # The next spare imports while this model serves; counted after this model,
            # so that it only takes memory that is really free.
            self.spares.fill()

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

    def _on_exit(self, slot: ModelSlot, runner: Runner | None, reason: str) -> None:
        """A worker ended on its own (crash, OOM kill): fail its requests at once; start it
        again on the next demand, backing off when it keeps dying right after its load."""
        if runner is None or slot.runner is not runner:
            return
        error = ModelMoraError(
            ErrorCode.WORKER_DIED, f"the worker of {slot.name!r} ended: {reason}", {"model": slot.name}
        )
        if slot.scheduler is not None:
            asyncio.get_running_loop().create_task(slot.scheduler.stop(error))
        slot.runner, slot.scheduler, slot.loaded, slot.stats = None, None, None, None
        self.counters["crashes"] += 1
        self.metrics.crashes.labels(slot.name).inc()
        now = self.clock()
        if now - slot.loaded_at < CRASH_LOOP_SECONDS:
            slot.crashes += 1
        else:
            slot.crashes = 1
        if slot.crashes > 1:
            slot.error = f"worker died {slot.crashes} times soon after loading: {reason}"
            slot.retry_at = now + _backoff(self.settings.lifecycle.load_backoff_seconds, slot.crashes - 1)
        else:
            slot.error = None  # one crash: the next request starts it again at once
        self._transition(slot, ModelState.FAILED, f"worker died: {reason}")
        self._idle.set()

    # -- keep-alive -----------------------------------------------------------------------

    def _keep_alive_of(self, slot: ModelSlot) -> float:
        if slot.keep_alive is not None:
            return slot.keep_alive
        configured = slot.record.config.get("keep_alive_seconds")
        return float(configured) if configured is not None else self.settings.lifecycle.keep_alive_seconds

    async def _reap_loop(self) -> None:
        while True:
            self._reap_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reap_wake.wait(), 1.0)
            for name in expired(self._residents(), self.clock()):
                slot = self.slots.get(name)
                if slot is not None and slot.runner is not None and not slot.busy:
                    with contextlib.suppress(Exception):
                        await self.unload(name, f"keep-alive of {self._keep_alive_of(slot):g} s expired")
            # A spare given up for memory comes back once the budget has room again.
            if not self._load_lock.locked():
                self.spares.fill(quiet=True)

    # -- control --------------------------------------------------------------------------

    async def load(self, name: str, reason: str = "explicit load") -> ModelSlot:
        # Bounded like any request: a load waiting for memory gives up with INSUFFICIENT_MEMORY.
        deadline = self.clock() + self.settings.lifecycle.load_timeout_seconds
        slot = await self.acquire(name, deadline=deadline, reason=reason)
        self.release(slot)
        return slot

    async def unload(
        self, name: str, reason: str = "requested", force: bool = False, code: ErrorCode = ErrorCode.CANCELLED
    ) -> bool:
        slot = self.slots.get(name)
        if slot is None or slot.runner is None:
            return False
        if slot.busy and not force:
            raise ModelMoraError(
                ErrorCode.MODEL_LOADED,
                f"model {name!r} has requests in flight",
                {"in_flight": slot.refs, "queued": slot.scheduler.queued if slot.scheduler else 0},
            )
        runner, scheduler = slot.runner, slot.scheduler
        slot.runner, slot.scheduler = None, None
        self._transition(slot, ModelState.UNLOADING, reason)
        if scheduler is not None:
            await scheduler.stop(ModelMoraError(code, f"model {name!r} was unloaded: {reason}"))
        await runner.close(self.settings.lifecycle.unload_grace_seconds)
        slot.loaded, slot.keep_alive, slot.stats = None, None, None
        self.counters["unloads"] += 1
        self.metrics.unloads.labels(name, _unload_kind(reason)).inc()
        self._transition(slot, ModelState.UNLOADED, reason)
        self._idle.set()
        return True

    def in_flight(self) -> int:
        return sum(slot.refs for slot in self.slots.values())

    def statuses(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [slot.status(now) for slot in self.slots.values()]

    def memory_status(self) -> dict[str, Any]:
        residents = self._residents()
        return {
            "budget_ram_bytes": self.budget.ram_bytes,
            "budget_gpu_bytes": dict(self.budget.gpu_bytes) if self.budget.gpu_bytes else None,
            "used_ram_bytes": sum(r.ram_bytes for r in residents),
            "system_available_bytes": self.probe.system_available_bytes(),
            "spare": self.spares.status(),
            "tree": process_tree_memory(os.getpid()),
        }

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

    def gpu_bytes_by_model(self) -> dict[str, tuple[str, int]]:
        """(device, bytes) of each model on a GPU: NVML's per-process figure where it has one,
        else what the worker reported plus the CUDA context."""
        on_gpu = [s for s in self.slots.values() if s.loaded and s.loaded.device.startswith("cuda")]
        if not on_gpu:
            return {}
        by_pid = self.probe.gpu_bytes_by_pid()
        return {s.name: (s.loaded.device, self._gpu_bytes(s, by_pid)) for s in on_gpu if s.loaded}

    def forget(self, name: str) -> None:
        self.slots.pop(name, None)

    async def shutdown(self) -> None:
        self._closing = True
        loads = [slot.load_task for slot in self.slots.values() if slot.load_task is not None]
        for task in loads:
            task.cancel()
        await asyncio.gather(*loads, return_exceptions=True)
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for name in list(self.slots):
            with contextlib.suppress(Exception):
                await self.unload(name, "server shutdown", force=True, code=ErrorCode.SHUTTING_DOWN)
        await self.spares.close()


def _unload_kind(reason: str) -> str:
    """A bounded label for an unload's free-text reason."""
    for prefix, kind in (
        ("evicted", "eviction"),
        ("over budget", "eviction"),
        ("keep-alive", "keep_alive"),
        ("server shutdown", "shutdown"),
        ("uninstalled", "uninstall"),
        ("requested", "requested"),
    ):
        if reason.startswith(prefix):
            return kind
    return "other"


def _backoff(base: float, failures: int) -> float:
    return float(min(base * (2 ** max(0, failures - 1)), MAX_BACKOFF_SECONDS))


def _insufficient(name: str, plan: Plan) -> ModelMoraError:
    return ModelMoraError(
        ErrorCode.INSUFFICIENT_MEMORY,
        f"model {name!r} does not fit in memory: {plan.reason}",
        {"model": name, **plan.details},
        retry_after=5.0 if plan.action == "wait" else None,
    )


def _file_sizes(folder: Path, files: dict[str, str]) -> dict[str, int]:
    sizes = {}
    for rel in files:
        with contextlib.suppress(OSError):
            sizes[rel] = (folder / rel).stat().st_size
    return sizes
