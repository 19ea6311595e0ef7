"""Revisions of the registry database, oldest first (v<rev>_<slug>.py)."""
