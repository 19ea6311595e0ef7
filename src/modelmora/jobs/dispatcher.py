"""Runs async jobs: pulls them from the job store when this replica can start them.

Jobs wait in the store, not in the request queue, so a burst of jobs is never refused with
429 while the store has room. Claiming is fair between replicas (issue 15): a replica takes
only what it can start soon, one batch of a model at a time (the model's `max_batch_size`,
never more than half its queue) and `max_running` in all, so the rest stays in the store for
replicas with free capacity. A claimed job first has its model loaded here; its deadline
(`timeout_seconds`) starts once it is queued behind a loaded model, so neither the wait in
the store nor the load eats into it (`created_at` still shows the submission). A job whose
model is still loading here after `jobs.release_after_seconds`, while another replica has
nothing to do and either has that model loaded or this replica's load waits for memory, goes
back to the queue for that one (not counted as an attempt). Once queued, a job is an ordinary
request: same priorities, same batches.

With Redis, replicas also say when they are idle, and one of them (elected with a short
lease) reports the cluster-wide job gauges, so that dashboards summing over replicas count
each job once (`reports_cluster`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import orjson

from modelmora.config import Settings
from modelmora.contracts.encoding import JSON_OPTIONS
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.jobs.store import JobRecord, JobStatus, JobStore
from modelmora.observability.metrics import current_protocol
from modelmora.results.store import ResultStore

if TYPE_CHECKING:
    from modelmora.services.inference import InferenceService

log = logging.getLogger("modelmora.jobs")

# Errors after which a job goes back to the queue instead of failing: the job itself was
# fine, the replica could not run it now. Bounded by `max_attempts`.
_REQUEUE = {ErrorCode.WORKER_DIED, ErrorCode.INSUFFICIENT_MEMORY, ErrorCode.SHUTTING_DOWN}
_PROGRESS_EVERY_S = 0.25  # store writes for progress, at most this often per job


@runtime_checkable
class Presence(Protocol):
    """What a store shared by several replicas adds (the Redis store): who is idle, and who
    reports the cluster-wide figures."""

    async def set_idle(self, idle: bool, now: float, loaded: list[str]) -> None: ...

    async def idle_elsewhere(self, now: float, within: float, model: str | None) -> int:
        """Other replicas that said they were idle in the last `within` seconds (with
        `model` loaded, when given)."""

    async def elect_reporter(self, ttl: float) -> bool:
        """Whether this replica reports the cluster-wide job gauges (for `ttl` seconds)."""


class JobDispatcher:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        inference: InferenceService,
        results: ResultStore,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.inference = inference
        self.results = results
        self.clock = clock
        self.running: dict[str, asyncio.Task[None]] = {}
        self._per_model: Counter[str] = Counter()
        self._backoff_until: dict[str, float] = {}  # model -> time its queue was found full
        self._cancelled: set[str] = set()  # running jobs a client cancelled
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._claiming = True
        self.counters: Counter[str] = Counter()
        self._waiting: dict[str, tuple[str, float]] = {}  # claimed, model loading: id -> (model, since)
        self._yielded: set[str] = set()  # given back for an idle replica
        # Whether this replica exports the cluster-wide job gauges (one does, with Redis).
        self.reports_cluster = not isinstance(store, Presence)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._claim_loop(), name="jobs-claim"),
            asyncio.create_task(self._housekeeping_loop(), name="jobs-housekeeping"),
        ]

    def poke(self) -> None:
        self._wake.set()

    def _batch_of(self, model: str | None) -> int:
        """One batch of the model (its own max_batch_size when this replica knows it), never
        more than half of its queue: the rest stays for synchronous requests."""
        cfg = self.settings.scheduler
        slot = self.inference.manager.slots.get(model) if model is not None else None
        size = int(
            (slot.record.config.get("max_batch_size") if slot is not None else None) or cfg.max_batch_size
        )
        return max(1, min(size, cfg.queue_size_per_model // 2))

    async def _claim_loop(self) -> None:
        cfg = self.settings.jobs
        while True:
            room = cfg.max_running - len(self.running)
            claimed = 0
            if room > 0 and self._claiming:
                now = self.clock()
                # Free batch capacity: what this replica can start now, per model.
                share = {m: self._batch_of(m) - n for m, n in self._per_model.items()}
                share |= {m: self._batch_of(m) for m in self.inference.manager.slots if m not in share}
                share |= {m: 0 for m, until in self._backoff_until.items() if until > now}
                try:
                    jobs = await self.store.claim(room, share, self._batch_of(None), now)
                except Exception:
                    log.exception("claiming jobs failed")
                    jobs = []
                for job in jobs:
                    self._start(job)
                claimed = len(jobs)
            if claimed and len(self.running) < cfg.max_running:
                continue  # more may be waiting for other models
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), cfg.poll_seconds)

    def _start(self, job: JobRecord) -> None:
        self._per_model[job.model] += 1
        task = asyncio.create_task(self._run(job), name=f"job-{job.job_id}")
        self.running[job.job_id] = task

    def _done(self, job: JobRecord) -> None:
        self.running.pop(job.job_id, None)
        self._cancelled.discard(job.job_id)
        self._waiting.pop(job.job_id, None)
        self._yielded.discard(job.job_id)
        self._per_model[job.model] -= 1
        if self._per_model[job.model] <= 0:
            del self._per_model[job.model]
        self._wake.set()

    async def _run(self, job: JobRecord) -> None:
        current_protocol.set("job")  # this task's own context: its requests count as jobs
        last_write = 0.0

        def on_event(kind: str, data: dict[str, Any]) -> None:
            nonlocal last_write
            total = data.get("total")
            if kind != "progress" or not total:
                return
            now = time.monotonic()
            if now - last_write < _PROGRESS_EVERY_S and data.get("step") != total:
                return
            last_write = now
            value = min(1.0, max(0.0, float(data.get("step", 0)) / float(total)))
            task = asyncio.ensure_future(self.store.set_progress(job.job_id, value))
            task.add_done_callback(_quiet)

        try:
            # The model first: its load is not the job's time (nor bounded by its timeout).
            response = await self._loaded_then_run(job, on_event)
            stored, key = await self._store_result(job, response)
            now = self.clock()
            await self.store.finish(job.job_id, JobStatus.COMPLETED, now, response=stored, result_key=key)
            self.counters["completed"] += 1
        except asyncio.CancelledError:
            if job.job_id in self._cancelled:
                error = ModelMoraError(ErrorCode.CANCELLED, "the job was cancelled while it ran")
                await asyncio.shield(self._fail(job, JobStatus.CANCELLED, error))
            else:  # stopping, or given back for an idle replica: it runs again elsewhere
                if job.job_id in self._yielded:
                    self.counters["released"] += 1
                await asyncio.shield(self.store.release(job.job_id, count_attempt=False))
            raise
        except ModelMoraError as exc:
            await self._failed_run(job, exc)
        except Exception as exc:
            log.exception("job failed unexpectedly", extra={"job_id": job.job_id})
            await self._fail(job, JobStatus.FAILED, ModelMoraError(ErrorCode.INTERNAL_ERROR, str(exc)))
        finally:
            self._done(job)

    async def _loaded_then_run(
        self, job: JobRecord, on_event: Callable[[str, dict[str, Any]], None]
    ) -> dict[str, Any]:
        manager, request = self.inference.manager, job.request

        def run() -> Awaitable[dict[str, Any]]:
            return self.inference.infer(
                job.model,
                request.get("input_data") or {},
                request.get("parameters"),
                priority=request.get("priority"),
                timeout_seconds=request.get("timeout_seconds"),
                keep_alive=request.get("keep_alive"),
                trace_id=job.trace_id,
                on_event=on_event,
            )

        if self.inference.routes_elsewhere(job.model):
            # Another replica holds the model with room (cluster routing): the job runs there,
            # without a copy loaded here for it.
            return await run()
        self._waiting[job.job_id] = (job.model, time.monotonic())
        # Held (a reference) until the job is queued, so the model cannot go in between.
        deadline = manager.clock() + self.settings.lifecycle.load_timeout_seconds
        slot = await manager.acquire(job.model, deadline=deadline, reason="job")
        try:
            self._waiting.pop(job.job_id, None)
            return await run()
        finally:
            manager.release(slot)

    async def _failed_run(self, job: JobRecord, exc: ModelMoraError) -> None:
        if exc.code is ErrorCode.QUEUE_FULL:
            # Synchronous traffic filled the model's queue: wait for room, do not fail.
            self._backoff_until[job.model] = self.clock() + (exc.retry_after or 1.0)
            await self.store.release(job.job_id, count_attempt=False)
            return
        if exc.code in _REQUEUE and job.attempts < self.settings.jobs.max_attempts:
            await self.store.release(job.job_id, count_attempt=True)
            self.counters["requeued"] += 1
            return
        await self._fail(job, JobStatus.FAILED, exc)

    async def _fail(self, job: JobRecord, status: JobStatus, exc: ModelMoraError) -> None:
        self.counters[status.value] += 1
        await self.store.finish(job.job_id, status, self.clock(), error=exc.to_body(job.trace_id))

    async def _store_result(self, job: JobRecord, response: dict[str, Any]) -> tuple[bytes, str | None]:
        """The response inline when small; else its `result` goes to the result store and
        the job keeps a reference (metadata and timing stay inline)."""
        body = orjson.dumps(response, option=JSON_OPTIONS)
        if len(body) <= self.settings.results.inline_max_bytes:
            return body, None
        part = orjson.dumps(response["result"], option=JSON_OPTIONS)
        key = job.job_id + ".json"
        await self.results.put(key, part)  # raises a clear INTERNAL_ERROR when it cannot
        ref = {**response, "result": {"content_type": "application/json", "size_bytes": len(part)}}
        return orjson.dumps(ref, option=JSON_OPTIONS), key

    def cancel_running(self, job_id: str) -> bool:
        task = self.running.get(job_id)
        if task is None:
            return False
        self._cancelled.add(job_id)
        task.cancel()
        return True

    async def _housekeeping_loop(self) -> None:
        """Leases, cancels asked on other replicas, idle replicas, expiry."""
        cfg = self.settings.jobs
        last_expiry = 0.0
        while True:
            await asyncio.sleep(cfg.poll_seconds)
            try:
                ids = list(self.running)
                await self.store.heartbeat(ids, self.clock())
                for job_id in await self.store.cancel_requested(ids):
                    self.cancel_running(job_id)
                if isinstance(self.store, Presence):
                    await self._share_work(self.store)
                now = self.clock()
                if now - last_expiry >= cfg.expiry_interval_seconds:
                    last_expiry = now
                    keys = await self.store.expire(now, cfg.queued_ttl_seconds, cfg.result_ttl_seconds)
                    for key in keys:
                        with contextlib.suppress(Exception):
                            await self.results.delete(key)
                    await self.results.sweep()
            except Exception:
                log.exception("job housekeeping failed")

    async def _share_work(self, presence: Presence) -> None:
        """Say whether this replica is idle (and with which models loaded); give back the jobs
        stuck behind a load here when an idle replica can do better; keep (or take) the
        reporting of the cluster-wide figures."""
        cfg = self.settings.jobs
        now = self.clock()
        slots = self.inference.manager.slots
        loading = any(slot.load_task is not None for slot in slots.values())
        idle = self._claiming and not self.running and not loading
        await presence.set_idle(idle, now, [n for n, slot in slots.items() if slot.is_ready()])
        self.reports_cluster = await presence.elect_reporter(max(1.0, 4 * cfg.poll_seconds))
        started = time.monotonic()
        stuck = [
            j for j, (_m, since) in self._waiting.items() if started - since >= cfg.release_after_seconds
        ]
        within = 3 * cfg.poll_seconds
        given = 0
        for job_id in stuck:
            model, _since = self._waiting[job_id]
            slot = slots.get(model)
            # Better elsewhere: an idle replica has the model loaded, or this one cannot even
            # start loading it (waiting for memory held by busy models) and another is idle.
            waits_for_memory = slot is not None and slot.memory_plan is not None
            if not await presence.idle_elsewhere(now, within, model) and not (
                waits_for_memory and await presence.idle_elsewhere(now, within, None)
            ):
                continue
            del self._waiting[job_id]
            # Not straight back here: the idle replica polls first.
            self._backoff_until[model] = now + cfg.release_after_seconds
            task = self.running.get(job_id)
            if task is not None:
                self._yielded.add(job_id)
                task.cancel()
                given += 1
        if given:
            log.info("jobs given back for an idle replica", extra={"jobs": given})

    def stop_claiming(self) -> None:
        """A draining replica takes no new jobs (others, or the next start, will)."""
        self._claiming = False

    async def drain(self, deadline: float) -> None:
        """Stop taking jobs; let running ones finish until the deadline (monotonic)."""
        self.stop_claiming()
        while self.running and time.monotonic() < deadline:  # noqa: ASYNC110 - polled briefly
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Running jobs go back to the queue (not counted as an attempt)."""
        self._claiming = False
        for task in self._tasks:
            task.cancel()
        running = list(self.running.values())
        for task in running:
            task.cancel()
        for task in [*self._tasks, *running]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _quiet(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not record job progress", extra={"error": str(task.exception())})
