"""Keep-alive: unload a model once it has been idle past its keep-alive.

A model's keep-alive is the last request's `keep_alive`, else its own setting, else
`lifecycle.keep_alive_seconds`; `expired` (lifecycle/eviction.py) decides over a snapshot.
The loop wakes every second, or at once when a request with `keep_alive: 0` finishes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from modelmora.lifecycle.eviction import expired
from modelmora.lifecycle.residency import Residency
from modelmora.lifecycle.spare import WorkerSource

# Unloads a model whose keep-alive expired: (name, reason for people).
Unload = Callable[[str, str], Awaitable[object]]


class KeepAliveReaper:
    def __init__(
        self,
        residency: Residency,
        clock: Callable[[], float],
        unload: Unload,
        spares: WorkerSource,
        loading: asyncio.Lock,
    ) -> None:
        self.residency = residency
        self.clock = clock
        self.unload = unload
        self.spares = spares
        self.loading = loading  # held while a model loads
        self.wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="keep-alive-reaper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), 1.0)
            for name in expired(self.residency.residents(), self.clock()):
                slot = self.residency.slots.get(name)
                if slot is not None and slot.runner is not None and not slot.busy:
                    keep_alive = self.residency.keep_alive_of(slot)
                    with contextlib.suppress(Exception):
                        await self.unload(name, f"keep-alive of {keep_alive:g} s expired")
            # A spare given up for memory comes back once the budget has room again.
            if not self.loading.locked():
                self.spares.fill(quiet=True)
