"""What each script directory's env.py runs: migrations on the connection the caller opened.

`modelmora.migrations.upgrade` opens the connection (and takes the lock) and passes it in
`config.attributes`; there is no offline (`--sql`) mode and no URL read from a file.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection


def run_migrations() -> None:
    connection: Connection | None = context.config.attributes.get("connection")
    if connection is None or context.is_offline_mode():
        raise RuntimeError("run migrations through modelmora.migrations (or `modelmora db upgrade`)")
    context.configure(
        connection=connection,
        target_metadata=context.config.attributes.get("target_metadata"),
        # SQLite alters a table by copying it: autogenerate writes batch operations, which
        # PostgreSQL runs as plain ALTERs.
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():  # inside the caller's transaction: it commits
        context.run_migrations()
