"""The model store: one copy of every installed version's files, shared by all replicas.

`registry.model_store` names it: `s3://bucket/prefix` (through `registry.s3_endpoint_url`)
or a directory every node mounts. An install uploads the version's files once, before its
row is committed, so a version any replica can see is already in the store. A replica whose
disk lacks a version's files fetches them on the first load (`Materialiser`), into the same
place an install would have put them (`ModelVersion.path`, from this node's roots), checking
every file against the sha256 the registry holds; a lock applied on a fresh node does the
same (`installer.install_from_lock_entry`).

Layout in the store: `<name>/<version>/<file>` for each file, and `<name>/<version>/MARKER`
written last, so a half-uploaded version is never taken for a complete one.

One fetch per node: in a process, concurrent first requests share one task; across the
processes of a node (two servers on one data dir, a CLI `install` beside a server), an
`flock` on `<data_dir>/locks/<name>@<version>.lock` serialises them, and the second finds
the files there when it gets the lock. Files arrive under a staging name and are renamed
into place once all of them are verified: a reader never sees half a version.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry.catalog import ModelRecord, ModelVersion

if TYPE_CHECKING:
    from modelmora.config import Settings
    from modelmora.observability.tracing import SpanRecorder

log = logging.getLogger("modelmora.model_store")

MARKER = ".modelmora-version.json"
CHUNK = 1 << 20
PROGRESS_LOG_SECONDS = 2.0

Progress = Callable[[int], None]  # bytes just moved


class ModelStore(Protocol):
    """Where the shared copies live; every method blocks (run it in a thread)."""

    location: str

    def has(self, name: str, version: str) -> bool:
        """The version is complete in the store (its marker is there)."""

    def put(self, name: str, version: str, folder: Path, files: dict[str, str], advance: Progress) -> None:
        """Upload every file of `folder` named in `files`, then the marker."""

    def reader(self, name: str, version: str, rel: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """A readable stream of one file."""

    def delete(self, name: str, version: str) -> None: ...


def _key(name: str, version: str, rel: str = "") -> str:
    return f"{name}/{version}/{rel}" if rel else f"{name}/{version}/"


def _marker(files: dict[str, str]) -> bytes:
    return json.dumps({"files": dict(sorted(files.items()))}, indent=1).encode()


class DirModelStore:
    """A directory every node mounts (NFS, a shared volume)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)

    def has(self, name: str, version: str) -> bool:
        return (self.root / _key(name, version, MARKER)).is_file()

    def put(self, name: str, version: str, folder: Path, files: dict[str, str], advance: Progress) -> None:
        base = self.root / _key(name, version)
        for rel in sorted(files):
            target = base / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
            with (folder / rel).open("rb") as src, tmp.open("wb") as out:
                while block := src.read(CHUNK):
                    out.write(block)
                    advance(len(block))
            os.replace(tmp, target)
        (base / MARKER).write_bytes(_marker(files))

    @contextlib.contextmanager
    def reader(self, name: str, version: str, rel: str) -> Iterator[IO[bytes]]:
        with (self.root / _key(name, version, rel)).open("rb") as handle:
            yield handle

    def delete(self, name: str, version: str) -> None:
        base = self.root / _key(name, version)
        with contextlib.suppress(OSError):
            (base / MARKER).unlink()  # first: what is left is no longer taken for complete
        shutil.rmtree(base, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.root / name).rmdir()  # only when empty


