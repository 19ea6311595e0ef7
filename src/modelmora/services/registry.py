"""The catalog: one method per registry operation of the API contract, whatever door calls it.

REST, gRPC and the CLI each translate their request into one call here and the result back,
so an install (or update, use, uninstall, lock) behaves the same through all three, and every
catalog write passes through one place where it can be observed (`on_change`) and audited
(one `modelmora.audit` line per admin operation, with its outcome: auth/audit.py).

The server builds this with its `ModelManager` (live states; uninstall refuses or unloads a
loaded model). The CLI builds it without one: it writes the database in the data dir with no
server, and runs the blocking steps on its own thread (`offload=inline`) so that Ctrl-C
interrupts an install where it is and the installer's cleanup runs.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import math
import shutil
from collections.abc import Callable, Coroutine, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar

from modelmora.auth.audit import audited
from modelmora.config import Settings
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.lifecycle.state import UnloadKind
from modelmora.registry.catalog import CONFIG_KEYS, ModelRecord, ModelState, parse_ref, validate_name
from modelmora.registry.installer import (
    InstallRequest,
    install,
    install_from_lock_entry,
    lock_entries,
    validate_config,
)
from modelmora.registry.lockfile import LockEntry, build_lock, diff_files, read_lock, write_lock
from modelmora.registry.policy import InstallPolicy
from modelmora.registry.store import RegistryStore
from modelmora.services.events import CatalogChange, CatalogEvent, CatalogObserver

if TYPE_CHECKING:
    from modelmora.lifecycle.manager import ModelManager

log = logging.getLogger("modelmora.services.registry")

P = ParamSpec("P")
T = TypeVar("T")

# The record fields an update may set besides the per-model settings (`config`).
RECORD_FIELDS = ("display_name", "description", "resource_requirements")
EVERYTHING = 1_000_000  # a page size that holds the whole catalog


class Offload(Protocol):
    """How a blocking step (database, files, downloads) runs: `asyncio.to_thread` in the
    server, `inline` in the CLI."""

    def __call__(
        self, func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[Any, Any, T]: ...


async def inline(func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a blocking step on the caller's thread (the CLI, which has nothing else to serve)."""
    return func(*args, **kwargs)


LiveState = Callable[[str], dict[str, Any] | None]


