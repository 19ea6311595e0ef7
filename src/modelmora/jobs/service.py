"""Async jobs as every door (REST, gRPC, SDK) sees them: submit, status, list, result, cancel.

Ownership is decided here, once for every door: a job belongs to the principal that submitted
it (`current_principal`, set by the door that authenticated the call), and only that owner or
an admin may see it. Anyone else gets JOB_NOT_FOUND, exactly as for a job that does not exist,
so a job id reveals nothing about another caller's work. With auth off every call is the
anonymous principal, which holds every scope: nothing changes for a server without keys.
An admin reading another owner's job leaves a line in the audit log.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from modelmora.auth.audit import audit, audited
from modelmora.auth.keys import current_principal
from modelmora.config import Settings
from modelmora.contracts.encoding import JSON_OPTIONS
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.jobs.dispatcher import JobDispatcher
from modelmora.jobs.store import (
    JobRecord,
    JobStatus,
    JobStore,
    check_job_id,
    new_job_id,
    not_found,
    request_hash,
)
from modelmora.results.store import ResultStore

_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, no spaces
_REQUEST_FIELDS = ("input_data", "parameters", "priority", "timeout_seconds", "keep_alive")


def build_job_store(settings: Settings) -> JobStore:
    cfg = settings.jobs
    if cfg.backend == "redis":
        from modelmora.jobs.redis_store import RedisJobStore

        return RedisJobStore(cfg.redis_url, cfg.lease_seconds, cfg.redis_prefix)
    from modelmora.jobs.sqlite_store import SqliteJobStore

    return SqliteJobStore(settings.server.data_dir / "jobs.db")


class JobService:
    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        dispatcher: JobDispatcher,
        results: ResultStore,
    ) -> None:
        self.settings = settings
        self.store = store
        self.dispatcher = dispatcher
        self.inference = dispatcher.inference
        self.results = results

    async def submit(
        self,
        name: str,
        request: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        trace_id: str | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Store the job (before the caller answers 202); returns its status and whether it
        is new. The input is checked now, so a bad one is a 422 here, not a failed job."""
        if idempotency_key is not None and not _IDEMPOTENCY_KEY.match(idempotency_key):
            raise ModelMoraError(
                ErrorCode.VALIDATION_ERROR,
                "Idempotency-Key must be 1-255 printable ASCII characters",
                {"errors": [{"field": "Idempotency-Key", "message": "invalid"}]},
            )
        body = {k: request[k] for k in _REQUEST_FIELDS if request.get(k) is not None}
        # The checks of a synchronous call (allowed image URLs are fetched, and fetched again
        # when the job runs: a URL gone by then fails the job).
        call = await self.inference.prepare(
            name,
            body.get("input_data") or {},
            body.get("parameters"),
            body.get("priority"),
            body.get("timeout_seconds"),
            trace_id,
        )
        job = JobRecord(
            job_id=new_job_id(),
            model=name,
            request=body,
            priority=int(call.level),
            created_at=time.time(),
            owner=current_principal.get().owner,
            idempotency_key=idempotency_key,
            request_hash=request_hash(name, body),
            trace_id=trace_id,
        )
        try:
            stored, created = await self.store.create(job, self.settings.jobs.max_pending)
        except ModelMoraError as exc:
            if exc.code is ErrorCode.QUEUE_FULL:
                self.inference.metrics.rejected.labels(name, "jobs").inc()
            raise
        if created:
            self.dispatcher.poke()
        return stored.to_status(), created

    async def _get(self, job_id: str) -> JobRecord:
        """The job, if the caller may see it: its owner's, or any for an admin."""
        job_id = check_job_id(job_id)
        job = await self.store.get(job_id)
        principal = current_principal.get()
        if job is None or (job.owner != principal.owner and not principal.is_admin):
            raise not_found(job_id)
        return job

    @staticmethod
    def _audit_foreign(job: JobRecord, action: str) -> contextlib.AbstractContextManager[Any]:
        """An admin acting on another owner's job is audited; a caller's own job is not."""
        if job.owner == current_principal.get().owner:
            return contextlib.nullcontext()
        return audited(action, job.job_id, owner=job.owner)

    async def status(self, job_id: str) -> dict[str, Any]:
        job = await self._get(job_id)
        with self._audit_foreign(job, "job.status"):
            return job.to_status()

    async def list(
        self,
        status: str | None,
        model: str | None,
        page: int = 1,
        page_size: int = 50,
        owner: str | None = None,
    ) -> dict[str, Any]:
        """The caller's jobs; an admin's call lists everyone's, or `owner`'s."""
        try:
            wanted = JobStatus(status) if status else None
        except ValueError:
            raise ModelMoraError(
                ErrorCode.VALIDATION_ERROR,
                f"unknown job status {status!r}",
                {"errors": [{"field": "status", "message": f"one of {[s.value for s in JobStatus]}"}]},
            ) from None
        if page < 1 or not 1 <= page_size <= 1000:
            raise ModelMoraError(
                ErrorCode.VALIDATION_ERROR,
                "page starts at 1 and page_size is 1-1000",
                {"errors": [{"field": "page", "message": "out of range"}]},
            )
        principal = current_principal.get()
        if not principal.is_admin:
            if owner is not None and owner != principal.owner:
                raise ModelMoraError(
                    ErrorCode.FORBIDDEN,
                    "only an admin key lists other keys' jobs",
                    {"needed_scope": "admin", "key": principal.key_id or principal.name},
                )
            owner = principal.owner
        jobs, total = await self.store.list_jobs(wanted, model, page, page_size, owner=owner)
        others = sorted({j.owner for j in jobs if j.owner != principal.owner})
        if others:  # an admin saw other owners' jobs
            audit("jobs.list", owner or "*", owners=others, count=len(jobs))
        return {
            "data": [j.to_status() for j in jobs],
            "meta": {
                "total": total,
                "page": page,
                "page_size": page_size,
                "total_pages": math.ceil(total / page_size) if total else 0,
            },
        }

    def _finished(self, job: JobRecord) -> JobRecord:
        if job.status is JobStatus.COMPLETED and job.response is not None:
            return job
        details: dict[str, Any] = {"job_id": job.job_id, "status": job.status.value}
        if job.status is JobStatus.FAILED:
            raise ModelMoraError(ErrorCode.JOB_FAILED, "the job failed", {**details, "error": job.error})
        if job.status is JobStatus.CANCELLED:
            raise ModelMoraError(ErrorCode.JOB_CANCELLED, "the job was cancelled", details)
        raise ModelMoraError(
            ErrorCode.JOB_NOT_READY, f"the job is {job.status.value}", {**details, "progress": job.progress}
        )

    async def result(self, job_id: str) -> dict[str, Any]:
        """The common response. A result kept in the result store comes as a reference:
        `result` holds its `url` (fresh: S3 presigned URLs expire), content type and size."""
        job = await self._get(job_id)
        with self._audit_foreign(job, "job.result"):
            job = self._finished(job)
            response: dict[str, Any] = orjson.loads(job.response or b"{}")
            if job.result_key is not None:
                response["result"] = {**response["result"], "url": self.results.url_for(job.result_key)}
            return response

    async def result_chunks(self, job_id: str, chunk_size: int) -> tuple[int, AsyncIterator[bytes]]:
        """The whole common response as JSON bytes, in chunks, with a stored result spliced
        in from the result store without holding it in memory (gRPC GetJobResult)."""
        job = await self._get(job_id)
        with self._audit_foreign(job, "job.result"):
            job = self._finished(job)
            return await self._chunks(job, chunk_size)

    async def _chunks(self, job: JobRecord, chunk_size: int) -> tuple[int, AsyncIterator[bytes]]:
        inline = job.response or b"{}"
        if job.result_key is None:
            chunks = [inline[i : i + chunk_size] for i in range(0, len(inline), chunk_size)]

            async def inline_chunks() -> AsyncIterator[bytes]:
                for c in chunks:
                    yield c

            return len(inline), inline_chunks()
        rest = orjson.loads(inline)
        rest.pop("result", None)
        head = b'{"result":'
        tail = b"," + orjson.dumps(rest, option=JSON_OPTIONS)[1:] if rest else b"}"
        obj = await self.results.stat(job.result_key)
        key = job.result_key

        async def spliced() -> AsyncIterator[bytes]:
            yield head
            async for block in self.results.chunks(key, chunk_size):
                yield block
            yield tail

        return len(head) + obj.size + len(tail), spliced()

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """A queued job never runs; a running one stops where its task allows (between
        steps). Cancelling a cancelled job is a no-op; a finished one is a 409."""
        job = await self._get(job_id)
        with self._audit_foreign(job, "job.cancel"):
            if job.status in (JobStatus.COMPLETED, JobStatus.FAILED):
                raise ModelMoraError(
                    ErrorCode.JOB_FINISHED,
                    f"the job is already {job.status.value}",
                    {"job_id": job.job_id, "status": job.status.value},
                )
            job = await self.store.request_cancel(job.job_id, time.time())
            if job.status is JobStatus.PROCESSING:
                self.dispatcher.cancel_running(job.job_id)  # here; another replica sees the flag
            return job.to_status()

    async def counts(self) -> dict[str, int]:
        return await self.store.counts()
