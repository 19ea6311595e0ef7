"""The embedded job store: one SQLite file (WAL) under the data dir.

One server owns the file, so a job still `processing` when the store opens was being run by a
process that died: it goes back to `queued` and runs again (at-least-once). Every change is
one short transaction; WAL with synchronous=NORMAL keeps committed jobs through a crash or
SIGKILL of the server (the OS holds the log), which is the failure this store is built for.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import orjson
from sqlalchemy import REAL, Column, Index, Integer, LargeBinary, MetaData, Table, Text, text

from modelmora import migrations
from modelmora.jobs.store import (
    IDEMPOTENCY_TTL_SECONDS,
    JobRecord,
    JobStatus,
    idempotency_conflict,
    never_started,
    not_found,
    store_full,
)

T = TypeVar("T")

# The table as the queries below expect it. The schema itself is Alembic's
# (modelmora/migrations/jobs), applied when the store opens; a test compares the two, so a
# change here needs a new revision there (`modelmora db revision --jobs`).
METADATA = MetaData()
JOBS = Table(
    "jobs",
    METADATA,
    Column("job_id", Text, primary_key=True, nullable=True),  # SQLite's quirk, as the DDL made it
    Column("model", Text, nullable=False),
    Column("request", LargeBinary, nullable=False),
    Column("priority", Integer, nullable=False),
    Column("status", Text, nullable=False),
    Column("progress", REAL),
    Column("created_at", REAL, nullable=False),
    Column("started_at", REAL),
    Column("completed_at", REAL),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("error", LargeBinary),
    Column("response", LargeBinary),
    Column("result_key", Text),
    Column("idempotency_key", Text),
    Column("request_hash", Text, nullable=False),
    Column("trace_id", Text),
    Column("cancel_requested", Integer, nullable=False, server_default=text("0")),
    Column("owner", Text, nullable=False),
    Index("jobs_queue", "status", "priority", "created_at"),
    Index("jobs_created", "created_at"),
    # An idempotency key is its owner's: two callers' equal keys name two jobs.
    Index("jobs_owner_idempotency", "owner", "idempotency_key", unique=True),
    Index("jobs_owner_created", "owner", "created_at"),  # a caller listing its own jobs
)

_COLUMNS = (
    "job_id, model, request, priority, status, progress, created_at, started_at, completed_at, "
    "attempts, error, response, result_key, idempotency_key, request_hash, trace_id, cancel_requested, owner"
)


def _row_to_job(row: tuple[Any, ...]) -> JobRecord:
    return JobRecord(
        job_id=row[0],
        model=row[1],
        request=orjson.loads(row[2]),
        priority=row[3],
        status=JobStatus(row[4]),
        progress=row[5],
        created_at=row[6],
        started_at=row[7],
        completed_at=row[8],
        attempts=row[9],
        error=orjson.loads(row[10]) if row[10] is not None else None,
        response=row[11],
        result_key=row[12],
        idempotency_key=row[13],
        request_hash=row[14],
        trace_id=row[15],
        cancel_requested=bool(row[16]),
        owner=row[17],
    )


class SqliteJobStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one connection, used from worker threads in turn

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            assert self._db is not None, "the job store is not open"
            with self._lock:
                return fn(self._db)

        return await asyncio.to_thread(locked)

    async def open(self) -> None:
        def connect() -> None:
            migrations.upgrade(f"sqlite:///{self.path}", migrations.JOBS)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            # This server owns the file: whatever was processing belonged to a run that died.
            db.execute(
                "UPDATE jobs SET status = 'queued', progress = NULL, cancel_requested = 0 "
                "WHERE status = 'processing' AND cancel_requested = 0"
            )
            db.execute(
                "UPDATE jobs SET status = 'cancelled', completed_at = started_at "
                "WHERE status = 'processing' AND cancel_requested = 1"
            )
            self._db = db

        await asyncio.to_thread(connect)

    async def close(self) -> None:
        def close() -> None:
            if self._db is not None:
                with self._lock:
                    self._db.close()
                    self._db = None

        await asyncio.to_thread(close)

    async def create(self, job: JobRecord, max_pending: int) -> tuple[JobRecord, bool]:
        def insert(db: sqlite3.Connection) -> tuple[JobRecord, bool]:
            db.execute("BEGIN IMMEDIATE")
            try:
                if job.idempotency_key is not None:
                    row = db.execute(
                        f"SELECT {_COLUMNS} FROM jobs WHERE owner = ? AND idempotency_key = ?",
                        (job.owner, job.idempotency_key),
                    ).fetchone()
                    if row is not None:
                        found = _row_to_job(row)
                        if found.created_at >= job.created_at - IDEMPOTENCY_TTL_SECONDS:
                            db.execute("COMMIT")
                            if found.request_hash != job.request_hash:
                                raise idempotency_conflict(job.idempotency_key, found.job_id)
                            return found, False
                        # The key is older than its 24 h: it may name a new job now.
                        db.execute("UPDATE jobs SET idempotency_key = NULL WHERE job_id = ?", (found.job_id,))
                (pending,) = db.execute("SELECT count(*) FROM jobs WHERE status = 'queued'").fetchone()
                if pending >= max_pending:
                    raise store_full(pending, max_pending)
                db.execute(
                    f"INSERT INTO jobs ({_COLUMNS}) VALUES ({', '.join('?' * 18)})",
                    (
                        job.job_id,
                        job.model,
                        orjson.dumps(job.request),
                        job.priority,
                        job.status.value,
                        job.progress,
                        job.created_at,
                        None,
                        None,
                        0,
                        None,
                        None,
                        None,
                        job.idempotency_key,
                        job.request_hash,
                        job.trace_id,
                        0,
                        job.owner,
                    ),
                )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return job, True

        return await self._run(insert)

    async def get(self, job_id: str) -> JobRecord | None:
        def get(db: sqlite3.Connection) -> JobRecord | None:
            row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            return _row_to_job(row) if row is not None else None

        return await self._run(get)

    async def list_jobs(
        self,
        status: JobStatus | None,
        model: str | None,
        page: int,
        page_size: int,
        owner: str | None = None,
    ) -> tuple[list[JobRecord], int]:
        where, args = [], []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if status is not None:
            where.append("status = ?")
            args.append(status.value)
        if model is not None:
            where.append("model = ?")
            args.append(model)
        clause = f"WHERE {' AND '.join(where)}" if where else ""

        def run(db: sqlite3.Connection) -> tuple[list[JobRecord], int]:
            (total,) = db.execute(f"SELECT count(*) FROM jobs {clause}", args).fetchone()
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM jobs {clause} ORDER BY created_at DESC, job_id LIMIT ? OFFSET ?",
                [*args, page_size, (page - 1) * page_size],
            ).fetchall()
            return [_row_to_job(r) for r in rows], int(total)

        return await self._run(run)

    async def claim(
        self, limit: int, room: Mapping[str, int], default_room: int, now: float
    ) -> list[JobRecord]:
        if limit <= 0:
            return []
        full = sorted(m for m, n in room.items() if n <= 0)
        clause = f"AND model NOT IN ({', '.join('?' * len(full))})" if full else ""

        def claim(db: sqlite3.Connection) -> list[JobRecord]:
            db.execute("BEGIN IMMEDIATE")
            try:
                # Candidates in order; a model's share is capped here, not in SQL.
                left = dict(room)
                ids: list[str] = []
                rows = db.execute(
                    f"SELECT job_id, model FROM jobs WHERE status = 'queued' {clause} "
                    "ORDER BY priority, created_at LIMIT ?",
                    [*full, limit * 8],
                )
                for job_id, model in rows:
                    share = left.get(model, default_room)
                    if share > 0:
                        ids.append(job_id)
                        left[model] = share - 1
                        if len(ids) >= limit:
                            break
                marks = ", ".join("?" * len(ids))
                if ids:
                    db.execute(
                        "UPDATE jobs SET status = 'processing', attempts = attempts + 1, started_at = ?, "
                        f"progress = NULL WHERE job_id IN ({marks})",
                        [now, *ids],
                    )
                query = f"SELECT {_COLUMNS} FROM jobs WHERE job_id IN ({marks}) ORDER BY priority, created_at"
                found = db.execute(query, ids).fetchall()
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return [_row_to_job(r) for r in found]

        return await self._run(claim)

    async def heartbeat(self, job_ids: list[str], now: float) -> None:
        return None  # one server per file: its leases end only when it does

    async def set_progress(self, job_id: str, progress: float) -> None:
        await self._run(
            lambda db: db.execute(
                "UPDATE jobs SET progress = ? WHERE job_id = ? AND status = 'processing'", (progress, job_id)
            )
        )

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
        progress = 1.0 if status is JobStatus.COMPLETED else None

        def finish(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "UPDATE jobs SET status = ?, completed_at = ?, response = ?, result_key = ?, error = ?, "
                "progress = coalesce(?, progress) WHERE job_id = ? AND status = 'processing'",
                (
                    status.value,
                    now,
                    response,
                    result_key,
                    orjson.dumps(error) if error is not None else None,
                    progress,
                    job_id,
                ),
            )
            return cur.rowcount == 1

        return await self._run(finish)

    async def release(self, job_id: str, count_attempt: bool) -> None:
        undo = 0 if count_attempt else 1
        await self._run(
            lambda db: db.execute(
                "UPDATE jobs SET status = 'queued', attempts = max(attempts - ?, 0), started_at = NULL, "
                "progress = NULL WHERE job_id = ? AND status = 'processing' AND cancel_requested = 0",
                (undo, job_id),
            )
        )

    async def request_cancel(self, job_id: str, now: float) -> JobRecord:
        def cancel(db: sqlite3.Connection) -> JobRecord:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "UPDATE jobs SET status = 'cancelled', completed_at = ? "
                    "WHERE job_id = ? AND status = 'queued'",
                    (now, job_id),
                )
                db.execute(
                    "UPDATE jobs SET cancel_requested = 1 WHERE job_id = ? AND status = 'processing'",
                    (job_id,),
                )
                row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            if row is None:
                raise not_found(job_id)
            return _row_to_job(row)

        return await self._run(cancel)

    async def cancel_requested(self, job_ids: list[str]) -> list[str]:
        if not job_ids:
            return []

        def run(db: sqlite3.Connection) -> list[str]:
            marks = ", ".join("?" * len(job_ids))
            rows = db.execute(
                f"SELECT job_id FROM jobs WHERE cancel_requested = 1 AND job_id IN ({marks})", job_ids
            ).fetchall()
            return [r[0] for r in rows]

        return await self._run(run)

    async def expire(self, now: float, queued_ttl: float, result_ttl: float) -> list[str]:
        error = never_started(queued_ttl)

        def run(db: sqlite3.Connection) -> list[str]:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "UPDATE jobs SET status = 'failed', completed_at = ?, error = ? "
                    "WHERE status = 'queued' AND created_at < ?",
                    (now, error, now - queued_ttl),
                )
                old = "status IN ('completed', 'failed', 'cancelled') AND completed_at < ?"
                cutoff = (now - result_ttl,)
                keyed = f"SELECT result_key FROM jobs WHERE {old} AND result_key IS NOT NULL"
                keys = [r[0] for r in db.execute(keyed, cutoff)]
                db.execute(f"DELETE FROM jobs WHERE {old}", cutoff)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return keys

        return await self._run(run)

    async def counts(self) -> dict[str, int]:
        def run(db: sqlite3.Connection) -> dict[str, int]:
            found = dict(db.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall())
            return {s.value: int(found.get(s.value, 0)) for s in JobStatus}

        return await self._run(run)
