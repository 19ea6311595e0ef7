"""What every source shares: the result of a fetch, the content hash, the byte progress bar,
the check against a lock's checksums, and how an exception is told in one line."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry.catalog import ModelMetadata
from modelmora.registry.lockfile import diff_files

SourceKind = Literal["hub", "local", "url", "s3"]

CHUNK_SIZE = 1 << 20


@dataclass
class FetchResult:
    """What a fetch produced: where the files are and what they are."""

    path: Path  # folder holding the model files (staging folder for local/url, snapshot for hub)
    revision: str | None  # hub: the resolved commit sha; local/url: None
    origin: str  # "hf://<repo_id>", "file:///abs/path", or the URL
    files: dict[str, str]  # relative posix path -> sha256 hex, every file
    size_bytes: int
    metadata: ModelMetadata
    content_hash: str  # sha256 of the sorted "path\0sha256\n" manifest lines


def content_hash_of(files: dict[str, str]) -> str:
    """One sha256 that identifies a set of files by their paths and contents (order-free), so
    two installs can be compared without walking either folder."""
    digest = hashlib.sha256()
    for line in sorted(f"{path}\0{sha}\n" for path, sha in files.items()):
        digest.update(line.encode("utf-8"))
    return digest.hexdigest()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_expected(
    expected: dict[str, str], actual: dict[str, str], origin: str, *, cleanup: Path | None
) -> None:
    diff = diff_files(expected, actual)
    if not any(diff.values()):
        return
    if cleanup is not None:
        shutil.rmtree(cleanup, ignore_errors=True)
    counts = ", ".join(f"{len(paths)} {kind}" for kind, paths in diff.items() if paths)
    raise ModelMoraError(
        ErrorCode.CHECKSUM_MISMATCH,
        f"files from {origin} do not match the expected checksums ({counts})",
        {"origin": origin, **diff},
    )


class ByteProgress:
    """A rich progress bar in bytes on stderr, or nothing at all when disabled."""

    def __init__(self, enabled: bool, description: str, total: int | None) -> None:
        self._enabled = enabled
        self._description = description
        self._total = total
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> ByteProgress:
        if self._enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self._description, total=self._total)
        return self

    def advance(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
