"""Archive extraction (zip, tar and its compressed forms), for local and URL sources.

Every member name goes through `member_path` (also used by the S3 source for object keys), so
nothing can be written outside the extraction folder whatever the archive holds; and what it
writes is capped in bytes and files (`ArchiveLimits`), so a small archive cannot fill the disk.
"""

from __future__ import annotations

import contextlib
import posixpath
import re
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, cast

from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry.sources.common import ByteProgress, first_line
from modelmora.registry.sources.files import write_stream

_ARCHIVE_SUFFIXES: tuple[tuple[str, Literal["zip", "tar"]], ...] = (
    (".zip", "zip"),
    (".tar.gz", "tar"),
    (".tgz", "tar"),
    (".tar.bz2", "tar"),
    (".tbz2", "tar"),
    (".tar.xz", "tar"),
    (".txz", "tar"),
    (".tar", "tar"),
)
_SKIP_ARCHIVE_DIRS = frozenset({"__MACOSX"})  # the resource forks that macOS zips carry
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


def archive_kind(name: str) -> Literal["zip", "tar"] | None:
    lowered = name.lower()
    for suffix, kind in _ARCHIVE_SUFFIXES:
        if lowered.endswith(suffix):
            return kind
    return None


class UnsafeArchive(Exception):
    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"{member!r}: {reason}")
        self.member = member
        self.reason = reason


