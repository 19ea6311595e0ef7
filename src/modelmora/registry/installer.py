"""Install a model: fetch its files, detect its task, record versions and checksums.

All or nothing: a failure at any step leaves no row and no copied files behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modelmora.config import Settings
from modelmora.contracts.tasks import TaskType
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry.catalog import (
    CONFIG_KEYS,
    ModelRecord,
    ModelVersion,
    derive_name,
    detect_task,
    is_hub_id,
    validate_name,
    validate_version,
)
from modelmora.registry.lockfile import LockEntry
from modelmora.registry.model_store import ModelStore, fetch, is_complete, open_model_store, upload
from modelmora.registry.policy import InstallPolicy
from modelmora.registry.store import RegistryStore


@dataclass
class InstallRequest:
    model_id: str | None = None
    source: str | None = None
    name: str | None = None
    version: str | None = None
    revision: str | None = None
    task_type: str | None = None
    display_name: str | None = None
    description: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    resource_requirements: dict[str, Any] = field(default_factory=dict)
    expected_files: dict[str, str] | None = None  # from a lock file
    activate: bool = True


def _bad(field_name: str, message: str) -> ModelMoraError:
    return ModelMoraError(
        ErrorCode.VALIDATION_ERROR,
        f"{field_name}: {message}",
        {"errors": [{"field": field_name, "message": message}]},
    )


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Per-model settings: known keys with the right types (task defaults are free-form)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key not in CONFIG_KEYS:
            raise _bad(f"config.{key}", f"unknown setting; known: {', '.join(sorted(CONFIG_KEYS))}")
        expected = CONFIG_KEYS[key]
        if value is None:
            out[key] = value
            continue
        try:
            out[key] = expected(value)
        except (TypeError, ValueError) as exc:
            raise _bad(f"config.{key}", f"must be {expected.__name__}") from exc
        if key == "batching" and out[key] not in ("continuous", "static"):
            raise _bad("config.batching", "must be continuous or static")
    return out


def install(
    settings: Settings,
    store: RegistryStore,
    req: InstallRequest,
    progress: bool = False,
    policy: InstallPolicy | None = None,
) -> ModelRecord:
    """`policy`: the API's install rules (registry/policy.py); None for the trusted CLI."""
    if req.model_id is None and req.source is None:
        raise _bad("model_id", "a model ID or a source is required")
    if req.source is None and req.model_id is not None and not is_hub_id(req.model_id):
        raise _bad("model_id", f"{req.model_id!r} is not a Hub ID (org/name); pass a source for other IDs")
    name = validate_name(req.name) if req.name else derive_name(req.model_id, req.source)
    if req.version:
        validate_version(req.version)
    task: TaskType | None = None
    if req.task_type:
        try:
            task = TaskType(req.task_type)
        except ValueError as exc:
            raise _bad("task_type", f"must be one of {', '.join(t.value for t in TaskType)}") from exc
    config = validate_config(req.config)
    if policy is not None:
        policy.check_config(config)
    existing = store.find(name)
    if existing and req.version and any(v.version == req.version for v in existing.versions):
        raise ModelMoraError(
            ErrorCode.MODEL_EXISTS, f"model {name}@{req.version} is already installed", {"model": name}
        )

    from modelmora.registry import sources  # huggingface_hub: only when installing

    staging = settings.models_dir / ".staging"
    staging.mkdir(parents=True, exist_ok=True)
    fetched = sources.fetch(
        req.model_id if req.source is None else None,
        req.source,
        staging_dir=staging,
        cache_dir=settings.cache_dir,
        revision=req.revision,
        hub_endpoint=settings.registry.hub_endpoint,
        hub_token=settings.registry.hub_token,
        s3_endpoint_url=settings.registry.s3_endpoint_url,
        progress=progress,
        expected_files=req.expected_files,
        archive_limits=sources.ArchiveLimits(
            settings.registry.max_archive_bytes, settings.registry.max_archive_files
        ),
        policy=policy,
    )
    kind = sources.classify_source(req.model_id if req.source is None else None, req.source)
    owned = kind != "hub"  # hub files live in the shared HF cache; the rest we copied
    final: Path | None = None
    model_store = open_model_store(settings)
    uploaded = False
    try:
        detected = task or detect_task(req.model_id or name, fetched.metadata)
        if detected is None:
            raise _bad("task_type", "cannot tell the task type from the model's metadata; pass --task")
        version = req.version or (fetched.revision or fetched.content_hash)[:12]
        validate_version(version)
        manifest = fetched.metadata.manifest
        for key in ("adapter", "options"):
            if key in manifest and key not in config:
                config[key] = manifest[key]
        if policy is not None:  # the folder's own manifest may name them too
            policy.check_config(config, where="modelmora.json")
        if owned:
            final = settings.models_dir / name / version
            if final.exists():
                shutil.rmtree(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(fetched.path, final)
        path = final or fetched.path
        model_version = ModelVersion(
            version=version,
            revision=fetched.revision,
            origin=fetched.origin,
            source_kind=kind,
            path=str(path),
            files=fetched.files,
            size_bytes=fetched.size_bytes,
            installed_at=datetime.now(UTC),
        )
        if model_store is not None:
            # Before the row: a version another replica can see is already in the store.
            uploaded = _upload(model_store, name, model_version, progress)
        return store.add_version(
            name=name,
            model_id=req.model_id or name,
            task_type=detected,
            version=model_version,
            activate=req.activate,
            display_name=req.display_name,
            description=req.description,
            config=config,
            resource_requirements=req.resource_requirements,
        )
    except BaseException:
        if uploaded and model_store is not None:
            with contextlib.suppress(Exception):
                model_store.delete(name, version)
        if owned:
            for leftover in (fetched.path, final):
                if leftover is not None and leftover.exists():
                    shutil.rmtree(leftover, ignore_errors=True)
            with contextlib.suppress(OSError):
                (settings.models_dir / name).rmdir()
        raise


def _upload(model_store: ModelStore, name: str, version: ModelVersion, progress: bool) -> bool:
    from modelmora.registry.sources.common import ByteProgress

    with ByteProgress(progress, f"uploading to {model_store.location}", version.size_bytes) as bar:
        return upload(model_store, name, version, bar.advance)


def _check_present(settings: Settings, entry: LockEntry, v: ModelVersion, progress: bool) -> str:
    """A lock entry the registry has: the registry's checksums and then the files on this
    disk must be the lock's. With a model store, a node without the files fetches them
    first, and a version installed before the store was set is uploaded."""
    from modelmora.registry.lockfile import diff_files
    from modelmora.registry.sources import hash_folder
    from modelmora.registry.sources.common import ByteProgress

    def check(what: str, files: dict[str, str]) -> None:
        diff = diff_files(entry.files, files)
        if any(diff.values()):
            raise ModelMoraError(
                ErrorCode.CHECKSUM_MISMATCH,
                f"{entry.name}@{entry.version}: the files on {what} differ from the lock",
                {"model": entry.name, "version": entry.version, **diff},
            )

    check("registry", v.files)
    model_store = open_model_store(settings)
    outcome = "present"
    if model_store is not None and not is_complete(v):
        lock_dir = settings.server.data_dir / "locks"
        with ByteProgress(progress, f"fetching {entry.name}@{entry.version}", v.size_bytes) as bar:
            if fetch(model_store, entry.name, v, lock_dir, bar.advance):
                outcome = "fetched"
    path = Path(v.path)
    check("disk", hash_folder(path, progress=progress) if path.is_dir() else {})
    if model_store is not None and outcome == "present":
        _upload(model_store, entry.name, v, progress)
    return outcome


def lock_entries(records: list[ModelRecord]) -> list[LockEntry]:
    entries = []
    for record in records:
        v = record.version()
        entries.append(
            LockEntry(
                name=record.name,
                model_id=record.model_id,
                origin=v.origin,
                source_kind=v.source_kind,
                version=v.version,
                revision=v.revision,
                task_type=record.task_type.value,
                files=v.files,
            )
        )
    return entries


def install_from_lock_entry(
    settings: Settings,
    store: RegistryStore,
    entry: LockEntry,
    progress: bool,
    policy: InstallPolicy | None = None,
) -> str:
    """Install one lock entry, verifying every checksum. Returns 'installed', 'present', or
    'fetched' (registered already, by another node sharing the registry: its files came
    from the model store)."""
    existing = store.find(entry.name)
    for v in existing.versions if existing is not None else []:
        if v.version == entry.version:
            return _check_present(settings, entry, v, progress)
    source = None if entry.source_kind == "hub" else entry.origin
    install(
        settings,
        store,
        InstallRequest(
            model_id=entry.model_id,
            source=source,
            name=entry.name,
            version=entry.version,
            revision=entry.revision,
            task_type=entry.task_type,
            expected_files=entry.files,
        ),
        progress=progress,
        policy=policy,
    )
    return "installed"
