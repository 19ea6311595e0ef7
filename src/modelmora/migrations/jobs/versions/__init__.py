"""Revisions of the SQLite job store, oldest first (v<rev>_<slug>.py)."""