class S3ModelStore:
    """An S3-compatible bucket (AWS, MinIO, Ceph ...), credentials as boto3 finds them."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None, client: Any = None) -> None:
        from modelmora.contracts.s3 import s3_client

        self.bucket = bucket
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.location = f"s3://{bucket}/{self.prefix}"
        self._client = client or s3_client(endpoint_url)

    def _object(self, name: str, version: str, rel: str = "") -> str:
        return self.prefix + _key(name, version, rel)

    def has(self, name: str, version: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._object(name, version, MARKER))
        except Exception as exc:
            if _status(exc) == 404:
                return False
            raise
        return True

    def put(self, name: str, version: str, folder: Path, files: dict[str, str], advance: Progress) -> None:
        for rel in sorted(files):
            self._client.upload_file(
                str(folder / rel), self.bucket, self._object(name, version, rel), Callback=advance
            )
        self._client.put_object(
            Bucket=self.bucket, Key=self._object(name, version, MARKER), Body=_marker(files)
        )

    @contextlib.contextmanager
    def reader(self, name: str, version: str, rel: str) -> Iterator[IO[bytes]]:
        body = self._client.get_object(Bucket=self.bucket, Key=self._object(name, version, rel))["Body"]
        with body:
            yield body

    def delete(self, name: str, version: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self._object(name, version, MARKER))
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._object(name, version)):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None) or {}
    code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(code) if code is not None else None


def open_model_store(settings: Settings) -> ModelStore | None:
    """The store `registry.model_store` names, or None (files stay on the installing node)."""
    where = settings.registry.model_store
    if not where:
        return None
    if where.lower().startswith("s3://"):
        parts = urlsplit(where)
        if not parts.netloc:
            raise ModelMoraError(
                ErrorCode.VALIDATION_ERROR, f"registry.model_store {where!r} names no bucket"
            )
        return S3ModelStore(parts.netloc, parts.path.lstrip("/"), settings.registry.s3_endpoint_url)
    path = Path(where.removeprefix("file://")).expanduser()
    if not path.is_absolute():
        raise ModelMoraError(
            ErrorCode.VALIDATION_ERROR, f"registry.model_store {where!r}: a shared directory must be absolute"
        )
    return DirModelStore(path)


def unavailable(store: ModelStore, what: str, exc: BaseException) -> ModelMoraError:
    return ModelMoraError(
        ErrorCode.SOURCE_UNAVAILABLE,
        f"the model store {store.location} failed to {what}: {type(exc).__name__}: {exc}",
        {"model_store": store.location},
    )


# -- upload (install) ---------------------------------------------------------------------------


def upload(store: ModelStore, name: str, version: ModelVersion, advance: Progress = lambda _n: None) -> bool:
    """Put a version's files in the store unless it is there already; True when uploaded."""
    try:
        if store.has(name, version.version):
            return False
        store.put(name, version.version, Path(version.path), version.files, advance)
    except ModelMoraError:
        raise
    except Exception as exc:
        raise unavailable(store, f"store {name}@{version.version}", exc) from exc
    log.info(
        "model files uploaded to the store",
        extra={
            "model": name,
            "version": version.version,
            "files": len(version.files),
            "store": store.location,
        },
    )
    return True


# -- fetch (first load on a node, a lock on a fresh node) ----------------------------------------


def is_complete(version: ModelVersion) -> bool:
    """This node has every file of the version (by name: hashing is the verify command's)."""
    folder = Path(version.path)
    return folder.is_dir() and all((folder / rel).is_file() for rel in version.files)


@contextlib.contextmanager
def _node_lock(lock_dir: Path, name: str, version: str) -> Iterator[None]:
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}@{version}.lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released at close, or when the process dies
        yield


def fetch(
    store: ModelStore,
    name: str,
    version: ModelVersion,
    lock_dir: Path,
    advance: Progress = lambda _n: None,
) -> bool:
    """Make `version.path` hold the version's files from the store, every sha256 checked;
    False when they were there already (or another process of this node fetched them while
    this one waited). CHECKSUM_MISMATCH when the store's copy differs from the registry,
    SOURCE_UNAVAILABLE when the store cannot be read or lacks the version."""
    with _node_lock(lock_dir, name, version.version):
        if is_complete(version):
            return False
        try:
            present = store.has(name, version.version)
        except Exception as exc:
            raise unavailable(store, f"look up {name}@{version.version}", exc) from exc
        if not present:
            raise ModelMoraError(
                ErrorCode.SOURCE_UNAVAILABLE,
                f"the files of {name}@{version.version} are neither on this node nor in the model store "
                f"{store.location} (installed before registry.model_store was set?): install it again, "
                "or run `modelmora install` from a lock on a node that has the files",
                {"model": name, "version": version.version, "model_store": store.location},
            )
        final = Path(version.path)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.partial"
        try:
            bad = _download(store, name, version, staging, advance)
            if bad:
                raise ModelMoraError(
                    ErrorCode.CHECKSUM_MISMATCH,
                    f"the model store's copy of {name}@{version.version} differs from the registry "
                    f"({len(bad)} file(s)): reinstall it",
                    {
                        "model": name,
                        "version": version.version,
                        "mismatched": bad,
                        "model_store": store.location,
                    },
                )
            if final.exists():  # an incomplete copy (an interrupted download elsewhere)
                shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return True


