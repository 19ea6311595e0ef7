"""Replicas that share: the catalog version and its change log; version paths made relative.

- `catalog_state` (one row, id 1) holds the catalog version every catalog write bumps, and
  `catalog_changes` what each version changed (registry/store.py).
- `model_versions.path` held the installing node's absolute path; it becomes relative to the
  root its files belong under (registry/paths.py): `<name>/<version>` for a copy under
  `models_dir`, `models--org--name/snapshots/<sha>` for a Hub snapshot. A path that fits
  neither layout stays absolute. The downgrade cannot know the roots, so it leaves the paths
  relative (a server of the previous revision then cannot find those files: reinstall).

Revision ID: 0003
Revises: 0001
Create Date: 2026-12-10
"""

from __future__ import annotations

from pathlib import PurePosixPath

import sqlalchemy as sa
from alembic import op

revision = "0003"
# After 0002 (API keys).
down_revision: str | None = "0002"
branch_labels = None
depends_on = None


def relative_from_absolute(path: str, model: str, version: str, source_kind: str) -> str | None:
    """The rule of registry/paths.py as it was when this revision was written (frozen here)."""
    pure = PurePosixPath(path)
    if not pure.is_absolute():
        return None
    parts = pure.parts
    if source_kind == "hub":
        for index, part in enumerate(parts):
            if part.startswith("models--"):
                return PurePosixPath(*parts[index:]).as_posix()
        return None
    if len(parts) >= 3 and parts[-2:] == (model, version):
        return f"{model}/{version}"
    return None


def upgrade() -> None:
    op.create_table(
        "catalog_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "catalog_changes",
        sa.Column("version", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("version"),
    )
    conn = op.get_bind()
    conn.execute(sa.text("INSERT INTO catalog_state (id, version) VALUES (1, 0)"))
    rows = conn.execute(
        sa.text("SELECT id, model_name, version, source_kind, path FROM model_versions")
    ).all()
    for row_id, model, version, source_kind, path in rows:
        relative = relative_from_absolute(path, model, version, source_kind)
        if relative is not None:
            conn.execute(
                sa.text("UPDATE model_versions SET path = :path WHERE id = :id"),
                {"path": relative, "id": row_id},
            )


def downgrade() -> None:
    op.drop_table("catalog_changes")
    op.drop_table("catalog_state")
