"""Job owner: who may read a job, and the namespace of its idempotency key.

Adds `owner` (NOT NULL) and replaces the table-wide `UNIQUE (idempotency_key)` with a unique
index on `(owner, idempotency_key)`, so two callers' equal keys name two jobs and neither
learns the other's job id from a 409. Every job stored before this revision was made with
auth off (authentication came with it), so existing rows get the anonymous owner: with auth
still off nothing changes for them (idempotency keys in flight keep working), and once auth
is on they are visible to admins only.

SQLite cannot drop a column constraint, so the table is rebuilt (its documented 12-step
procedure, inside the migration's transaction): new table, copy, drop, rename, indexes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-09
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_COMMON = """
    job_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    request BLOB NOT NULL,
    priority INTEGER NOT NULL,
    status TEXT NOT NULL,
    progress REAL,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error BLOB,
    response BLOB,
    result_key TEXT,"""

_COPIED = (
    "job_id, model, request, priority, status, progress, created_at, started_at, completed_at, "
    "attempts, error, response, result_key, idempotency_key, request_hash, trace_id, cancel_requested"
)


def upgrade() -> None:
    op.execute(
        f"""
CREATE TABLE jobs_new ({_COMMON}
    idempotency_key TEXT,
    request_hash TEXT NOT NULL,
    trace_id TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    owner TEXT NOT NULL
)"""
    )
    op.execute(f"INSERT INTO jobs_new ({_COPIED}, owner) SELECT {_COPIED}, 'anonymous' FROM jobs")
    op.execute("DROP TABLE jobs")  # and its indexes
    op.execute("ALTER TABLE jobs_new RENAME TO jobs")
    op.execute("CREATE INDEX jobs_queue ON jobs (status, priority, created_at)")
    op.execute("CREATE INDEX jobs_created ON jobs (created_at)")
    op.execute("CREATE UNIQUE INDEX jobs_owner_idempotency ON jobs (owner, idempotency_key)")
    op.execute("CREATE INDEX jobs_owner_created ON jobs (owner, created_at)")


def downgrade() -> None:
    # Back to one key space: where owners used the same key, the oldest job keeps it.
    op.execute(
        f"""
CREATE TABLE jobs_old ({_COMMON}
    idempotency_key TEXT UNIQUE,
    request_hash TEXT NOT NULL,
    trace_id TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
)"""
    )
    keep_key = (
        "CASE WHEN NOT EXISTS (SELECT 1 FROM jobs o WHERE o.idempotency_key = jobs.idempotency_key "
        "AND (o.created_at, o.job_id) < (jobs.created_at, jobs.job_id)) THEN idempotency_key END"
    )
    columns = _COPIED.replace("idempotency_key", keep_key)
    op.execute(f"INSERT INTO jobs_old ({_COPIED}) SELECT {columns} FROM jobs")
    op.execute("DROP TABLE jobs")
    op.execute("ALTER TABLE jobs_old RENAME TO jobs")
    op.execute("CREATE INDEX jobs_queue ON jobs (status, priority, created_at)")
    op.execute("CREATE INDEX jobs_created ON jobs (created_at)")