def _download(
    store: ModelStore, name: str, version: ModelVersion, staging: Path, advance: Progress
) -> list[str]:
    """Every file into `staging`, hashed as it arrives; the paths whose sha256 differ."""
    bad: list[str] = []
    for rel, expected in sorted(version.files.items()):
        target = staging / rel
        if not target.resolve().is_relative_to(staging.resolve()):
            raise ModelMoraError(ErrorCode.CHECKSUM_MISMATCH, f"unsafe file name {rel!r}", {"model": name})
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        try:
            with store.reader(name, version.version, rel) as body, target.open("wb") as out:
                while block := body.read(CHUNK):
                    digest.update(block)
                    out.write(block)
                    advance(len(block))
        except ModelMoraError:
            raise
        except Exception as exc:
            raise unavailable(store, f"read {name}@{version.version}/{rel}", exc) from exc
        if digest.hexdigest() != expected:
            bad.append(rel)
    return bad


class _ProgressLog:
    """Bytes fetched so far, logged every few seconds (called from the download thread)."""

    def __init__(self, name: str, version: ModelVersion) -> None:
        self.name, self.version = name, version.version
        self.total = version.size_bytes
        self.done = 0
        self.started = time.monotonic()
        self.logged = self.started
        self.marks: list[tuple[int, int]] = []  # (time ns, bytes) at each quarter, for the span

    def __call__(self, n: int) -> None:
        quarter_before = 4 * self.done // max(1, self.total)
        self.done += n
        if 4 * self.done // max(1, self.total) > quarter_before:
            self.marks.append((time.time_ns(), self.done))
        now = time.monotonic()
        if now - self.logged >= PROGRESS_LOG_SECONDS:
            self.logged = now
            log.info(
                "fetching model files from the store",
                extra={
                    "model": self.name,
                    "version": self.version,
                    "bytes_done": self.done,
                    "bytes_total": self.total,
                    "percent": round(100 * self.done / max(1, self.total), 1),
                },
            )


class Materialiser:
    """The load path's hook: before a worker starts, make sure this node has the files."""

    def __init__(self, settings: Settings, store: ModelStore, spans: SpanRecorder | None = None) -> None:
        self.store = store
        self.lock_dir = settings.server.data_dir / "locks"
        self.spans = spans
        self._fetches: dict[tuple[str, str], asyncio.Task[None]] = {}

    async def __call__(self, record: ModelRecord) -> None:
        version = record.version()
        if await asyncio.to_thread(is_complete, version):
            return
        key = (record.name, version.version)
        task = self._fetches.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch(record.name, version), name=f"fetch-{record.name}")
            self._fetches[key] = task
            task.add_done_callback(lambda _t: self._fetches.pop(key, None))
        # Shield: a load that gives up must not cancel the fetch another load waits for.
        await asyncio.shield(task)

    async def _fetch(self, name: str, version: ModelVersion) -> None:
        progress = _ProgressLog(name, version)
        start_ns = time.time_ns()
        log.info(
            "model files missing on this node: fetching them from the store",
            extra={"model": name, "version": version.version, "bytes_total": version.size_bytes,
                   "store": self.store.location},
        )  # fmt: skip
        error: str | None = None
        try:
            fetched = await asyncio.to_thread(fetch, self.store, name, version, self.lock_dir, progress)
        except ModelMoraError as exc:
            error = exc.code.value
            raise
        finally:
            self._span(name, version, start_ns, progress, error)
        seconds = time.monotonic() - progress.started
        if fetched:
            log.info(
                "model files fetched from the store",
                extra={
                    "model": name,
                    "version": version.version,
                    "bytes": progress.done,
                    "seconds": round(seconds, 3),
                    "mb_per_second": round(progress.done / 2**20 / max(seconds, 1e-6), 1),
                },
            )

    def _span(
        self, name: str, version: ModelVersion, start_ns: int, progress: _ProgressLog, error: str | None
    ) -> None:
        if self.spans is None:
            return
        self.spans.interval(
            "modelmora.load.fetch",
            start_ns,
            time.time_ns(),
            {
                "modelmora.model": name,
                "modelmora.version": version.version,
                "modelmora.bytes": progress.done,
                "modelmora.bytes_total": progress.total,
                "modelmora.model_store": self.store.location,
            },
            events=[("progress", at, {"modelmora.bytes": done}) for at, done in progress.marks],
            error_code=error,
        )
