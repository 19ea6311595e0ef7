"""Async jobs and the result store."""