def member_path(name: str) -> str | None:
    """A member name as a safe relative posix path, None for the archive root, or raise.

    Refuses what could write outside the extraction folder: absolute names, drive letters,
    '..' anywhere. Backslashes count as separators (zip files made on Windows use them).
    """
    raw = name.replace("\\", "/")
    if raw.startswith("/") or _DRIVE_RE.match(raw):
        raise UnsafeArchive(name, "absolute path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(name, "'..' in path")
    if any("\0" in p for p in parts):
        raise UnsafeArchive(name, "NUL in path")
    return "/".join(parts) or None


def _link_target(member: str, linkname: str, *, relative_to_member: bool) -> str:
    """Where a link member points, as a path inside the archive; refuse targets outside it."""
    target = linkname.replace("\\", "/")
    if target.startswith("/") or _DRIVE_RE.match(target):
        raise UnsafeArchive(member, f"link to absolute path {linkname!r}")
    base = posixpath.dirname(member) if relative_to_member else ""
    joined = posixpath.normpath(posixpath.join(base, target))
    if joined == ".." or joined.startswith("../") or joined == ".":
        raise UnsafeArchive(member, f"link {linkname!r} points outside the archive")
    return joined


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps on what one archive may expand to (`registry.max_archive_bytes`, `max_archive_files`).

    Checked twice: on the sizes the archive declares, before anything is written, and on the
    bytes actually written (a zip's declared size is the archive's word; a link becomes a copy
    of its target, so a thousand links to one large file are a thousand copies)."""

    max_bytes: int = 64 << 30
    max_files: int = 10_000


class _OverLimit(Exception):
    def __init__(self, what: Literal["bytes", "files"], limit: int, seen: int) -> None:
        super().__init__(what)
        self.what = what
        self.limit = limit
        self.seen = seen


class _Budget:
    """Bytes left to write; `wrap` makes a member's stream raise once the archive passes it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> None:
        self.used += size
        if self.used > self.limit:
            raise _OverLimit("bytes", self.limit, self.used)

    def wrap(self, stream: IO[bytes]) -> _Counted:
        return _Counted(stream, self)


class _Counted:
    """The `read` of a member stream, counted against the archive's budget as it is read."""

    def __init__(self, stream: IO[bytes], budget: _Budget) -> None:
        self._stream = stream
        self._budget = budget

    def read(self, size: int = -1) -> bytes:
        chunk = self._stream.read(size)
        self._budget.take(len(chunk))
        return chunk


@dataclass
class _Member:
    name: str  # safe relative path before prefix stripping
    kind: Literal["dir", "file", "link"]
    size: int
    link_target: str | None
    opener: Callable[[], IO[bytes]] | None


def _tar_members(tf: tarfile.TarFile) -> list[_Member]:
    out: list[_Member] = []
    for info in tf.getmembers():
        name = member_path(info.name)
        if name is None:
            continue
        if info.isdir():
            out.append(_Member(name, "dir", 0, None, None))
        elif info.isreg():
            out.append(_Member(name, "file", info.size, None, _tar_opener(tf, info)))
        elif info.issym():
            target = _link_target(name, info.linkname, relative_to_member=True)
            out.append(_Member(name, "link", 0, target, None))
        elif info.islnk():
            target = _link_target(name, info.linkname, relative_to_member=False)
            out.append(_Member(name, "link", 0, target, None))
        else:
            raise UnsafeArchive(info.name, "device, fifo or other special file")
    return out


def _tar_opener(tf: tarfile.TarFile, info: tarfile.TarInfo) -> Callable[[], IO[bytes]]:
    def opener() -> IO[bytes]:
        stream = tf.extractfile(info)
        if stream is None:
            raise tarfile.ExtractError(f"cannot read member {info.name!r}")
        return stream

    return opener


def _zip_members(zf: zipfile.ZipFile) -> list[_Member]:
    out: list[_Member] = []
    for info in zf.infolist():
        name = member_path(info.filename)
        if name is None:
            continue
        mode = info.external_attr >> 16
        if info.is_dir():
            out.append(_Member(name, "dir", 0, None, None))
        elif stat.S_ISLNK(mode):
            linkname = zf.read(info).decode("utf-8")
            target = _link_target(name, linkname, relative_to_member=True)
            out.append(_Member(name, "link", 0, target, None))
        else:
            out.append(_Member(name, "file", info.file_size, None, _zip_opener(zf, info)))
    return out


def _zip_opener(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Callable[[], IO[bytes]]:
    def opener() -> IO[bytes]:
        return zf.open(info)

    return opener


def _common_root(members: list[_Member]) -> str | None:
    """The single top folder that wraps everything (`tar czf m.tgz my-model/`), if any: the
    model folder is what is inside it."""
    names = [m.name for m in members if m.kind != "dir"]
    if not names or any("/" not in n for n in names):
        return None
    tops = {n.split("/", 1)[0] for n in names}
    return tops.pop() if len(tops) == 1 else None


def extract_archive(
    archive: Path,
    kind: Literal["zip", "tar"],
    dest: Path,
    progress: bool,
    *,
    label: str,
    limits: ArchiveLimits | None = None,
) -> tuple[dict[str, str], dict[str, int]]:
    """Extract into `dest`, hashing each file as it is written.

    Never calls tarfile/zipfile extract: every member is checked and written by hand, links
    are never created on disk (a link whose target is a file inside the archive becomes a copy
    of it), so nothing can land outside `dest` whatever the archive holds. Past `limits`, it
    raises PAYLOAD_TOO_LARGE; what was written is the caller's to remove (`fetch` removes its
    folder on any error).
    """
    limits = limits or ArchiveLimits()

    def refuse(message: str, exc: BaseException | None, **extra: Any) -> ModelMoraError:
        details: dict[str, Any] = {"source": label, "archive": archive.name, **extra}
        if exc is not None:
            details["reason"] = f"{type(exc).__name__}: {first_line(exc)}"
        return ModelMoraError(ErrorCode.SOURCE_UNAVAILABLE, message, details)

    files: dict[str, str] = {}
    sizes: dict[str, int] = {}
    try:
        with contextlib.ExitStack() as stack:
            if kind == "zip":
                zf = stack.enter_context(zipfile.ZipFile(archive))
                members = _zip_members(zf)
            else:
                tf = stack.enter_context(tarfile.open(archive, mode="r:*"))
                members = _tar_members(tf)
            members = [m for m in members if m.name.split("/", 1)[0] not in _SKIP_ARCHIVE_DIRS]
            root = _common_root(members)

            def rel(name: str) -> str:
                return name[len(root) + 1 :] if root and name.startswith(root + "/") else name

            total = sum(m.size for m in members if m.kind == "file")
            count = sum(1 for m in members if m.kind != "dir")
            if count > limits.max_files:
                raise _OverLimit("files", limits.max_files, count)
            budget = _Budget(limits.max_bytes)
            if total > limits.max_bytes:  # as declared: refused before a byte is written
                raise _OverLimit("bytes", limits.max_bytes, total)
            links: dict[str, str] = {}
            with ByteProgress(progress, f"extracting {archive.name}", total) as bar:
                for m in members:
                    path = rel(m.name)
                    if root and path == root and m.kind == "dir":
                        continue
                    if m.kind == "dir":
                        (dest / path).mkdir(parents=True, exist_ok=True)
                    elif m.kind == "link":
                        assert m.link_target is not None
                        links[path] = rel(m.link_target)
                    else:
                        assert m.opener is not None
                        with m.opener() as stream:
                            counted = cast(IO[bytes], budget.wrap(stream))  # only `read` is used
                            files[path], sizes[path] = write_stream(counted, dest / path, bar.advance)
                        links.pop(path, None)
                _materialize_links(links, dest, files, sizes, budget)
    except _OverLimit as exc:
        setting, unit = f"registry.max_archive_{exc.what}", exc.what
        raise ModelMoraError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"archive {label} expands to more than {exc.limit} {unit} ({setting}); nothing was installed",
            {"source": label, "archive": archive.name, f"limit_{unit}": exc.limit, "setting": setting},
        ) from None
    except UnsafeArchive as exc:
        raise refuse(
            f"refusing archive {label}: unsafe member {exc.member!r} ({exc.reason})",
            None,
            member=exc.member,
        ) from exc
    except ModelMoraError:
        raise
    except (
        tarfile.TarError,
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        EOFError,
        OSError,
        RuntimeError,  # an encrypted zip member
        NotImplementedError,  # an unsupported zip compression
        UnicodeDecodeError,
        ValueError,
    ) as exc:
        raise refuse(f"cannot extract archive {label}: {first_line(exc)}", exc) from exc
    if not files:
        raise refuse(f"archive {label} contains no files", None)
    return files, sizes


def _materialize_links(
    links: dict[str, str], dest: Path, files: dict[str, str], sizes: dict[str, int], budget: _Budget
) -> None:
    """Turn in-archive links into copies of their targets (chains resolved in rounds); each
    copy counts against the archive's byte budget before it is made."""
    pending = dict(links)
    while pending:
        done = [path for path, target in pending.items() if target in files]
        if not done:
            path, target = next(iter(pending.items()))
            raise UnsafeArchive(path, f"link target {target!r} is not a file in the archive")
        for path in done:
            target = pending.pop(path)
            budget.take(sizes[target])
            (dest / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(dest / target, dest / path)
            files[path], sizes[path] = files[target], sizes[target]
