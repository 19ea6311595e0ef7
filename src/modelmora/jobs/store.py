"""The job store contract, shared by the SQLite store (embedded default) and the Redis store.

A job is written before its 202 goes out and stays in the store until it expires. Replicas
claim queued jobs (highest priority, then oldest), run them through the same scheduler as
synchronous requests, and finish them. A claim is a lease: a replica that dies leaves its jobs
`processing`, and they go back to work (the SQLite store at start-up, the Redis store when any
replica reclaims entries idle longer than the lease). Delivery is therefore at-least-once,
and `attempts` tells a client how many runs a job took.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

import orjson

from modelmora.auth.keys import ANONYMOUS
from modelmora.errors import ErrorCode, ModelMoraError

# The owner of the jobs made with auth off.
ANONYMOUS_OWNER = ANONYMOUS.owner


class JobStatus(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(slots=True)
class JobRecord:
    job_id: str
    model: str
    request: dict[str, Any]  # the synchronous infer body: input_data, parameters, priority ...
    priority: int
    created_at: float  # epoch seconds: jobs outlive the process, so wall-clock time
    status: JobStatus = JobStatus.QUEUED
    progress: float | None = None
    started_at: float | None = None
    completed_at: float | None = None
    attempts: int = 0
    error: dict[str, Any] | None = None
    # The common response: inline JSON bytes, or (over results.inline_max_bytes) its `result`
    # part in the result store under `result_key` and the rest inline.
    response: bytes | None = None
    result_key: str | None = None
    idempotency_key: str | None = None
    request_hash: str = ""
    trace_id: str | None = None
    cancel_requested: bool = False
    # Who may read the job and its result (besides admins), and the namespace of its
    # idempotency key: the creating principal's `owner` (a key id, or "anonymous" with auth
    # off, "bootstrap" for the bootstrap key). Jobs stored before owners existed are
    # "anonymous": they were all made with auth off.
    owner: str = ANONYMOUS_OWNER
    extra: dict[str, Any] = field(default_factory=dict)

    def to_status(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "model": self.model,
            "status": self.status.value,
            "priority": self.priority,
            "progress": self.progress,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "completed_at": _iso(self.completed_at),
            "attempts": self.attempts,
            "error": self.error,
        }


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts is not None else None


def new_job_id() -> str:
    return str(uuid.uuid4())


def check_job_id(job_id: str) -> str:
    """Job ids are UUIDs; anything else is a malformed request (422), not an unknown job."""
    try:
        return str(uuid.UUID(job_id))
    except (ValueError, AttributeError, TypeError):
        raise ModelMoraError(
            ErrorCode.VALIDATION_ERROR,
            "a job id is a UUID",
            {"errors": [{"field": "job_id", "message": "not a UUID"}]},
        ) from None


def request_hash(model: str, request: dict[str, Any]) -> str:
    """What makes two submissions 'the same body' for an Idempotency-Key."""
    body = orjson.dumps({"model": model, "request": request}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(body).hexdigest()


def not_found(job_id: str) -> ModelMoraError:
    return ModelMoraError(ErrorCode.JOB_NOT_FOUND, f"no job {job_id}", {"job_id": job_id})


def idempotency_conflict(key: str, job_id: str) -> ModelMoraError:
    return ModelMoraError(
        ErrorCode.IDEMPOTENCY_CONFLICT,
        "this Idempotency-Key was used with a different request",
        {"idempotency_key": key, "job_id": job_id},
    )


def store_full(pending: int, limit: int) -> ModelMoraError:
    return ModelMoraError(
        ErrorCode.QUEUE_FULL,
        "too many jobs are waiting; retry later",
        {"pending": pending, "max_pending": limit},
        retry_after=5.0,
    )


IDEMPOTENCY_TTL_SECONDS = 24 * 3600


def never_started(queued_ttl: float) -> bytes:
    """The error body of a job that expired before it started (JSON, as both stores keep it)."""
    return orjson.dumps(
        {
            "error_code": ErrorCode.INFERENCE_TIMEOUT.value,
            "message": f"the job waited more than {queued_ttl:g} s without starting",
            "details": {"queued_ttl_seconds": queued_ttl},
            "trace_id": None,
        }
    )


class JobStore(Protocol):
    """Every method is safe to call from several replicas at once (Redis) or from one server
    plus crashes (SQLite). Times are epoch seconds."""

    async def open(self) -> None:
        """Create what the store needs and recover jobs orphaned by a crash (SQLite: jobs
        left `processing` by the previous run go back to `queued`)."""

    async def close(self) -> None: ...

    async def create(self, job: JobRecord, max_pending: int) -> tuple[JobRecord, bool]:
        """Store a new job; with an idempotency key already used by the same owner for the
        same request, return that job and False instead. Keys are per owner: another
        owner's use of the same key is unrelated (and never revealed). Raises
        IDEMPOTENCY_CONFLICT or QUEUE_FULL."""

    async def get(self, job_id: str) -> JobRecord | None: ...

    async def list_jobs(
        self,
        status: JobStatus | None,
        model: str | None,
        page: int,
        page_size: int,
        owner: str | None = None,
    ) -> tuple[list[JobRecord], int]:
        """Newest first; `owner`: only that owner's jobs (None: everyone's)."""

    async def claim(
        self, limit: int, room: Mapping[str, int], default_room: int, now: float
    ) -> list[JobRecord]:
        """Take up to `limit` queued jobs (priority, then age) for this replica: they become
        `processing` with `attempts` + 1. At most `room.get(model, default_room)` jobs of a
        model (0: leave that model's jobs to other replicas, or to later). Also returns jobs
        whose lease ran out on a dead replica."""

    async def heartbeat(self, job_ids: list[str], now: float) -> None:
        """Renew this replica's leases on the jobs it runs."""

    async def set_progress(self, job_id: str, progress: float) -> None: ...

    async def finish(
        self,
        job_id: str,
        status: JobStatus,
        now: float,
        *,
        response: bytes | None = None,
        result_key: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> bool:
        """Record the outcome of a run; False when the job was no longer processing."""

    async def release(self, job_id: str, count_attempt: bool) -> None:
        """Give a claimed job back to the queue: after a run the replica could not finish
        (its worker died: the attempt counts), or before it really ran (the model's queue
        was full, this replica is stopping: it does not)."""

    async def request_cancel(self, job_id: str, now: float) -> JobRecord:
        """A queued job becomes `cancelled` at once; a processing one is flagged for the
        replica running it. Returns the job after the change (raises JOB_NOT_FOUND)."""

    async def cancel_requested(self, job_ids: list[str]) -> list[str]:
        """Which of these running jobs a client asked to cancel (possibly on another replica)."""

    async def expire(self, now: float, queued_ttl: float, result_ttl: float) -> list[str]:
        """Fail queued jobs older than `queued_ttl`, delete finished jobs older than
        `result_ttl`; returns the result-store keys of deleted jobs."""

    async def counts(self) -> dict[str, int]:
        """Jobs by status (for status and metrics)."""
