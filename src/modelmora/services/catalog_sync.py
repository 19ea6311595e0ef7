"""Catalog changes seen by every replica: each one learns of a write made anywhere (another
replica, the CLI) and brings its loaded models and its disk in line.

Every catalog write bumps the catalog version and records the change in the registry
database, in the write's own transaction (registry/store.py). A replica keeps the version it
has applied and reads the changes after it:

- at once when PostgreSQL sends the NOTIFY of a commit (`LISTEN` on its own connection;
  reconnected with a pause when the connection drops), or when this replica's own
  `RegistryService` made the change;
- every `registry.catalog_poll_seconds` anyway: the safety net (a dropped notification, a
  listener reconnecting) and the only way on SQLite.

The reaction looks at the catalog as it is now rather than replaying the change, so it does
the same thing whatever the order or the number of times it runs (`reconcile`):

- the model is gone: its worker stops at once (force: its requests fail) and the slot goes;
- the loaded version is no longer the active one, or a setting the worker was started with
  changed (`RELOAD_KEYS`): the next request loads anew while the old worker drains;
- any other setting (parameters, timeouts, keep-alive): taken into the slot's record.

An uninstall also removes this node's copies of the versions removed (under `models_dir`;
Hub snapshots stay in the shared Hugging Face cache), unless the version came back since.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from modelmora.config import Settings
from modelmora.lifecycle.manager import ModelManager
from modelmora.lifecycle.state import UnloadKind
from modelmora.registry.paths import roots_of, to_local
from modelmora.registry.store import CATALOG_CHANNEL, CatalogChangeRow, RegistryStore
from modelmora.services.registry import RegistryService

log = logging.getLogger("modelmora.catalog_sync")

# Per-model settings a running worker was started with: a change needs a new worker.
RELOAD_KEYS = ("device", "dtype", "adapter", "options", "max_batch_size", "max_wait_ms")
LISTEN_RETRY_SECONDS = 2.0


class CatalogSync:
    def __init__(
        self,
        settings: Settings,
        store: RegistryStore,
        manager: ModelManager,
        registry: RegistryService | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.manager = manager
        self.registry = registry
        self.version = 0  # the catalog version this replica has applied
        self.applied = 0  # changes applied since start (status, tests)
        self.listening = False  # a PostgreSQL LISTEN connection is up
        self.last_sync: float | None = None  # wall-clock time of the last successful read
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._unsubscribe: Callable[[], None] = lambda: None
        self._rechecks: set[asyncio.Task[None]] = set()
        self._one_at_a_time = asyncio.Lock()  # the poll loop and a caller never interleave

    async def start(self) -> None:
        self.version = await asyncio.to_thread(self.store.catalog_version)
        self._tasks.append(asyncio.create_task(self._poll_loop(), name="catalog-sync"))
        if self.store.engine.dialect.name == "postgresql":
            self._tasks.append(asyncio.create_task(self._listen_loop(), name="catalog-listen"))
        if self.registry is not None:
            # Our own writes: applied now, not at the next poll.
            self._unsubscribe = self.registry.subscribe(lambda _event: self._wake.set())

    async def stop(self) -> None:
        self._unsubscribe()
        for task in [*self._tasks, *self._rechecks]:
            task.cancel()
        for task in [*self._tasks, *self._rechecks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    def status(self) -> dict[str, object]:
        return {
            "catalog_version": self.version,
            "changes_applied": self.applied,
            "listening": self.listening,
            "last_sync": self.last_sync,
        }

    # -- learning of changes ------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        poll = self.settings.registry.catalog_poll_seconds
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), poll)
            self._wake.clear()
            try:
                await self.sync()
            except Exception:
                log.warning("reading the catalog changes failed", exc_info=True)

    async def _listen_loop(self) -> None:
        import psycopg
        from sqlalchemy import make_url

        url = make_url(self.store.url).set(drivername="postgresql").render_as_string(hide_password=False)
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CATALOG_CHANNEL}")
                    self.listening = True
                    self._wake.set()  # whatever was committed while nobody listened
                    async for _notify in conn.notifies():
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "catalog LISTEN connection lost; polling until it is back",
                    extra={"error": f"{type(exc).__name__}: {exc}"},
                )
            finally:
                self.listening = False
            await asyncio.sleep(LISTEN_RETRY_SECONDS)

    async def sync(self) -> None:
        """Apply every change after the version this replica has, in order."""
        async with self._one_at_a_time:
            await self._sync()

    async def _sync(self) -> None:
        found = await asyncio.to_thread(self.store.changes_since, self.version)
        if found is None:  # further behind than the change log keeps
            current = await asyncio.to_thread(self.store.catalog_version)
            log.warning("behind the catalog change log: reconciling every model", extra={"to": current})
            for name in list(self.manager.slots):
                await self.reconcile(name)
            self.version = current
        else:
            changes, current = found
            for change in changes:
                await self.apply(change)
                self.version = change.version
            self.version = max(self.version, current)
        self.last_sync = time.time()

    # -- reacting ------------------------------------------------------------------------------

    async def apply(self, change: CatalogChangeRow) -> None:
        log.info(
            "catalog change",
            extra={
                "catalog_version": change.version,
                "change": change.kind,
                "model": change.model,
                "version": change.model_version,
            },
        )
        await self.reconcile(change.model)  # first: stop serving what is gone
        if change.kind == "uninstalled":
            await asyncio.to_thread(self._remove_copies, change)
        self.applied += 1

    async def reconcile(self, name: str) -> None:
        """Bring the model's slot in line with the catalog as it is now."""
        slot = self.manager.slots.get(name)
        if slot is None:
            return
        if slot.load_task is not None:
            # A load under way read the record before this change, maybe: look again after it.
            slot.load_task.add_done_callback(lambda _t: self._recheck(name))
            return
        record = await asyncio.to_thread(self.store.find, name)
        if record is None:
            if slot.runner is not None:
                await self.manager.unload(name, "uninstalled", force=True, kind=UnloadKind.UNINSTALL)
            self.manager.forget(name)
            return
        if slot.runner is None:
            slot.record = record
            return
        if slot.version != record.active_version:
            await self.manager.retire(
                name, f"version {record.active_version} is now active (was {slot.version})"
            )
            return
        changed = [k for k in RELOAD_KEYS if slot.record.config.get(k) != record.config.get(k)]
        if changed:
            await self.manager.retire(name, f"settings changed: {', '.join(changed)}")
            return
        record.memory = slot.record.memory or record.memory  # measured at this load
        slot.record = record

    def _recheck(self, name: str) -> None:
        task = asyncio.get_running_loop().create_task(self.reconcile(name))
        self._rechecks.add(task)
        task.add_done_callback(self._rechecks.discard)

    def _remove_copies(self, change: CatalogChangeRow) -> None:
        """This node's copies of the versions an uninstall removed (ModelMora's own, under
        models_dir), unless the version was installed again since."""
        record = self.store.find(change.model)
        kept = {v.version for v in record.versions} if record is not None else set()
        roots = roots_of(self.settings)
        root = roots.models.resolve()
        for gone in change.details.get("versions", []):
            if gone.get("version") in kept or gone.get("source_kind") == "hub":
                continue
            path = Path(to_local(roots, str(gone.get("source_kind")), str(gone.get("path")))).resolve()
            if path.is_relative_to(root) and path != root and path.exists():
                shutil.rmtree(path, ignore_errors=True)
                log.info("removed the local copy of an uninstalled version", extra={"path": str(path)})
        if record is None:
            with contextlib.suppress(OSError):
                (root / change.model).rmdir()  # only when empty