class RegistryService:
    """Install, list, get, update, use, uninstall, lock, apply a lock, verify."""

    def __init__(
        self,
        settings: Settings,
        store: RegistryStore,
        manager: ModelManager | None = None,
        *,
        live: LiveState | None = None,
        offload: Offload = asyncio.to_thread,
        policy: InstallPolicy | None = None,
    ) -> None:
        self.settings = settings
        # What installs and updates may fetch and set (the API's doors); None: trusted (CLI).
        self.policy = policy
        self.store = store
        self.manager = manager
        self._live = live
        self._offload = offload
        # Called, in order, after every committed catalog write (see `subscribe`).
        self.on_change: list[CatalogObserver] = []

    # -- observers --------------------------------------------------------------------------

    def subscribe(self, observer: CatalogObserver) -> Callable[[], None]:
        """Call `observer` after every catalog write; returns what unsubscribes it. Observers
        run on the thread that made the change (the event loop's in the server)."""
        self.on_change.append(observer)
        return lambda: self.on_change.remove(observer)

    def _changed(self, kind: CatalogChange, model: str, version: str | None) -> None:
        event = CatalogEvent(kind, model, version)
        log.info("catalog changed", extra={"change": kind.value, "model": model, "version": version})
        for observer in list(self.on_change):
            # The write is committed: a failing observer must not make it look failed.
            try:
                observer(event)
            except Exception:
                log.exception("catalog observer failed", extra={"change": kind.value, "model": model})

    # -- reads ------------------------------------------------------------------------------

    def live_state(self, name: str) -> dict[str, Any] | None:
        """The model's state in the running server (None: not known to it)."""
        if self._live is not None:
            return self._live(name)
        if self.manager is None:
            return None
        slot = self.manager.slots.get(name)
        return slot.status(self.manager.clock()) if slot is not None else None

    def describe(self, record: ModelRecord) -> dict[str, Any]:
        live = self.live_state(record.name)
        state = live["state"] if live else ModelState.REGISTERED.value
        return model_to_dict(record, state, live)

    async def get(self, name: str) -> dict[str, Any]:
        """One model's record; `name` may be `NAME@VERSION` (the version is checked, the
        record is the model's)."""
        model, _ = parse_ref(name)
        return self.describe(await self._offload(self.store.get, model))

    async def list(
        self, task_type: str | None = None, status: str | None = None, page: int = 1, page_size: int = 50
    ) -> dict[str, Any]:
        """`{"data": [model...], "meta": {...}}`. A model's state is live, not stored: with a
        `status` filter the catalog is filtered in memory, then paged."""
        if status is None:
            records, total = await self._offload(self.store.list, task_type, page, page_size)
            data = [self.describe(rec) for rec in records]
        else:
            records, _ = await self._offload(self.store.list, task_type, 1, EVERYTHING)
            everything = [d for d in map(self.describe, records) if d["state"] == status]
            total = len(everything)
            data = everything[(page - 1) * page_size : page * page_size]
        meta = {
            "total": total,
            "page": page,
            "page_size": page_size,
            "total_pages": math.ceil(total / page_size),
        }
        return {"data": data, "meta": meta}

    async def lock(self, output: Path | None = None) -> dict[str, Any]:
        """The lock document of the whole catalog (every model's active version: origin,
        revision, per-file sha256); with `output`, also written there atomically."""
        with audited("catalog.lock", str(output) if output is not None else None) as learned:
            records, _ = await self._offload(self.store.list, None, 1, EVERYTHING)
            entries, now = lock_entries(records), datetime.now(UTC)
            learned["models"] = len(entries)
            if output is not None:
                await self._offload(write_lock, output, entries, now)
            return build_lock(entries, now)

    async def verify(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Hash the installed files again and compare with the registry (the `download` op:
        files are fetched at install, so this proves they are still there and intact)."""
        return await self._offload(self._verify, validate_name(name), version)

    def _verify(self, name: str, version: str | None) -> dict[str, Any]:
        from modelmora.lifecycle.verify import CACHE_FILE, WeightsVerifier

        v = self.store.get(name).version(version)
        path = Path(v.path)
        # Recorded in the loads' verified-files cache: a model failed by a mismatch is
        # served again once this passes (lifecycle/loading.py).
        verifier = WeightsVerifier(self.settings.server.data_dir / CACHE_FILE)
        actual = verifier.rehash_folder(path) if path.is_dir() else {}
        diff = diff_files(v.files, actual)
        if any(diff.values()):
            raise ModelMoraError(
                ErrorCode.CHECKSUM_MISMATCH,
                f"the files of {name}@{v.version} differ from the registry; reinstall it",
                {"model": name, "version": v.version, "path": str(path), **diff},
            )
        return {"name": name, "version": v.version, "verified": True, "files": len(actual)}

    # -- writes (each fires one catalog event once committed) --------------------------------

    async def install(self, req: InstallRequest, progress: bool = False) -> dict[str, Any]:
        """Fetch the files, detect the task, record the version; the model's record back."""
        target = req.name or req.model_id or req.source
        with audited("model.install", target, source=req.source, model_id=req.model_id) as learned:
            record = await self._offload(install, self.settings, self.store, req, progress, self.policy)
            # Versions are unique per model and stamped at install: the newest is this one.
            installed = max(record.versions, key=lambda v: v.installed_at)
            learned.update(name=record.name, version=installed.version)
            self._changed(CatalogChange.INSTALLED, record.name, installed.version)
            return self.describe(record)

    async def apply_lock(
        self,
        path: Path,
        progress: bool = False,
        on_entry: Callable[[LockEntry, str], None] | None = None,
    ) -> builtins.list[tuple[LockEntry, str]]:
        """Install every model of a lock file, checksums verified: each entry is 'installed'
        or 'present' (already there, files checked on disk). `on_entry` hears each one as it
        is done (the CLI prints it); the first mismatch stops with CHECKSUM_MISMATCH."""
        done: builtins.list[tuple[LockEntry, str]] = []
        with audited("catalog.apply_lock", str(path)) as learned:
            installed: builtins.list[str] = []
            learned["installed"] = installed
            entries: Iterable[LockEntry] = await self._offload(read_lock, path)
            for entry in entries:
                outcome = await self._offload(
                    install_from_lock_entry, self.settings, self.store, entry, progress, self.policy
                )
                if outcome == "installed":
                    installed.append(f"{entry.name}@{entry.version}")
                    self._changed(CatalogChange.INSTALLED, entry.name, entry.version)
                done.append((entry, outcome))
                if on_entry is not None:
                    on_entry(entry, outcome)
            return done

    async def update(
        self, name: str, config: dict[str, Any], fields: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Change per-model settings (`config`: known keys, a None value removes one) and the
        record's own `fields` (display_name, description, resource_requirements)."""
        # The settings as asked (an adapter swapped is what an audit is read for); the
        # record's descriptive fields by name only.
        with audited("model.update", name, config=config, fields=sorted(fields or {})):
            changes = validate_config(config)
            if self.policy is not None:
                self.policy.check_config(changes)
            for key, value in (fields or {}).items():
                if key not in RECORD_FIELDS:
                    known = ", ".join(sorted((*RECORD_FIELDS, *CONFIG_KEYS)))
                    raise ModelMoraError(
                        ErrorCode.VALIDATION_ERROR,
                        f"{key}: unknown field; known: {known}",
                        {"errors": [{"field": key, "message": "unknown field"}]},
                    )
                changes[key] = value
            record = await self._offload(self.store.update, validate_name(name), changes)
            self._changed(CatalogChange.UPDATED, record.name, None)
            return self.describe(record)

    async def use(self, name: str, version: str) -> dict[str, Any]:
        """Make `version` the active one (a loaded model switches at its next load)."""
        with audited("model.use", f"{name}@{version}"):
            model, checked = parse_ref(f"{name}@{version}")
            assert checked is not None  # the "@" is there
            record = await self._offload(self.store.set_active, model, checked)
            self._changed(CatalogChange.ACTIVATED, record.name, checked)
            return self.describe(record)

    async def uninstall(self, ref: str, force: bool = False) -> dict[str, Any]:
        """Remove a model (`NAME`) or one version (`NAME@VERSION`) and the files ModelMora
        copied for it. A loaded model is refused with MODEL_LOADED, or unloaded with `force`."""
        with audited("model.uninstall", ref, force=force):
            return await self._uninstall(ref, force)

    async def _uninstall(self, ref: str, force: bool) -> dict[str, Any]:
        name, version = parse_ref(ref)
        record = await self._offload(self.store.get, name)
        if self.manager is not None:
            slot = self.manager.slots.get(name)
            if slot is not None and slot.runner is not None:
                if not force:
                    raise ModelMoraError(
                        ErrorCode.MODEL_LOADED,
                        f"model {name!r} is loaded; unload it first or pass force",
                        {"model": name, "state": slot.state.value},
                    )
                await self.manager.unload(name, "uninstalled", force=True, kind=UnloadKind.UNINSTALL)
            self.manager.forget(name)
        deleted = await self._offload(self.store.delete, record.name, version)
        await self._offload(remove_files, self.settings, deleted)
        self._changed(CatalogChange.UNINSTALLED, deleted.name, version)
        return {"deleted": deleted.name, "versions": [v.version for v in deleted.versions]}


def remove_files(settings: Settings, deleted: ModelRecord) -> None:
    """Delete the files we own (copies under models_dir, and the model store's copy); the
    Hub cache is shared with other tools and kept. Other replicas remove their own copies
    when they hear of the change (services/catalog_sync.py)."""
    from modelmora.registry.model_store import open_model_store

    model_store = open_model_store(settings)
    if model_store is not None:
        for v in deleted.versions:
            try:
                model_store.delete(deleted.name, v.version)
            except Exception:
                where = model_store.location
                log.warning(
                    "could not delete from the model store",
                    extra={"model": deleted.name, "version": v.version, "store": where},
                    exc_info=True,
                )
    root = settings.models_dir.resolve()
    for v in deleted.versions:
        path = Path(v.path).resolve()
        if path.is_relative_to(root) and path != root:
            with contextlib.suppress(OSError):
                shutil.rmtree(path)
    if deleted.versions:
        with contextlib.suppress(OSError):
            (root / deleted.name).rmdir()  # only when empty


def model_to_dict(record: ModelRecord, state: str, live: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": record.name,
        "model_id": record.model_id,
        "task_type": record.task_type.value,
        "display_name": record.display_name,
        "description": record.description,
        "active_version": record.active_version,
        "versions": [
            {
                "version": v.version,
                "revision": v.revision,
                "origin": v.origin,
                "source_kind": v.source_kind,
                "path": v.path,
                "files": v.files,
                "size_bytes": v.size_bytes,
                "installed_at": v.installed_at.isoformat(),
            }
            for v in record.versions
        ],
        "state": state,
        "config": record.config,
        "resource_requirements": record.resource_requirements,
        "memory": (live or {}).get("memory") or record.memory,
        "created_at": record.created_at.isoformat() if record.created_at else None,
        "updated_at": record.updated_at.isoformat() if record.updated_at else None,
    }
