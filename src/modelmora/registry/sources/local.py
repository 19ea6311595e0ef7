"""A local folder or file (an archive is extracted), named by path or `file://` URL: copied
into the staging folder and hashed on the way, so every byte is read once.

Under an `InstallPolicy` the source was checked against the local roots before we get here;
a folder is checked again file by file (a symlink inside it may point anywhere), and each
file once more after it is opened, by the path the kernel opened (/proc/self/fd), so a
symlink swapped between the check and the open is caught too."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry.policy import InstallPolicy, forbidden, local_source_path
from modelmora.registry.sources.archive import ArchiveLimits, archive_kind, extract_archive
from modelmora.registry.sources.common import ByteProgress
from modelmora.registry.sources.files import copy_file, list_files


def file_origin(path: Path) -> str:
    """The `file://` URL recorded as the origin of a local source: absolute, symlinks kept as
    the user named them, so the lock shows the path they typed."""
    return Path(os.path.abspath(path.expanduser())).as_uri()


def fetch_local(
    source: str,
    fetch_dir: Path,
    staging_dir: Path,
    progress: bool,
    archive_limits: ArchiveLimits | None = None,
    policy: InstallPolicy | None = None,
) -> tuple[str, dict[str, str], dict[str, int]]:
    """Copy a folder (or one file; an archive is extracted) into `fetch_dir`, hashing each file
    on the way so every byte is read once."""
    path = Path(os.path.abspath(local_source_path(source)))
    check = None if policy is None else _root_check(policy, source)
    origin = file_origin(path)

    def unavailable(message: str, **extra: Any) -> ModelMoraError:
        return ModelMoraError(
            ErrorCode.SOURCE_UNAVAILABLE, message, {"source": source, "path": str(path), **extra}
        )

    try:
        st = path.stat()
    except FileNotFoundError:
        raise unavailable(f"model source not found: {path}") from None
    except PermissionError:
        raise unavailable(f"permission denied reading model source {path}") from None
    except OSError as exc:
        raise unavailable(f"cannot read model source {path}: {exc.strerror or exc}") from exc

    if stat.S_ISREG(st.st_mode):
        kind = archive_kind(path.name)
        if kind is not None:
            files, sizes = extract_archive(
                path, kind, fetch_dir, progress, label=source, limits=archive_limits
            )
        else:
            with ByteProgress(progress, f"copying {path.name}", st.st_size) as bar:
                sha = copy_file(path, fetch_dir / path.name, bar.advance, check)
            files, sizes = {path.name: sha}, {path.name: st.st_size}
        return origin, files, sizes
    if not stat.S_ISDIR(st.st_mode):
        raise unavailable(f"model source {path} is neither a folder nor a file")

    entries = list_files(path, skip=staging_dir)
    if not entries:
        raise unavailable(f"model source {path} contains no files")
    files = {}
    sizes = {}
    with ByteProgress(progress, f"copying {path.name}", sum(s for _, _, s in entries)) as bar:
        for rel, src, size in entries:
            if check is not None:
                check(str(src))
            files[rel] = copy_file(src, fetch_dir / rel, bar.advance, check)
            sizes[rel] = size
    return origin, files, sizes


def _root_check(policy: InstallPolicy, source: str) -> Callable[[str], None]:
    """Raises FORBIDDEN for a path (or an open file's /proc/self/fd path) outside the roots."""

    def check(path: str) -> None:
        if not policy.within_roots(path):
            raise forbidden(
                f"{source} leads outside registry.allowed_sources.local_roots (a symlink?)",
                "registry.allowed_sources.local_roots",
                source=source,
            )

    return check
