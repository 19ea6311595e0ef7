"""The service layer every door (REST, gRPC, CLI, SDK) calls: inference and registry ops.

Routers translate to and from these calls and nothing else, so behaviour cannot differ
between interfaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelmora.config import Settings
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.inference.queue import parse_priority
from modelmora.inference.scheduler import Completed
from modelmora.jobs.results import ResultStore, build_result_store
from modelmora.lifecycle.channel import WorkItem
from modelmora.lifecycle.manager import ModelManager
from modelmora.registry.catalog import ModelRecord, ModelState, validate_name
from modelmora.registry.store import RegistryStore
from modelmora.tasks.base import SAMPLE_INPUTS
from modelmora.tasks.inputs import parse_input

# Request ids only need to be unique within this server (they name work items to its workers).
_request_ids = itertools.count(1)


class InferenceService:
    def __init__(self, settings: Settings, manager: ModelManager, results: ResultStore | None = None) -> None:
        self.settings = settings
        self.manager = manager
        # Where large results (images) go; the response then carries a URL.
        self.results = results or build_result_store(settings)

    async def infer(
        self,
        name: str,
        input_data: dict[str, Any],
        parameters: dict[str, Any] | None = None,
        *,
        priority: str | int | None = None,
        timeout_seconds: float | None = None,
        keep_alive: float | None = None,
        trace_id: str | None = None,
        disconnected: asyncio.Future[Any] | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Validate, queue, wait; returns the common response (results may hold numpy
        arrays: the REST layer serialises them without a copy through orjson). `on_event`
        receives the worker's events for this request (progress, tokens) on the loop."""
        received = self.manager.clock()
        validate_name(name)  # also refuses NAME@VERSION: the active version serves
        record = await self.manager.record(name)
        defaults = record.config.get("parameters") or {}
        params = {**defaults, **(parameters or {})}
        parsed = parse_input(record.task_type.value, input_data, params, self.settings.limits)
        level = parse_priority(priority)
        timeout = timeout_seconds or float(
            record.config.get("default_timeout_seconds") or self.settings.timeout_for(record.task_type.value)
        )
        deadline = received + timeout
        item = WorkItem(f"r{next(_request_ids)}", parsed.inputs, parsed.params, trace_id)
        # The ref count keeps the model from being evicted or reaped while this runs.
        slot = await self.manager.acquire(name, record, deadline)
        try:
            scheduler = slot.scheduler
            if scheduler is None:  # the worker died between load and use
                raise ModelMoraError(ErrorCode.WORKER_DIED, f"the worker of {name!r} is gone")
            if on_event is not None:
                slot.event_handlers[item.request_id] = lambda ev: on_event(ev.kind, ev.data)
            entry = scheduler.submit(item, level, deadline)
            try:
                done = await _wait(entry.payload.future, deadline - self.manager.clock(), disconnected)
            except asyncio.CancelledError:  # the handler itself was cancelled: drop the work
                scheduler.withdraw(entry)
                raise
            if done is None:
                scheduler.withdraw(entry)
                if disconnected is not None and disconnected.done():
                    raise ModelMoraError(ErrorCode.CANCELLED, "the client went away")
                raise ModelMoraError(
                    ErrorCode.INFERENCE_TIMEOUT,
                    f"no result within {timeout:g} s",
                    {"timeout_seconds": timeout},
                )
            loaded = slot.loaded
        finally:
            slot.event_handlers.pop(item.request_id, None)
            self.manager.release(slot, keep_alive)
        total_ms = (self.manager.clock() - received) * 1000
        return {
            "result": _result(record, done, parsed.single),
            "metadata": {
                "model": name,
                "version": slot.version,
                "task_type": record.task_type.value,
                "device": loaded.device if loaded else None,
                "batch_size": done.batch_size,
                "truncated": int(done.meta.get("truncated", 0)),  # type: ignore[call-overload]
            },
            "timing": {
                "queue_time_ms": round(done.queue_ms, 3),
                "inference_time_ms": round(done.inference_ms, 3),
                "total_time_ms": round(total_ms, 3),
            },
        }

    async def warmup(self, name: str) -> dict[str, Any]:
        """Load the model and run the task's built-in sample through the real path (queue,
        batcher, worker), so the first user request meets warm caches."""
        record = await self.manager.record(validate_name(name))
        sample = SAMPLE_INPUTS.get(record.task_type.value)
        if sample is None:
            await self.manager.load(name)
            return {"name": name, "warmed": False}
        response = await self.infer(name, {"text": sample.inputs}, dict(sample.params))
        return {"name": name, "warmed": True, "timing": response["timing"]}


async def _wait(
    future: asyncio.Future[Completed], timeout: float, disconnected: asyncio.Future[Any] | None
) -> Completed | None:
    """The result, or None when the deadline passed or the client went away first."""
    if timeout <= 0:
        return None
    if disconnected is None:
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            return None
    # Whichever comes first: the result, the client leaving, the deadline. Plain callbacks
    # rather than asyncio.wait, which costs several times more per request.
    watcher = disconnected
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    future.add_done_callback(wake)
    watcher.add_done_callback(wake)
    timer = loop.call_later(timeout, wake)
    try:
        await waiter
    finally:
        timer.cancel()
        future.remove_done_callback(wake)
        watcher.remove_done_callback(wake)
    if future.done():
        return future.result()
    return None


def _result(record: ModelRecord, done: Completed, single: bool) -> dict[str, Any]:
    value: Any = done.value
    if single:
        value = value[0]
    return {"embeddings": value}


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
                await self.manager.unload(name, "uninstalled", force=True)
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
