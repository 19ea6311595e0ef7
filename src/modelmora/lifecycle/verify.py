"""Verified weights: every load checks each file of the model's version against the sha256
the registry recorded at install, before a worker starts.

The check runs in the server process, on a thread (`Loader` calls it through
`asyncio.to_thread`; hashlib releases the GIL on large buffers, so the event loop keeps
serving). It needs nothing but hashlib, so the server stays free of torch; a damaged model is
refused before a worker (its memory, perhaps the warm spare or a zygote fork) is spent on it;
and the verdict belongs to the load state machine that lives here. The worker reads the files
a moment after they were checked; one changed in that window is caught at the next load.

A verified hash is cached against the file's identity and change stamps (device, inode,
size, mtime_ns, ctime_ns) so a warm reload reads no file: any write to a file moves its mtime
and ctime, and ctime cannot be set back from user space (`touch -d` moves it forward). The
cache is persisted in `<data_dir>/verified-files.json` (written atomically) so a restart does
not rehash everything. Timestamps are coarse (a clock tick), so a write in the same tick as
the hash could keep them: a file whose stamps are within `racy_seconds` of the hash is not
cached (git's "racily clean" rule). Whoever can write that file can also write the registry
database beside it: the cache trusts nothing more than the registry does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry.catalog import ModelVersion

log = logging.getLogger("modelmora.lifecycle")

CACHE_FILE = "verified-files.json"
CACHE_FORMAT = 1
CHUNK = 1 << 20
RACY_SECONDS = 2.0


class Stamp(NamedTuple):
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stamp:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True, slots=True)
class VerifyReport:
    files: int
    hashed: int  # files read and hashed now
    cached: int  # files whose stamps matched a verified hash: not read
    hashed_bytes: int
    seconds: float


def fingerprint(version: ModelVersion) -> tuple[Any, ...]:
    """What a checksum verdict is about: a reinstall (new path, files or install time)
    makes an earlier verdict moot."""
    return (version.version, version.path, version.installed_at, tuple(sorted(version.files.items())))


def checksum_error(
    model: str, version: ModelVersion, mismatched: list[str], missing: list[str]
) -> ModelMoraError:
    """503 CHECKSUM_MISMATCH, not retryable, naming the first bad file (all in the details)."""
    first = (missing + mismatched)[0]
    what = "is missing" if missing and first == missing[0] else "does not match its recorded sha256"
    more = len(missing) + len(mismatched) - 1
    return ModelMoraError(
        ErrorCode.CHECKSUM_MISMATCH,
        f"model {model!r} ({version.version}): {first} {what}"
        + (f" (and {more} more file{'s' if more > 1 else ''})" if more else "")
        + "; it is not served until it is verified again (download/verify) or reinstalled",
        {
            "model": model,
            "version": version.version,
            "path": version.path,
            "file": first,
            "mismatched": mismatched,
            "missing": missing,
        },
    )


def _inside(root: Path, rel: str) -> Path | None:
    """The file's path under the version's folder; None for a name that would leave it."""
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
        return None
    return root.joinpath(*parts)


class HashCache:
    """{real path: (stamp, sha256)}, persisted as JSON; thread-safe. Reloaded when another
    process (the CLI's `verify`) rewrote the file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[Stamp, str]] = {}
        self._file_stamp: Stamp | None = None
        self._dirty = False
        self.refresh()

    def _read(self) -> tuple[dict[str, tuple[Stamp, str]], Stamp | None]:
        if self.path is None:
            return {}, None
        try:
            with self.path.open("rb") as f:
                file_stamp = Stamp.of(os.fstat(f.fileno()))
                doc = json.loads(f.read())
        except FileNotFoundError:
            return {}, None
        except (OSError, ValueError) as exc:
            log.warning("verified-files cache unreadable: starting empty", extra={"error": str(exc)})
            return {}, None
        entries: dict[str, tuple[Stamp, str]] = {}
        if isinstance(doc, dict) and doc.get("format") == CACHE_FORMAT:
            for real, row in (doc.get("files") or {}).items():
                with contextlib.suppress(TypeError, ValueError):
                    *nums, sha = row
                    entries[str(real)] = (Stamp(*(int(n) for n in nums)), str(sha))
        return entries, file_stamp

    def refresh(self) -> None:
        """Take in what another process wrote since we last read or wrote the file."""
        if self.path is None:
            return
        try:
            current: Stamp | None = Stamp.of(os.stat(self.path))
        except OSError:
            current = None
        with self._lock:
            if current == self._file_stamp:
                return
        entries, file_stamp = self._read()
        with self._lock:
            self._entries.update(entries)
            self._file_stamp = file_stamp

    def lookup(self, real: str, stamp: Stamp) -> str | None:
        with self._lock:
            entry = self._entries.get(real)
        return entry[1] if entry is not None and entry[0] == stamp else None

    def record(self, real: str, stamp: Stamp, sha: str) -> None:
        with self._lock:
            self._entries[real] = (stamp, sha)
            self._dirty = True

    def flush(self) -> None:
        """Write the cache atomically (a temp file renamed over it), merged with what another
        process wrote meanwhile, without the entries of files that no longer exist."""
        if self.path is None:
            return
        with self._lock:
            if not self._dirty:
                return
            self._dirty = False
            ours = dict(self._entries)
        theirs, _ = self._read()
        merged = {**theirs, **ours}
        merged = {real: entry for real, entry in merged.items() if os.path.exists(real)}
        doc = {"format": CACHE_FORMAT, "files": {r: [*s, sha] for r, (s, sha) in sorted(merged.items())}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".verified-", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(doc, f, separators=(",", ":"))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            file_stamp: Stamp | None = Stamp.of(os.stat(self.path))
        except OSError as exc:  # a cache that cannot be written costs hashing, nothing else
            log.warning("verified-files cache not written", extra={"error": str(exc)})
            return
        with self._lock:
            self._entries = {**merged, **{r: e for r, e in self._entries.items() if r not in merged}}
            self._file_stamp = file_stamp

    def __len__(self) -> int:
        return len(self._entries)


class WeightsVerifier:
    """Checks a model version's files against the registry's sha256s, through the cache."""

    def __init__(self, cache_file: Path | None, racy_seconds: float | None = None) -> None:
        self.cache = HashCache(cache_file)
        self.racy_ns = int((RACY_SECONDS if racy_seconds is None else racy_seconds) * 1e9)
        self.files_hashed = 0  # totals since start: a warm reload adds nothing to the first
        self.cache_hits = 0

    def verify(self, model: str, version: ModelVersion) -> VerifyReport:
        """Every recorded file present and matching its sha256, or CHECKSUM_MISMATCH."""
        started = time.perf_counter()
        self.cache.refresh()
        root = Path(version.path)
        mismatched: list[str] = []
        missing: list[str] = []
        hashed = cached = hashed_bytes = 0
        try:
            for rel, expected in sorted(version.files.items()):
                path = _inside(root, rel)
                if path is None:
                    mismatched.append(rel)
                    continue
                real = os.path.realpath(path)
                try:
                    st = os.stat(real)
                except OSError:
                    missing.append(rel)
                    continue
                if not stat.S_ISREG(st.st_mode):
                    missing.append(rel)
                    continue
                sha = self.cache.lookup(real, Stamp.of(st))
                if sha is not None:
                    cached += 1
                else:
                    try:
                        sha, _ = self._hash(real)
                    except OSError:
                        missing.append(rel)  # vanished or unreadable: it cannot be served
                        continue
                    hashed += 1
                    hashed_bytes += st.st_size
                if sha != expected:
                    mismatched.append(rel)
        finally:
            self.files_hashed += hashed
            self.cache_hits += cached
            self.cache.flush()
        if mismatched or missing:
            raise checksum_error(model, version, sorted(mismatched), sorted(missing))
        return VerifyReport(len(version.files), hashed, cached, hashed_bytes, time.perf_counter() - started)

    def verified_from_cache(self, version: ModelVersion) -> bool:
        """Whether every file has a verified hash equal to the registry's with its current
        stamps, reading no file: how a model failed by a mismatch learns that it was
        re-verified (the `verify` operation records what it hashes here)."""
        self.cache.refresh()
        root = Path(version.path)
        for rel, expected in version.files.items():
            path = _inside(root, rel)
            if path is None:
                return False
            real = os.path.realpath(path)
            try:
                st = os.stat(real)
            except OSError:
                return False
            if self.cache.lookup(real, Stamp.of(st)) != expected:
                return False
        return True

    def rehash_folder(self, folder: Path) -> dict[str, str]:
        """sha256 of every file under `folder` (as `hash_folder`), each read again whatever the
        cache says and recorded in it: the explicit `verify` operation. A file written just
        before (restored by hand) is hashed again once the racy window has passed, so that a
        passing verify is always recorded and clears a checksum failure."""
        from modelmora.registry.sources.files import list_files  # the source stack, only here

        out: dict[str, str] = {}
        racy: list[tuple[str, str]] = []
        try:
            for rel, path, _ in list_files(folder, skip=None):
                real = os.path.realpath(path)
                out[rel], recorded = self._hash(real)
                if not recorded:
                    racy.append((rel, real))
            if racy:
                time.sleep(self.racy_ns / 1e9)
                for rel, real in racy:
                    out[rel], _ = self._hash(real)
        finally:
            self.cache.flush()
        return out

    def _hash(self, real: str) -> tuple[str, bool]:
        """Hash one file: its sha256, and whether it was cached (only when its stamps did not
        move while it was read and are older than the racy window)."""
        started_ns = time.time_ns()
        digest = hashlib.sha256()
        with open(real, "rb") as f:
            before = Stamp.of(os.fstat(f.fileno()))
            while chunk := f.read(CHUNK):
                digest.update(chunk)
            after = Stamp.of(os.fstat(f.fileno()))
        sha = digest.hexdigest()
        if before == after and max(after.mtime_ns, after.ctime_ns) < started_ns - self.racy_ns:
            self.cache.record(real, after, sha)
            return sha, True
        return sha, False
