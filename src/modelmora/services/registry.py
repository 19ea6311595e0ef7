"""Registry and management operations: one method each, called by REST, gRPC and the CLI.

The CLI runs these without a server (no manager: nothing is loaded), the server with its
`ModelManager`, so a catalog change happens in one place whatever door it came through.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
from pathlib import Path
from typing import Any

from modelmora.config import Settings
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.lifecycle.manager import ModelManager
from modelmora.lifecycle.state import UnloadKind
from modelmora.registry.catalog import ModelRecord, ModelState
from modelmora.registry.store import RegistryStore


class RegistryService:
    """Registry operations shared by REST and the CLI (which works without a server)."""

    def __init__(self, settings: Settings, store: RegistryStore, manager: ModelManager | None = None) -> None:
        self.settings = settings
        self.store = store
        self.manager = manager

    def live_state(self, name: str) -> dict[str, Any] | None:
        if self.manager is None:
            return None
        slot = self.manager.slots.get(name)
        return slot.status(self.manager.clock()) if slot is not None else None

    def describe(self, record: ModelRecord) -> dict[str, Any]:
        live = self.live_state(record.name)
        state = live["state"] if live else ModelState.REGISTERED.value
        return model_to_dict(record, state, live)

    async def list(
        self, task_type: str | None, status: str | None, page: int, page_size: int
    ) -> dict[str, Any]:
        """`{"data": [model...], "meta": {...}}`. A model's state is live, not stored: with a
        `status` filter the catalog is filtered in memory, then paged."""
        if status is None:
            records, total = await asyncio.to_thread(self.store.list, task_type, page, page_size)
            data = [self.describe(rec) for rec in records]
        else:
            records, _ = await asyncio.to_thread(self.store.list, task_type, 1, 1_000_000)
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

    def verify(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Hash the installed files again and compare with the registry (the `download` op:
        files are fetched at install, so this proves they are still there and intact)."""
        from modelmora.registry.lockfile import diff_files
        from modelmora.registry.sources import hash_folder

        record = self.store.get(name)
        v = record.version(version)
        path = Path(v.path)
        actual = hash_folder(path) if path.is_dir() else {}
        diff = diff_files(v.files, actual)
        if any(diff.values()):
            raise ModelMoraError(
                ErrorCode.CHECKSUM_MISMATCH,
                f"the files of {name}@{v.version} differ from the registry; reinstall it",
                {"model": name, "version": v.version, "path": str(path), **diff},
            )
        return {"name": name, "version": v.version, "verified": True, "files": len(actual)}

    async def delete(self, name: str, version: str | None, force: bool) -> ModelRecord:
        record = await asyncio.to_thread(self.store.get, name)
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
        deleted = await asyncio.to_thread(self.store.delete, record.name, version)
        remove_files(self.settings, deleted)
        return deleted


def remove_files(settings: Settings, deleted: ModelRecord) -> None:
    """Delete the files we own (copies under models_dir); the Hub cache is shared and kept."""
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
