"""Alembic script directory of the SQLite job store."""
