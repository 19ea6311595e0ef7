"""The load path: from a first request for a model to a READY worker with its scheduler.

One load at a time (a lock taken only on a cache miss); loaded models keep serving while
another loads, and concurrent first requests for one model share a single load. Before
starting a worker the pure `plan_load` decides, over a snapshot of the residents, whether the
model fits, which idle models to evict, or whether to wait for a busy one to become idle. A
failed load is retried with backoff; its typed reason (`LoadFailure`) decides the state the
model is left in. Every load first checks the version's files against the registry's sha256s
(`lifecycle/verify.py`); a mismatch fails the model at once and is not retried until the
files are verified again or reinstalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

from modelmora.config import Settings
from modelmora.contracts.channel import Event, LoadFailure, LoadSpec
from modelmora.contracts.runner import Runner, RunnerFactory
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.inference.batcher import BatchLimits
from modelmora.inference.continuous import open_scheduler
from modelmora.inference.scheduler import Admission
from modelmora.lifecycle.eviction import Need, plan_load
from modelmora.lifecycle.memory import fork_measurements
from modelmora.lifecycle.residency import Residency
from modelmora.lifecycle.spare import WorkerSource
from modelmora.lifecycle.state import (
    STATE_AFTER_FAILURE,
    ChecksumFailure,
    LoadError,
    ModelSlot,
    backoff,
    gave_up_waiting,
    insufficient,
    load_failed,
    transition,
)
from modelmora.lifecycle.verify import CACHE_FILE, WeightsVerifier, fingerprint
from modelmora.observability.metrics import Metrics
from modelmora.registry.catalog import ModelRecord, ModelState
from modelmora.registry.store import RegistryStore

log = logging.getLogger("modelmora.lifecycle")

# A worker that dies this soon after its load is crash-looping: back off before the next start.
CRASH_LOOP_SECONDS = 60.0

# Frees memory for a load: evict(name, reason) unloads that model (or gives up the spare).
Evict = Callable[[str, str], Awaitable[None]]
# Makes this node hold the active version's files before its worker starts (the model store's
# `Materialiser`, set by the app when `registry.model_store` is; None: the files are local).
FetchFiles = Callable[[ModelRecord], Awaitable[None]]


class Loader:
    def __init__(
        self,
        settings: Settings,
        store: RegistryStore,
        runner_factory: RunnerFactory,
        clock: Callable[[], float],
        metrics: Metrics,
        spares: WorkerSource,
        residency: Residency,
        admission: Admission,
        counters: dict[str, int],
        evict: Evict,
    ) -> None:
        self.settings = settings
        self.store = store
        self.runner_factory = runner_factory
        self.clock = clock
        self.metrics = metrics
        self.spares = spares
        self.residency = residency
        self.admission = admission
        self.counters = counters
        self.evict = evict
        self.fetch_files: FetchFiles | None = None
        self.lock = asyncio.Lock()
        self.idle = asyncio.Event()  # set whenever a model may have become evictable
        self.closing = False
        self.verifier = WeightsVerifier(settings.server.data_dir / CACHE_FILE)

    async def ensure_loaded(self, slot: ModelSlot, deadline: float | None, reason: str) -> None:
        """Wait for the model's load (starting it unless one runs), within `deadline`."""
        while not slot.is_ready():
            if slot.load_task is None:
                checksum = slot.checksum
                if checksum is not None:
                    if not await self._checksum_cleared(slot, checksum):
                        raise checksum.again()
                    continue  # awaited: another request may have started the load meanwhile
                if slot.error is not None and self.clock() < slot.retry_at:
                    raise load_failed(slot, self.clock())
                slot.load_task = asyncio.create_task(self._load(slot, reason), name=f"load-{slot.name}")
            task = slot.load_task
            slot.waiters += 1
            try:
                timeout = None if deadline is None else max(0.0, deadline - self.clock())
                # Shield: a caller that gives up must not cancel the load others wait for.
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except TimeoutError:
                raise gave_up_waiting(slot, self.clock()) from None
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
                failed = slot.checksum
                if failed is not None:
                    raise failed.again()
                raise load_failed(slot, self.clock())

    async def _checksum_cleared(self, slot: ModelSlot, checksum: ChecksumFailure) -> bool:
        """A model failed by a checksum mismatch loads again once it was reinstalled (its
        version's files or path changed) or verified again (every file's verified hash is in
        the cache with its current stamps): a registry read and a stat per file, no hashing."""
        record = await asyncio.to_thread(self.store.get, slot.name)
        version = record.version()
        reinstalled = fingerprint(version) != checksum.fingerprint
        if not reinstalled and not await asyncio.to_thread(self.verifier.verified_from_cache, version):
            return False
        if slot.checksum is checksum:
            slot.checksum, slot.error, slot.failures, slot.retry_at = None, None, 0, 0.0
            slot.record = record
            log.info(
                "checksum failure cleared",
                extra={"model": slot.name, "why": "reinstalled" if reinstalled else "verified again"},
            )
        return True

    async def _load(self, slot: ModelSlot, reason: str) -> None:
        """Load with retries: each failure (including a failed health check) backs off
        exponentially; after the last one, requests get MODEL_LOAD_FAILED until `retry_at`."""
        lifecycle = self.settings.lifecycle
        slot.memory_plan = None
        try:
            for attempt in range(lifecycle.load_retries + 1):
                if self.closing:
                    slot.error = "the server is shutting down"
                    return
                try:
                    await self._load_once(slot, reason if not attempt else f"retry {attempt}")
                    return
                except ModelMoraError as exc:
                    if exc.code is ErrorCode.INSUFFICIENT_MEMORY:
                        slot.error = exc.message
                        transition(slot, ModelState.FAILED, exc.message)
                        return
                    if exc.code is ErrorCode.CHECKSUM_MISMATCH:
                        # Damaged files do not heal by waiting: no backoff, no retry.
                        slot.checksum = ChecksumFailure(exc, fingerprint(slot.record.version()))
                        slot.failure, slot.error = LoadFailure.ERROR, exc.message
                        slot.failures += 1
                        self.counters["load_failures"] += 1
                        self.metrics.loads.labels(slot.name, "failure").inc()
                        log.error("model files damaged", extra={"model": slot.name, **exc.details})
                        transition(slot, ModelState.FAILED, exc.message)
                        return
                    slot.failure = exc.reason if isinstance(exc, LoadError) else LoadFailure.ERROR
                    slot.failures += 1
                    slot.error = exc.message
                    self.counters["load_failures"] += 1
                    self.metrics.loads.labels(slot.name, "failure").inc()
                    transition(slot, STATE_AFTER_FAILURE[slot.failure], exc.message)
                    pause = backoff(lifecycle.load_backoff_seconds, slot.failures)
                    slot.retry_at = self.clock() + pause
                    if attempt < lifecycle.load_retries:
                        await asyncio.sleep(pause)
        except asyncio.CancelledError:
            why = "nobody waits for it any more" if not self.closing else "server shutdown"
            transition(slot, ModelState.UNLOADED, f"load abandoned: {why}")
            raise
        finally:
            slot.load_task = None

    async def _load_once(self, slot: ModelSlot, reason: str) -> None:
        # Re-read: `use`, `update` or a reinstall may have changed the record since.
        slot.record = await asyncio.to_thread(self.store.get, slot.name)
        transition(slot, ModelState.LOADING, reason)
        if self.fetch_files is not None:
            # Outside the load lock: a download must not hold up other models' loads.
            await self.fetch_files(slot.record)
        report = await asyncio.to_thread(self.verifier.verify, slot.name, slot.record.version())
        log.info(
            "weights verified",
            extra={
                "model": slot.name,
                "files": report.files,
                "hashed": report.hashed,
                "cached": report.cached,
                "seconds": round(report.seconds, 4),
            },
        )
        need = self.residency.need(slot.record)
        adapter = slot.record.config.get("adapter")
        while True:
            async with self.lock:
                self.idle.clear()
                # A load that will take the warm spare turns the spare's memory into the model's.
                takes_spare = self.spares.consumed_by(slot.record.task_type.value, adapter)
                residents = self.residency.residents(exclude=slot.name, spare=not takes_spare)
                plan = plan_load(
                    residents, self.spares.adjust_need(need, slot.record.memory), self.residency.budget
                )
                if plan.action == "impossible":
                    slot.memory_plan = plan
                    raise insufficient(slot.name, plan)
                if plan.action in ("load", "evict_then_load"):
                    slot.memory_plan = None
                    for victim in plan.victims:
                        await self.evict(victim, plan.reason)
                    await self._start_worker(slot)
                    await self._settle_overshoot(slot)
                    return
            # Every candidate is busy: wait (outside the lock) for one to become idle.
            if slot.memory_plan is None:
                log.info("load waits for memory", extra={"model": slot.name, "reason": plan.reason})
            slot.memory_plan = plan
            await self.idle.wait()

    async def _settle_overshoot(self, slot: ModelSlot) -> None:
        """The estimate may have been low: measured now, evict idle models until back
        within the budget (never the one just loaded, never a busy one)."""
        device = slot.loaded.device if slot.loaded else "cpu"
        residents = [
            dataclasses.replace(r, busy=True) if r.name == slot.name else r
            for r in self.residency.residents()
        ]
        plan = plan_load(residents, Need("<after-load>", 0, 0, device), self.residency.budget)
        if plan.action == "evict_then_load":
            for victim in plan.victims:
                await self.evict(victim, "over budget after a load: " + plan.reason)
        elif plan.action != "load":
            log.warning(
                "over the memory budget after a load", extra={"model": slot.name, "reason": plan.reason}
            )

    async def _start_worker(self, slot: ModelSlot) -> None:
        name, record = slot.name, slot.record
        version = record.version()
        config = record.config
        spec = LoadSpec(
            path=version.path,
            task_type=record.task_type,
            device=str(config.get("device") or self.settings.resources.default_device),
            dtype=str(config.get("dtype") or self.settings.resources.default_dtype),
            adapter=config.get("adapter") or None,
            options=dict(config.get("options") or {}),
            health_check=self.settings.lifecycle.health_check,
        )

        def on_event(ev: Event) -> None:
            handler = slot.event_handlers.get(ev.request_id)
            if handler is not None:
                handler(ev)

        def on_exit(why: str) -> None:
            self._on_exit(slot, runner, why)

        runner: Runner | None = None
        if self.spares.serves(record.task_type.value, config.get("adapter")):
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
        try:  # static or continuous batching (config.batching; inference/continuous.py)
            scheduler = await open_scheduler(
                name=name,
                runner=runner,
                task=record.task_type,
                batching=config.get("batching"),
                limits=BatchLimits(
                    int(config.get("max_batch_size") or sched.max_batch_size),
                    float(config.get("max_wait_ms", sched.max_wait_ms)),
                ),
                admission=self.admission,
                queue_size=sched.queue_size_per_model,
                aging_seconds=sched.aging_seconds,
                clock=self.clock,
                metrics=self.metrics,
                timeout=self.settings.lifecycle.load_timeout_seconds,
            )
        except BaseException:
            await runner.close(grace=0)
            raise
        slot.runner, slot.loaded, slot.version = runner, loaded, version.version
        slot.scheduler = scheduler
        slot.scheduler.start()
        slot.error, slot.failure, slot.failures, slot.loaded_at = None, None, 0, self.clock()
        slot.last_used = slot.loaded_at
        self.counters["loads"] += 1
        seconds = time.perf_counter() - started
        self.metrics.loads.labels(name, "success").inc()
        self.metrics.load_seconds.labels(name, record.task_type.value).observe(seconds)
        transition(
            slot,
            ModelState.READY,
            f"loaded in {seconds:.2f} s on {loaded.device}"
            + (f" ({self.spares.label})" if from_spare else ""),
        )
        by_pid = self.residency.probe.gpu_bytes_by_pid() if loaded.device.startswith("cuda") else {}
        slot.rss_baseline = runner.rss_bytes() or loaded.rss_bytes
        slot.rss_checked_at = slot.loaded_at
        memory = {
            "rss_bytes": slot.rss_baseline,
            **fork_measurements(runner),
            "gpu_bytes": self.residency.gpu_bytes(slot, by_pid),
            "device": loaded.device,
        }
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.store.set_memory, name, memory)
        slot.record.memory = memory
        if from_spare:
            # The next spare imports while this model serves; counted after this model,
            # so that it only takes memory that is really free.
            self.spares.fill()

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
            slot.retry_at = now + backoff(self.settings.lifecycle.load_backoff_seconds, slot.crashes - 1)
        else:
            slot.error = None  # one crash: the next request starts it again at once
        transition(slot, ModelState.FAILED, f"worker died: {reason}")
        self.idle.set()
