"""The seam between the scheduler and one loaded model.

The scheduler (inference/) consumes it, the lifecycle package implements it twice
(`ProcessRunner`, one OS process per model; `InProcessRunner`, the same worker core in a thread
for fast tests), so it lives below both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from modelmora.contracts.channel import BatchDone, Event, Healthy, Loaded, LoadSpec, WorkerStats, WorkItem

EventHandler = Callable[[Event], None]
ExitHandler = Callable[[str], None]


class Runner(Protocol):
    """One loaded model. Methods raise ModelMoraError(WORKER_DIED) once the worker is gone."""

    @property
    def alive(self) -> bool: ...

    @property
    def pid(self) -> int | None: ...

    async def start(self, spec: LoadSpec, timeout: float) -> Loaded: ...

    async def infer(self, items: list[WorkItem], priority: int = 3) -> BatchDone: ...

    async def cancel(self, request_ids: list[str]) -> None: ...

    async def health(self, timeout: float = 5.0) -> Healthy: ...

    async def stats(self, timeout: float = 1.0) -> WorkerStats: ...

    async def close(self, grace: float) -> None: ...

    def rss_bytes(self) -> int: ...


RunnerFactory = Callable[[str, EventHandler, ExitHandler], Runner]
