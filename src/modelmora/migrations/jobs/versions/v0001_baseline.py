"""Baseline: the job store's schema as its `CREATE TABLE IF NOT EXISTS` script made it before
migrations existed (the same DDL, so a new file and an old one are alike to the byte).

A file made then (a jobs table, no alembic_version) is stamped with this revision instead of
running it. Frozen: a later change is a new revision, never an edit here.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
CREATE TABLE jobs (
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
    result_key TEXT,
    idempotency_key TEXT UNIQUE,
    request_hash TEXT NOT NULL,
    trace_id TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
)"""
    )
    op.execute("CREATE INDEX jobs_queue ON jobs (status, priority, created_at)")
    op.execute("CREATE INDEX jobs_created ON jobs (created_at)")


def downgrade() -> None:
    op.drop_table("jobs")
