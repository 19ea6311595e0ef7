"""Alembic's entry point for this script directory (see modelmora.migrations._env)."""

from modelmora.migrations._env import run_migrations

run_migrations()
