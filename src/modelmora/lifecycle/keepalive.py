"""Keep-alive: unload a model once it has been idle past its keep-alive.

A model's keep-alive is the last request's `keep_alive`, else its own setting, else
`lifecycle.keep_alive_seconds`; `expired` (lifecycle/eviction.py) decides over a snapshot.
The loop wakes every second, or at once when a request with `keep_alive: 0` finishes.

The same loop restarts an idle worker whose RSS stayed above its high-water mark after a
request (`resources.worker_rss_high_water_mb`, else `worker_rss_growth_factor` times its RSS
after the load): memory an allocator keeps after a huge request is given back only when the
process ends. The model is unloaded (`UnloadKind.MEMORY`) and loads again on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from modelmora.lifecycle.eviction import expired
from modelmora.lifecycle.residency import Residency
from modelmora.lifecycle.spare import WorkerSource
from modelmora.lifecycle.state import ModelSlot

log = logging.getLogger("modelmora.lifecycle")

# The growth factor's mark is at least this far above the RSS after the load: a small model
# legitimately grows by its first batches' buffers.
MIN_GROWTH_BYTES = 512 << 20

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
        restart: Unload | None = None,
    ) -> None:
        self.residency = residency
        self.clock = clock
        self.unload = unload
        self.restart = restart  # unloads a worker over its RSS high-water mark
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
            if self.restart is not None:
                await self._restart_bloated()
            # A spare given up for memory comes back once the budget has room again.
            if not self.loading.locked():
                self.spares.fill(quiet=True)

    def high_water(self, slot: ModelSlot) -> int | None:
        """The RSS above which this model's idle worker is restarted; None: never."""
        resources = self.residency.settings.resources
        if resources.worker_rss_high_water_mb is not None:
            return resources.worker_rss_high_water_mb << 20
        factor = resources.worker_rss_growth_factor
        if factor is None or slot.rss_baseline <= 0:
            return None
        return max(int(slot.rss_baseline * factor), slot.rss_baseline + MIN_GROWTH_BYTES)

    async def _restart_bloated(self) -> None:
        """Check each idle worker once after its requests (a request finished since the last
        check: `last_used` moved), and restart one whose RSS is above its mark."""
        assert self.restart is not None
        for name, slot in list(self.residency.slots.items()):
            runner = slot.runner
            if runner is None or slot.busy or not slot.is_ready() or slot.last_used <= slot.rss_checked_at:
                continue
            slot.rss_checked_at = self.clock()
            mark = self.high_water(slot)
            if mark is None:
                continue
            rss = runner.rss_bytes()
            if rss > mark:
                log.warning(
                    "worker above its RSS high-water mark: restarting it",
                    extra={"model": name, "rss_mb": rss >> 20, "high_water_mb": mark >> 20},
                )
                with contextlib.suppress(Exception):
                    await self.restart(
                        name, f"RSS {rss >> 20} MiB above the high-water mark {mark >> 20} MiB"
                    )
