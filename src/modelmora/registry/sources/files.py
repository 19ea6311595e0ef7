"""Files on disk: the staging folder, listing a tree, copying and hashing every byte once,
and which errors are the source's (SOURCE_UNAVAILABLE) and which are ours (INTERNAL_ERROR)."""

from __future__ import annotations

import hashlib
import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry.sources.common import CHUNK_SIZE, ByteProgress

# Folders that are never part of a model: version control, and the bookkeeping folder that
# `huggingface_hub` writes into a `--local-dir` download.
_SKIP_DIR_NAMES = frozenset({".git"})
_SKIP_ROOT_DIRS = frozenset({".cache/huggingface"})


def hash_folder(folder: Path, *, progress: bool = False) -> dict[str, str]:
    """sha256 of every file under `folder` (following symlinks, as the Hugging Face cache uses
    them; skipping `.git`), keyed by relative posix path. Used to verify an installed folder
    against the registry or a lock. Unreadable files raise SOURCE_UNAVAILABLE."""
    return hash_tree(folder, progress=progress, label=folder.name)[0]


def hash_tree(folder: Path, *, progress: bool, label: str) -> tuple[dict[str, str], int]:
    entries = list_files(folder, skip=None)
    files: dict[str, str] = {}
    total = sum(size for _, _, size in entries)
    with ByteProgress(progress, f"hashing {label}", total) as bar:
        for rel, src, _ in entries:
            files[rel] = _hash_file(src, bar.advance)
    return files, total


def list_files(root: Path, *, skip: Path | None) -> list[tuple[str, Path, int]]:
    """(relative posix path, path, size) of every regular file under `root`, sorted.

    Symlinks are followed (an HF snapshot is all symlinks) with a guard against loops; `.git`
    folders and the folder in `skip` (the staging area, should it sit inside the source) are
    left out. Broken links and unreadable folders raise SOURCE_UNAVAILABLE.
    """
    skip_real = os.path.realpath(skip) if skip is not None else None
    seen: set[tuple[int, int]] = set()
    out: list[tuple[str, Path, int]] = []

    def on_error(exc: OSError) -> None:
        raise exc

    try:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=on_error):
            st = os.stat(dirpath)
            key = (st.st_dev, st.st_ino)
            if key in seen:  # a symlink loop, or two links to one folder: list it once
                dirnames[:] = []
                continue
            seen.add(key)
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            kept = []
            for name in sorted(dirnames):
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                full = os.path.join(dirpath, name)
                if name in _SKIP_DIR_NAMES or rel in _SKIP_ROOT_DIRS:
                    continue
                if skip_real is not None and os.path.realpath(full) == skip_real:
                    continue
                kept.append(name)
            dirnames[:] = kept
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                rel = name if rel_dir == "." else f"{rel_dir}/{name}"
                try:
                    fst = os.stat(full)
                except FileNotFoundError:
                    raise ModelMoraError(
                        ErrorCode.SOURCE_UNAVAILABLE,
                        f"broken link in model source: {full}",
                        {"path": full},
                    ) from None
                if stat.S_ISREG(fst.st_mode):
                    out.append((rel, Path(full), fst.st_size))
    except ModelMoraError:
        raise
    except OSError as exc:
        where = exc.filename or root
        reason = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))
        raise ModelMoraError(
            ErrorCode.SOURCE_UNAVAILABLE,
            f"cannot read model source folder {where}: {reason}",
            {"path": str(where)},
        ) from exc
    out.sort(key=lambda item: item[0])
    return out


def make_fetch_dir(staging_dir: Path) -> Path:
    try:
        staging_dir.mkdir(parents=True, exist_ok=True)
        fetch_dir = staging_dir.absolute() / f".fetch-{uuid.uuid4().hex}"
        fetch_dir.mkdir()
    except OSError as exc:
        raise ModelMoraError(
            ErrorCode.INTERNAL_ERROR,
            f"cannot create a staging folder in {staging_dir}: {exc.strerror or exc}",
            {"staging_dir": str(staging_dir)},
        ) from exc
    return fetch_dir


def write_error(path: Path, exc: OSError) -> ModelMoraError:
    """Writing our own staging copy failed (disk full, permissions): not the source's fault."""
    return ModelMoraError(
        ErrorCode.INTERNAL_ERROR,
        f"cannot write {path}: {exc.strerror or exc}",
        {"path": str(path)},
    )


def _read_error(path: Path, exc: OSError) -> ModelMoraError:
    reason = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))
    return ModelMoraError(
        ErrorCode.SOURCE_UNAVAILABLE,
        f"cannot read {path}: {reason}",
        {"path": str(path)},
    )


def write_stream(stream: IO[bytes], dst: Path, advance: Callable[[int], None]) -> tuple[str, int]:
    """Copy a stream to a new file, returning (sha256, size). Read errors are the caller's to
    classify (archive vs file); write errors become INTERNAL_ERROR."""
    digest = hashlib.sha256()
    size = 0
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        out = dst.open("wb")
    except OSError as exc:
        raise write_error(dst, exc) from exc
    with out:
        while chunk := stream.read(CHUNK_SIZE):
            digest.update(chunk)
            try:
                out.write(chunk)
            except OSError as exc:
                raise write_error(dst, exc) from exc
            size += len(chunk)
            advance(len(chunk))
    return digest.hexdigest(), size


def copy_file(
    src: Path, dst: Path, advance: Callable[[int], None], check: Callable[[str], None] | None = None
) -> str:
    """`check` (an install policy's) sees the path of the file actually opened, where the
    system tells it (/proc/self/fd on Linux), else `src` itself."""
    try:
        stream = src.open("rb")
    except OSError as exc:
        raise _read_error(src, exc) from exc
    with stream:
        if check is not None:
            check(opened_path(stream.fileno(), src))
        try:
            sha, _ = write_stream(stream, dst, advance)
        except ModelMoraError:
            raise
        except OSError as exc:
            raise _read_error(src, exc) from exc
    return sha


def opened_path(fd: int, fallback: Path) -> str:
    """The path the kernel resolved for an open file: what it is, whatever symlink led there."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return str(fallback)


def _hash_file(path: Path, advance: Callable[[int], None]) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as stream:
            while chunk := stream.read(CHUNK_SIZE):
                digest.update(chunk)
                advance(len(chunk))
    except OSError as exc:
        raise _read_error(path, exc) from exc
    return digest.hexdigest()
