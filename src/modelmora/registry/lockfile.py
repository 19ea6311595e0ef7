"""`modelmora.lock`: which models, from where, at which revision, with which file checksums.

A lock file is meant to be committed and reviewed, so its text is deterministic: JSON with
sorted keys, two-space indents, entries sorted, a trailing newline. The same catalog always
gives the same bytes (apart from `generated_at`), and a diff shows exactly what changed.

Pure: no database and no network. Reading validates everything that later code relies on
(names, versions, task types, file paths, sha256 digests) so a hand-edited or corrupted lock
fails here with the path and the field, not halfway through an install.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modelmora.contracts.tasks import TaskType
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry.catalog import validate_name, validate_version

LOCK_VERSION = 1
LOCK_FILE_NAME = "modelmora.lock"
SOURCE_KINDS: tuple[str, ...] = ("hub", "local", "url", "s3")

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_ENTRY_FIELDS = ("name", "model_id", "origin", "source_kind", "version", "revision", "task_type", "files")


@dataclass(frozen=True)
class LockEntry:
    """One installed model version as the lock records it."""

    name: str
    model_id: str
    origin: str  # "hf://org/name", "file:///abs/folder" for local, the URL for url/s3
    source_kind: str  # hub | local | url | s3
    version: str
    revision: str | None  # the Hub commit sha; None for other sources
    task_type: str
    files: dict[str, str] = field(default_factory=dict)  # relative posix path -> sha256 hex

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model_id": self.model_id,
            "origin": self.origin,
            "source_kind": self.source_kind,
            "version": self.version,
            "revision": self.revision,
            "task_type": self.task_type,
            "files": dict(sorted(self.files.items())),
        }


def build_lock(entries: Iterable[LockEntry], now: datetime) -> dict[str, Any]:
    """The lock document: entries sorted by (name, version), `generated_at` in UTC.

    Two entries with the same name and version are refused: installing from the lock could not
    tell which one is meant.
    """
    ordered = sorted(entries, key=lambda e: (e.name, e.version))
    seen: set[tuple[str, str]] = set()
    for entry in ordered:
        key = (entry.name, entry.version)
        if key in seen:
            raise ModelMoraError(
                ErrorCode.VALIDATION_ERROR,
                f"the lock would list {entry.name}@{entry.version} twice",
                {"errors": [{"field": "models", "message": f"duplicate {entry.name}@{entry.version}"}]},
            )
        seen.add(key)
    return {
        "lock_version": LOCK_VERSION,
        "generated_at": _utc_iso(now),
        "models": [entry.to_dict() for entry in ordered],
    }


def dumps_lock(document: dict[str, Any]) -> str:
    """The exact text of a lock file (stable diffs: sorted keys, indent 2, trailing newline)."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_lock(path: Path, entries: Iterable[LockEntry], now: datetime) -> None:
    """Write the lock atomically: a reader (or a crash) sees the old file or the new one, never
    half of one. The temporary file sits next to the target so `os.replace` is a rename."""
    text = dumps_lock(build_lock(entries, now))
    path = path.expanduser()
    directory = path.parent if str(path.parent) else Path(".")
    tmp_name: str | None = None
    try:
        # Keep the existing file's permissions; a new lock gets the usual 0644 (mkstemp gives 0600).
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as exc:
        raise ModelMoraError(
            ErrorCode.INTERNAL_ERROR,
            f"cannot write lock file {path}: {exc.strerror or exc}",
            {"path": str(path)},
        ) from exc
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)


