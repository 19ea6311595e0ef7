"""Alembic script directory of the registry database (models, versions)."""
