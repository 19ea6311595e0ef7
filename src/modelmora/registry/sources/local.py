"""A local folder or file (an archive is extracted), named by path or `file://` URL: copied
into the staging folder and hashed on the way, so every byte is read once."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry.sources.archive import ArchiveLimits, archive_kind, extract_archive
from modelmora.registry.sources.common import ByteProgress
from modelmora.registry.sources.files import copy_file, list_files


def file_origin(path: Path) -> str:
    """The `file://` URL recorded as the origin of a local source: absolute, symlinks kept as
    the user named them, so the lock shows the path they typed."""
    return Path(os.path.abspath(path.expanduser())).as_uri()


def _local_path(source: str) -> Path:
    if source.lower().startswith("file://"):
        parts = urlsplit(source)
        if parts.netloc not in ("", "localhost"):
            raise ModelMoraError(
                ErrorCode.SOURCE_UNAVAILABLE,
                f"cannot fetch {source}: file URLs on another host are not supported",
                {"source": source, "source_kind": "local"},
            )
        return Path(url2pathname(unquote(parts.path)))
    return Path(source).expanduser()


def fetch_local(
    source: str,
    fetch_dir: Path,
    staging_dir: Path,
    progress: bool,
    archive_limits: ArchiveLimits | None = None,
) -> tuple[str, dict[str, str], dict[str, int]]:
    """Copy a folder (or one file; an archive is extracted) into `fetch_dir`, hashing each file
    on the way so every byte is read once."""
    path = Path(os.path.abspath(_local_path(source)))
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
                sha = copy_file(path, fetch_dir / path.name, bar.advance)
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
            files[rel] = copy_file(src, fetch_dir / rel, bar.advance)
            sizes[rel] = size
    return origin, files, sizes