def read_lock(path: Path) -> list[LockEntry]:
    """Read and validate a lock file; every problem is a VALIDATION_ERROR naming the file and
    the field (`models[2].files`), so the user knows what to fix."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _invalid(path, "file", "not found", f"lock file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _invalid(path, "file", str(exc), f"cannot read lock file {path}: {exc}") from exc
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _invalid(
            path,
            "file",
            exc.msg,
            f"lock file {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
        ) from exc
    return parse_lock(document, path)


def parse_lock(document: Any, path: Path | str = LOCK_FILE_NAME) -> list[LockEntry]:
    """Validate an already-decoded lock document (the REST `GET /api/v1/lock` body, say)."""
    if not isinstance(document, dict):
        raise _invalid(path, "(root)", "must be a JSON object", f"lock file {path} is not a JSON object")
    version = document.get("lock_version")
    if type(version) is not int or version != LOCK_VERSION:
        raise _invalid(
            path,
            "lock_version",
            f"expected {LOCK_VERSION}, got {version!r}",
            f"lock file {path} has lock_version {version!r}; this ModelMora reads version {LOCK_VERSION}",
        )
    models = document.get("models")
    if not isinstance(models, list):
        raise _invalid(path, "models", "must be a list", f"lock file {path}: 'models' must be a list")
    entries = [_parse_entry(raw, index, path) for index, raw in enumerate(models)]
    seen: set[tuple[str, str]] = set()
    for index, entry in enumerate(entries):
        key = (entry.name, entry.version)
        if key in seen:
            raise _invalid(
                path,
                f"models[{index}]",
                "duplicate name and version",
                f"lock file {path} lists {entry.name}@{entry.version} twice",
            )
        seen.add(key)
    return entries


def diff_files(expected: dict[str, str], actual: dict[str, str]) -> dict[str, list[str]]:
    """Compare two {path: sha256} maps: which paths differ, are missing, or are unexpected.
    All three lists are empty (and sorted otherwise) so callers can test `any(d.values())`."""
    return {
        "mismatched": sorted(p for p in expected.keys() & actual.keys() if expected[p] != actual[p]),
        "missing": sorted(expected.keys() - actual.keys()),
        "unexpected": sorted(actual.keys() - expected.keys()),
    }


# --------------------------------------------------------------------------------------------


def _utc_iso(moment: datetime) -> str:
    """ISO-8601 in UTC with a 'Z'; a naive datetime is taken to be UTC already."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _invalid(path: Path | str, field_name: str, problem: str, message: str) -> ModelMoraError:
    return ModelMoraError(
        ErrorCode.VALIDATION_ERROR,
        message,
        {"path": str(path), "errors": [{"field": field_name, "message": problem}]},
    )


def _is_safe_relpath(rel: str) -> bool:
    """A file key must stay inside the model folder when joined to it."""
    if not rel or rel.startswith("/") or "\\" in rel or "\0" in rel or re.match(r"^[A-Za-z]:", rel):
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def _parse_entry(raw: Any, index: int, path: Path | str) -> LockEntry:
    where = f"models[{index}]"

    def bad(field_name: str, problem: str) -> ModelMoraError:
        return _invalid(
            path, f"{where}.{field_name}", problem, f"lock file {path}: {where}.{field_name} {problem}"
        )

    if not isinstance(raw, dict):
        raise _invalid(path, where, "must be an object", f"lock file {path}: {where} must be an object")
    missing = [name for name in _ENTRY_FIELDS if name not in raw]
    if missing:
        raise _invalid(
            path,
            where,
            f"missing {', '.join(missing)}",
            f"lock file {path}: {where} lacks {', '.join(missing)}",
        )

    def text(field_name: str) -> str:
        value = raw[field_name]
        if not isinstance(value, str) or not value:
            raise bad(field_name, "must be a non-empty string")
        return value

    name = text("name")
    try:
        validate_name(name)
    except ModelMoraError:
        raise bad("name", f"is not a valid model name: {name!r}") from None
    version = text("version")
    try:
        validate_version(version)
    except ModelMoraError:
        raise bad("version", f"is not a valid version: {version!r}") from None
    model_id = text("model_id")
    origin = text("origin")
    source_kind = text("source_kind")
    if source_kind not in SOURCE_KINDS:
        raise bad("source_kind", f"must be one of {', '.join(SOURCE_KINDS)}, not {source_kind!r}")
    task_type = text("task_type")
    if task_type not in {t.value for t in TaskType}:
        raise bad("task_type", f"is not a task type: {task_type!r}")
    revision = raw["revision"]
    if revision is not None and (not isinstance(revision, str) or not revision):
        raise bad("revision", "must be a non-empty string or null")
    files = raw["files"]
    if not isinstance(files, dict):
        raise bad("files", "must be an object of path -> sha256")
    for rel, digest in files.items():
        if not _is_safe_relpath(rel):
            raise bad("files", f"has an unsafe path {rel!r}")
        if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
            raise bad("files", f"has an invalid sha256 for {rel!r}")
    return LockEntry(
        name=name,
        model_id=model_id,
        origin=origin,
        source_kind=source_kind,
        version=version,
        revision=revision,
        task_type=task_type,
        files=dict(files),
    )
