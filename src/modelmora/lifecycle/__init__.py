"""Which models are in memory: worker processes, their runners, and residency."""
