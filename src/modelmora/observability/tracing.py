"""Trace ids: taken from a W3C `traceparent` header when present, else generated."""

from __future__ import annotations

import random
import re
from contextvars import ContextVar

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

current_trace_id: ContextVar[str | None] = ContextVar("trace_id", default=None)


def new_trace_id() -> str:
    # Not a secret, just unique: the PRNG is several times cheaper than os.urandom per request.
    return f"{random.getrandbits(128):032x}"


def trace_id_from(traceparent: str | None) -> str:
    """The trace id of a valid traceparent (version 00, non-zero ids), else a new one."""
    if traceparent:
        match = _TRACEPARENT.match(traceparent.strip().lower())
        if match and match.group(1) != "0" * 32 and match.group(2) != "0" * 16:
            return match.group(1)
    return new_trace_id()


def traceparent_for(trace_id: str) -> str:
    """A traceparent for the response, naming a fresh span of ours in the caller's trace."""
    return f"00-{trace_id}-{random.getrandbits(64):016x}-01"
