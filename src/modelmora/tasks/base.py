"""The adapter contract the worker drives.

Which adapter serves which task is in the task specs (`tasks/specs.py`), by module path: an
adapter is imported only in the worker that loads it, so a worker pays for torch only when
its model needs it, and the server process never does.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from modelmora.contracts.channel import Outcome, WorkItem


class EmitFn(Protocol):
    """What `forward` gets: send a streamed event for one request, and ask whether a request
    was cancelled meanwhile, so long work (generation, diffusion steps) can drop it between
    steps and let its batch-mates continue."""

    def __call__(self, request_id: str, kind: str, data: dict[str, Any]) -> None: ...

    def cancelled(self, request_id: str) -> bool: ...


class Emitter:
    """The worker's EmitFn: events go out through `send`; cancellations are read from the set
    that the worker's channel reader fills while the model computes (a membership test under
    the GIL, no lock needed). A request past its deadline (`deadlines`: time.monotonic()
    values) counts as cancelled: nobody waits for its result any more."""

    __slots__ = ("_cancelled", "_deadlines", "_send")

    def __init__(
        self,
        send: Callable[[str, str, dict[str, Any]], None],
        cancelled: set[str],
        deadlines: Mapping[str, float] | None = None,
    ) -> None:
        self._send = send
        self._cancelled = cancelled
        self._deadlines = deadlines or {}

    def __call__(self, request_id: str, kind: str, data: dict[str, Any]) -> None:
        self._send(request_id, kind, data)

    def cancelled(self, request_id: str) -> bool:
        if request_id in self._cancelled:
            return True
        deadline = self._deadlines.get(request_id)
        return deadline is not None and time.monotonic() >= deadline


class RequestRejected(Exception):
    """Raised by an adapter for a request the model cannot serve as asked (a chat sent to a
    model without a chat template): the worker answers that request alone with `code`, an
    error code of modelmora.errors (VALIDATION_ERROR: the client's to fix), not as a failure."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# The request id of the health check run after a load (the fake adapter fails it on demand).
HEALTH_CHECK_ID = "health-check"

# A 16x16 PNG: image tasks check themselves with it (no Pillow needed to build it here).
SAMPLE_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAGklEQVR42mOssDnBQApgYiARjGoY1TB0NAAAvMQBnP/YHNIAAAAASUVORK5CYII="
)


class TaskAdapter(Protocol):
    device: str
    dtype: str

    def load(self, path: Path, device: str, dtype: str, options: dict[str, Any]) -> None: ...

    def preprocess(self, items: list[WorkItem]) -> Any:
        """CPU work (tokenising, decoding) that can overlap the model's work on another batch."""

    def forward(self, prepared: Any, emit: EmitFn) -> Any:
        """The model's work."""

    def postprocess(self, output: Any, items: list[WorkItem]) -> list[Outcome]:
        """One outcome per item, in order."""

    def info(self) -> dict[str, Any]: ...


# What a warm spare imports ahead of time: the libraries the real adapters load. An adapter
# whose spec says it needs no torch (`AdapterRef.uses_torch`: the fake ones) does not use it.
SPARE_MODULES = [
    "torch",
    "sentence_transformers",
    "transformers",
    "modelmora.tasks.txt2embed",
    "modelmora.tasks.txt2txt",
]
