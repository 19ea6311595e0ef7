"""Logs, trace ids and (later) metrics."""
