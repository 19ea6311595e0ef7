"""One warm spare worker: a process with torch and the model libraries already imported, no
model and no CUDA context, so that a lazy load only has to read weights.

Measured here: a fresh worker spends ~3.3 s of a ~4.7 s cold start importing torch and
sentence-transformers, and ~0.3 s reading MiniLM's weights. The spare moves the imports off
the request path. It counts against the memory budget and is the first thing given up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from modelmora.contracts.channel import Prepared
from modelmora.contracts.runner import EventHandler, ExitHandler, Runner
from modelmora.contracts.tasks import TaskType
from modelmora.lifecycle.eviction import Need
from modelmora.lifecycle.runners import ProcessRunner
from modelmora.tasks.base import SPARE_MODULES
from modelmora.tasks.specs import spec_for

log = logging.getLogger("modelmora.spare")

SPARE_NAME = "<spare>"
# A spare that failed to start or died is not retried sooner than this.
RETRY_AFTER_FAILURE_SECONDS = 60.0


class WorkerSource(Protocol):
    """Where the manager gets a worker started ahead of its load (`resources.worker_start`):
    the warm spare (`SparePool`), the zygote (`zygote_pool.ZygotePool`), or neither (a
    disabled SparePool: every load starts a fresh process). It counts against the memory
    budget as the resident `eviction.SPARE` and is the first thing given up."""

    kind: str
    label: str  # in log lines: "warm spare" or "zygote"
    fits: Callable[[], bool]

    @property
    def ready(self) -> bool: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def last_rss_bytes(self) -> int: ...

    def rss_bytes(self) -> int: ...

    def serves(self, task_type: str, adapter: str | None) -> bool:
        """Whether a load of this task should `take` from here."""
        ...

    def consumed_by(self, task_type: str, adapter: str | None) -> bool:
        """Whether such a load turns this source's memory into the model's (the spare does)."""
        ...

    def adjust_need(self, need: Need, measured: dict[str, Any] | None) -> Need:
        """The RAM a load will add when its worker comes from here."""
        ...

    def take(self, name: str, on_event: EventHandler, on_exit: ExitHandler) -> Runner | None: ...

    def fill(self, quiet: bool = False) -> None: ...

    async def wait_filled(self) -> None: ...

    async def discard(self) -> int: ...

    async def close(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


class SparePool:
    kind = "spare"
    label = "warm spare"

    def __init__(self, enabled: bool, prepare_timeout: float = 300.0) -> None:
        self.enabled = enabled
        # Asked before each fill: the spare may only use memory the budget has free.
        self.fits: Callable[[], bool] = lambda: True
        self.prepare_timeout = prepare_timeout
        self._ready: ProcessRunner | None = None
        self._prepared: Prepared | None = None
        self._filling: asyncio.Task[None] | None = None
        self._closed = False
        self._retry_after = 0.0  # monotonic time before which no new spare is started

    @property
    def ready(self) -> bool:
        return self._ready is not None and self._ready.alive

    @property
    def pid(self) -> int | None:
        return self._ready.pid if self._ready is not None else None

    def rss_bytes(self) -> int:
        return self._ready.rss_bytes() if self._ready is not None else 0

    @property
    def last_rss_bytes(self) -> int:
        """What the last spare measured after its imports (its size for budget planning)."""
        return self._prepared.rss_bytes if self._prepared is not None else 0

    def serves(self, task_type: str, adapter: str | None) -> bool:
        return _uses_torch(task_type, adapter)

    def consumed_by(self, task_type: str, adapter: str | None) -> bool:
        return self.ready and _uses_torch(task_type, adapter)

    def adjust_need(self, need: Need, measured: dict[str, Any] | None) -> Need:
        return need

    def status(self) -> dict[str, Any]:
        return {
            "kind": self.kind if self.enabled else "fresh",
            "ready": self.ready,
            "pid": self.pid,
            "rss_bytes": self.rss_bytes(),
        }

    def fill(self, quiet: bool = False) -> None:
        """Start a spare in the background unless one is ready or coming, the budget has no
        room for it, or a spare failed recently (`quiet`: the periodic retry, no log)."""
        if not self.enabled or self._closed or self.ready or self._filling is not None:
            return
        if time.monotonic() < self._retry_after:
            return
        if not self.fits():
            if not quiet:
                log.info("warm spare not refilled: the memory budget has no room for it")
            return
        self._filling = asyncio.create_task(self._fill(), name="spare-fill")

    async def wait_filled(self) -> None:
        if self._filling is not None:
            await asyncio.gather(self._filling, return_exceptions=True)

    async def _fill(self) -> None:
        runner = ProcessRunner(SPARE_NAME, lambda _e: None, self._on_spare_exit)
        try:
            prepared = await runner.prepare(SPARE_MODULES, self.prepare_timeout)
        except BaseException as exc:  # cancelled (discard) or failed: never leave the process
            await runner.close(grace=0)
            if not isinstance(exc, Exception):
                raise
            log.warning("warm spare failed to start", exc_info=True)
            self._retry_after = time.monotonic() + RETRY_AFTER_FAILURE_SECONDS
            return
        finally:
            self._filling = None
        if self._closed:
            await runner.close(grace=0)
            return
        self._ready, self._prepared = runner, prepared
        log.info(
            "warm spare ready",
            extra={
                "pid": runner.pid,
                "rss_mb": prepared.rss_bytes // 2**20,
                "import_s": round(prepared.seconds, 2),
            },
        )

    def _on_spare_exit(self, reason: str) -> None:
        log.warning("warm spare exited", extra={"reason": reason})
        self._ready = None
        self._retry_after = time.monotonic() + RETRY_AFTER_FAILURE_SECONDS

    def take(self, name: str, on_event: EventHandler, on_exit: ExitHandler) -> ProcessRunner | None:
        """The ready spare, now the model's; None when there is none (the caller spawns)."""
        runner, self._ready = self._ready, None
        if runner is None or not runner.alive:
            return None
        runner.adopt(name, on_event, on_exit)
        return runner

    async def discard(self) -> int:
        """Give the spare up (memory pressure): returns the bytes freed."""
        runner, self._ready = self._ready, None
        if self._filling is not None:
            self._filling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filling
            self._filling = None
        if runner is None:
            return 0
        freed = runner.rss_bytes()
        await runner.close(grace=2)
        return freed

    async def close(self) -> None:
        self._closed = True
        await self.discard()


def _uses_torch(task_type: str, adapter: str | None) -> bool:
    """A warm spare holds torch and the task libraries: only a worker that needs them takes it."""
    return spec_for(TaskType(task_type)).uses_torch(adapter)
