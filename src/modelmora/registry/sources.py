"""Fetch a model's files from where they live: the Hugging Face Hub, a local folder or file, an
http(s) URL (a single file or an archive), or an S3-compatible bucket (registry/s3source.py).

Every fetch ends in one of two ways: a `FetchResult` that names a folder holding the files and
the sha256 of every one of them, or a `ModelMoraError`. Nothing else escapes, and a failed fetch
leaves nothing behind in the staging folder, so the caller never has to clean up after us.

Hub files stay in the Hugging Face cache layout under `cache_dir` (shared with every other tool
that uses that cache); local and URL sources are copied into a fresh folder under `staging_dir`
which the caller renames into its final place: a rename on one file system is atomic, so a
half-copied model is never visible under its real name.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import re
import shutil
import stat
import tarfile
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit
from urllib.request import url2pathname

import httpx

from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry.catalog import ModelMetadata, is_hub_id, read_folder_metadata
from modelmora.registry.lockfile import diff_files

logger = logging.getLogger(__name__)

SourceKind = Literal["hub", "local", "url", "s3"]

CHUNK_SIZE = 1 << 20
# Connect fast or fail; a slow read of a large file is fine as long as bytes keep coming.
HTTP_TIMEOUT = httpx.Timeout(60.0, connect=15.0)
HUB_TIMEOUT_S = 30.0
DEFAULT_REVISION = "main"

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
# Folders that are never part of a model: version control, and the bookkeeping folder that
# `huggingface_hub` writes into a `--local-dir` download.
_SKIP_DIR_NAMES = frozenset({".git"})
_SKIP_ROOT_DIRS = frozenset({".cache/huggingface"})
_SKIP_ARCHIVE_DIRS = frozenset({"__MACOSX"})
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_DISPOSITION_RE = re.compile(r"""filename\*?=(?:UTF-8'')?["']?([^"';]+)""", re.IGNORECASE)


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


# --------------------------------------------------------------------------------------------
# Public helpers


def content_hash_of(files: dict[str, str]) -> str:
    """One sha256 that identifies a set of files by their paths and contents (order-free), so
    two installs can be compared without walking either folder."""
    digest = hashlib.sha256()
    for line in sorted(f"{path}\0{sha}\n" for path, sha in files.items()):
        digest.update(line.encode("utf-8"))
    return digest.hexdigest()


def file_origin(path: Path) -> str:
    """The `file://` URL recorded as the origin of a local source: absolute, symlinks kept as
    the user named them, so the lock shows the path they typed."""
    return Path(os.path.abspath(path.expanduser())).as_uri()


def hash_folder(folder: Path, *, progress: bool = False) -> dict[str, str]:
    """sha256 of every file under `folder` (following symlinks, as the Hugging Face cache uses
    them; skipping `.git`), keyed by relative posix path. Used to verify an installed folder
    against the registry or a lock. Unreadable files raise SOURCE_UNAVAILABLE."""
    return _hash_tree(folder, progress=progress, label=folder.name)[0]


def _hash_tree(folder: Path, *, progress: bool, label: str) -> tuple[dict[str, str], int]:
    entries = _list_files(folder, skip=None)
    files: dict[str, str] = {}
    total = sum(size for _, _, size in entries)
    with _ByteProgress(progress, f"hashing {label}", total) as bar:
        for rel, src, _ in entries:
            files[rel] = _hash_file(src, bar.advance)
    return files, total


def classify_source(model_id: str | None, source: str | None) -> SourceKind:
    """Which kind of source a (model_id, source) pair names.

    No source means the Hub (the ID must then be a Hub repo ID); `hf://org/name` is the Hub
    too, so an origin read back from a lock file can be passed straight back in.
    """
    if not source:
        if model_id is None or not is_hub_id(model_id):
            raise ModelMoraError(
                ErrorCode.VALIDATION_ERROR,
                f"{model_id!r} is not a Hugging Face Hub ID (org/name); give a source path or URL",
                {"errors": [{"field": "model_id", "message": "not a Hub repository ID"}]},
            )
        return "hub"
    lowered = source.lower()
    if lowered.startswith("s3://"):
        return "s3"
    if lowered.startswith(("http://", "https://")):
        return "url"
    if lowered.startswith("hf://"):
        if not is_hub_id(source[5:].strip("/")):
            raise ModelMoraError(
                ErrorCode.VALIDATION_ERROR,
                f"{source!r} does not name a Hugging Face Hub repository (hf://org/name)",
                {"errors": [{"field": "source", "message": "not a Hub repository ID"}]},
            )
        return "hub"
    return "local"


def fetch(
    model_id: str | None,
    source: str | None,
    *,
    staging_dir: Path,
    cache_dir: Path,
    revision: str | None = None,
    hub_endpoint: str | None = None,
    hub_token: str | None = None,
    s3_endpoint_url: str | None = None,
    progress: bool = True,
    expected_files: dict[str, str] | None = None,
) -> FetchResult:
    """Fetch a model's files and hash every one of them.

    `expected_files` (from a lock file) turns the fetch into a verified one: any missing, extra
    or different file raises CHECKSUM_MISMATCH and the staged copy is removed. Failures to
    reach or read the source raise SOURCE_UNAVAILABLE; nothing is left in `staging_dir`.
    """
    kind = classify_source(model_id, source)
    if kind == "hub":
        repo_id = source[5:].strip("/") if source else model_id
        assert repo_id is not None  # classify_source checked it
        try:
            result = _fetch_hub(
                repo_id,
                revision=revision or DEFAULT_REVISION,
                cache_dir=cache_dir,
                endpoint=hub_endpoint,
                token=hub_token,
                progress=progress,
            )
        except ModelMoraError:
            raise
        except Exception as exc:
            raise ModelMoraError(
                ErrorCode.SOURCE_UNAVAILABLE,
                f"cannot fetch {repo_id} from the Hub: {type(exc).__name__}: {_first_line(exc)}",
                {"source_kind": "hub", "repo_id": repo_id, "reason": str(exc)},
            ) from exc
        if expected_files is not None:
            # The Hugging Face cache is shared: never delete from it, just refuse the files.
            _check_expected(expected_files, result.files, result.origin, cleanup=None)
        return result

    assert source is not None
    fetch_dir = _make_fetch_dir(staging_dir)
    try:
        if kind == "local":
            origin, files, sizes = _fetch_local(source, fetch_dir, staging_dir, progress)
        elif kind == "s3":
            from modelmora.registry.s3source import fetch_s3

            origin, files, sizes = fetch_s3(source, fetch_dir, s3_endpoint_url, progress)
        else:
            origin, files, sizes = _fetch_url(source, fetch_dir, staging_dir, progress)
        if expected_files is not None:
            _check_expected(expected_files, files, origin, cleanup=fetch_dir)
        metadata = read_folder_metadata(fetch_dir)
        return FetchResult(
            path=fetch_dir,
            revision=None,
            origin=origin,
            files=files,
            size_bytes=sum(sizes.values()),
            metadata=metadata,
            content_hash=content_hash_of(files),
        )
    except BaseException as exc:
        shutil.rmtree(fetch_dir, ignore_errors=True)
        if isinstance(exc, ModelMoraError) or not isinstance(exc, Exception):
            raise
        # Anything we did not foresee is still a failure to get the files from the source.
        raise ModelMoraError(
            ErrorCode.SOURCE_UNAVAILABLE,
            f"cannot fetch {source}: {type(exc).__name__}: {exc}",
            {"source": source, "source_kind": kind, "reason": str(exc)},
        ) from exc


# --------------------------------------------------------------------------------------------
# Hugging Face Hub


def _silent_tqdm_class() -> type[Any]:
    """A huggingface_hub tqdm that never draws: per call, unlike the process-wide
    `disable_progress_bars()`, so one quiet fetch does not silence another one."""
    from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

    class _SilentTqdm(hf_tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]

    return _SilentTqdm


def _hub_unavailable(
    message: str, *, repo_id: str, revision: str, endpoint: str, exc: BaseException | None
) -> ModelMoraError:
    details: dict[str, Any] = {
        "source_kind": "hub",
        "repo_id": repo_id,
        "revision": revision,
        "endpoint": endpoint,
    }
    if exc is not None:
        details["reason"] = f"{type(exc).__name__}: {_first_line(exc)}"
    return ModelMoraError(ErrorCode.SOURCE_UNAVAILABLE, message, details)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _fetch_hub(
    repo_id: str,
    *,
    revision: str,
    cache_dir: Path,
    endpoint: str | None,
    token: str | None,
    progress: bool,
) -> FetchResult:
    """Resolve the revision to a commit first, then download that commit: the branch may move
    between the two calls, and pinning the sha makes the files and the recorded revision agree.

    When the Hub cannot be reached at all (connection refused, DNS, timeout, 5xx, offline mode)
    a snapshot already in the cache is used, as huggingface_hub itself does; a 404 is final.
    """
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = (endpoint or constants.ENDPOINT).rstrip("/")
    origin = f"hf://{repo_id}"
    cache_dir = cache_dir.expanduser().absolute()
    tqdm_class = None if progress else _silent_tqdm_class()

    def unavailable(message: str, exc: BaseException | None) -> ModelMoraError:
        return _hub_unavailable(message, repo_id=repo_id, revision=revision, endpoint=where, exc=exc)

    def final(exc: BaseException) -> ModelMoraError | None:
        """The errors that a cached copy must not paper over: the Hub answered, and said no."""
        if isinstance(exc, RevisionNotFoundError):
            return unavailable(f"revision {revision!r} of {repo_id} not found on the Hub ({where})", exc)
        if isinstance(exc, RepositoryNotFoundError):
            return unavailable(
                f"model {repo_id} not found on the Hub ({where}), or it is private or gated "
                "and no valid token was given",
                exc,
            )
        if isinstance(exc, HfHubHTTPError) and exc.response is not None:
            status = exc.response.status_code
            if 400 <= status < 500 and status != 429:
                return unavailable(f"the Hub ({where}) refused {repo_id}: HTTP {status}", exc)
        if isinstance(exc, ValueError):  # HFValidationError and friends: a bad ID or revision
            return unavailable(f"the Hub rejected {repo_id}@{revision}: {_first_line(exc)}", exc)
        return None

    api = HfApi(endpoint=endpoint, token=token)
    sha: str | None = None
    info: Any = None
    try:
        info = api.model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
        sha = info.sha
        if not sha:
            raise unavailable(f"the Hub ({where}) did not say which commit {repo_id}@{revision} is", None)
        snapshot = snapshot_download(
            repo_id,
            revision=sha,
            cache_dir=cache_dir,
            endpoint=endpoint,
            token=token,
            tqdm_class=tqdm_class,
        )
        _remember_ref(cache_dir, repo_id, revision, sha)
    except ModelMoraError:
        raise
    except Exception as exc:
        refusal = final(exc)
        if refusal is not None:
            raise refusal from exc
        cached = _cached_snapshot(repo_id, sha or revision, cache_dir)
        if cached is None:
            raise unavailable(
                f"cannot reach the Hugging Face Hub at {where} for {repo_id}@{revision} "
                f"({type(exc).__name__}: {_first_line(exc)}) and no copy is cached in {cache_dir}",
                exc,
            ) from exc
        logger.warning(
            "Hub unreachable for %s@%s (%s); using the cached snapshot %s", repo_id, revision, exc, cached
        )
        snapshot, info = cached, None

    path = Path(snapshot)
    if not path.is_dir():  # huggingface_hub returns the folder's name even for an empty repo
        raise unavailable(f"{repo_id}@{revision} has no files on the Hub ({where})", None)
    try:
        files, size_bytes = _hash_tree(path, progress=progress, label=repo_id)
    except ModelMoraError as exc:
        raise unavailable(f"cannot read the downloaded snapshot of {repo_id} in {path}", exc) from exc
    metadata = read_folder_metadata(path)
    if info is not None:
        metadata = replace(
            metadata,
            pipeline_tag=getattr(info, "pipeline_tag", None),
            library_name=getattr(info, "library_name", None),
        )
    return FetchResult(
        path=path,
        revision=path.name,  # snapshots/<commit sha>
        origin=origin,
        files=files,
        size_bytes=size_bytes,
        metadata=metadata,
        content_hash=content_hash_of(files),
    )


def _cached_snapshot(repo_id: str, revision: str, cache_dir: Path) -> str | None:
    """The cached snapshot for a commit sha, or for a branch/tag whose ref was recorded by an
    earlier download; None when there is none or it is incomplete."""
    from huggingface_hub import snapshot_download

    try:
        return str(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=True,
                tqdm_class=_silent_tqdm_class(),
            )
        )
    except Exception:
        return None


def _remember_ref(cache_dir: Path, repo_id: str, revision: str, sha: str) -> None:
    """Record `refs/<revision>` -> sha, as a download by branch name would have done, so that an
    offline fetch of the same branch later finds this snapshot. Best effort."""
    if revision == sha or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]*", revision) or ".." in revision:
        return
    from huggingface_hub.file_download import repo_folder_name

    ref = cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / revision
    try:
        if ref.is_file() and ref.read_text() == sha:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(f".{ref.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(sha)
        os.replace(tmp, ref)
    except OSError as exc:
        logger.warning("could not record ref %s -> %s in %s: %s", revision, sha, ref, exc)


# --------------------------------------------------------------------------------------------
# Local folders and files


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


def _fetch_local(
    source: str, fetch_dir: Path, staging_dir: Path, progress: bool
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
        kind = _archive_kind(path.name)
        if kind is not None:
            files, sizes = _extract_archive(path, kind, fetch_dir, progress, label=source)
        else:
            with _ByteProgress(progress, f"copying {path.name}", st.st_size) as bar:
                sha = _copy_file(path, fetch_dir / path.name, bar.advance)
            files, sizes = {path.name: sha}, {path.name: st.st_size}
        return origin, files, sizes
    if not stat.S_ISDIR(st.st_mode):
        raise unavailable(f"model source {path} is neither a folder nor a file")

    entries = _list_files(path, skip=staging_dir)
    if not entries:
        raise unavailable(f"model source {path} contains no files")
    files = {}
    sizes = {}
    with _ByteProgress(progress, f"copying {path.name}", sum(s for _, _, s in entries)) as bar:
        for rel, src, size in entries:
            files[rel] = _copy_file(src, fetch_dir / rel, bar.advance)
            sizes[rel] = size
    return origin, files, sizes


def _list_files(root: Path, *, skip: Path | None) -> list[tuple[str, Path, int]]:
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


# --------------------------------------------------------------------------------------------
# http(s) URLs


def _public_url(url: str) -> str:
    """The URL without user:password, so credentials never land in the registry or a lock."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _safe_basename(name: str) -> str | None:
    name = unquote(name).strip().replace("\\", "/").rsplit("/", 1)[-1]
    if not name or name in {".", ".."} or "\0" in name:
        return None
    return name


def _fetch_url(
    url: str, fetch_dir: Path, staging_dir: Path, progress: bool
) -> tuple[str, dict[str, str], dict[str, int]]:
    """Stream a URL to disk, hashing as it arrives; archives go to a side file first (outside
    the model folder) and are extracted from it."""
    origin = _public_url(url)
    url_name = _safe_basename(urlsplit(url).path)
    tmp_archive = fetch_dir.with_name(fetch_dir.name + ".download")

    def unavailable(message: str, exc: BaseException | None = None, **extra: Any) -> ModelMoraError:
        details: dict[str, Any] = {"source": origin, "source_kind": "url", **extra}
        if exc is not None:
            details["reason"] = f"{type(exc).__name__}: {_first_line(exc)}"
        return ModelMoraError(ErrorCode.SOURCE_UNAVAILABLE, message, details)

    try:
        with (
            httpx.Client(follow_redirects=True, timeout=HTTP_TIMEOUT) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code >= 400:
                raise unavailable(
                    f"{origin} answered HTTP {response.status_code} {response.reason_phrase}".rstrip(),
                    status=response.status_code,
                )
            name = url_name or _disposition_name(response) or _safe_basename(response.url.path)
            name = name or "download"
            kind = _archive_kind(name)
            target = tmp_archive if kind is not None else fetch_dir / name
            total = _content_length(response)
            digest = hashlib.sha256()
            written = 0
            with _ByteProgress(progress, f"downloading {name}", total) as bar:
                try:
                    out = target.open("xb")
                except OSError as exc:
                    raise _write_error(target, exc) from exc
                with out:
                    for chunk in response.iter_bytes(CHUNK_SIZE):
                        digest.update(chunk)
                        try:
                            out.write(chunk)
                        except OSError as exc:
                            raise _write_error(target, exc) from exc
                        written += len(chunk)
                        bar.advance(len(chunk))
        if kind is None:
            return origin, {name: digest.hexdigest()}, {name: written}
        files, sizes = _extract_archive(tmp_archive, kind, fetch_dir, progress, label=origin)
        return origin, files, sizes
    except ModelMoraError:
        raise
    except httpx.TimeoutException as exc:
        raise unavailable(f"timed out fetching {origin}", exc) from exc
    except httpx.ConnectError as exc:
        raise unavailable(f"cannot connect to {urlsplit(url).netloc} to fetch {origin}", exc) from exc
    except httpx.TooManyRedirects as exc:
        raise unavailable(f"too many redirects fetching {origin}", exc) from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise unavailable(f"cannot fetch {origin}: {_first_line(exc)}", exc) from exc
    finally:
        with contextlib.suppress(OSError):
            tmp_archive.unlink()


def _disposition_name(response: httpx.Response) -> str | None:
    header = response.headers.get("content-disposition")
    if not header:
        return None
    match = _DISPOSITION_RE.search(header)
    return _safe_basename(match.group(1)) if match else None


def _content_length(response: httpx.Response) -> int | None:
    if response.headers.get("content-encoding", "identity").lower() != "identity":
        return None  # the header counts compressed bytes; we count decoded ones
    try:
        return int(response.headers["content-length"])
    except (KeyError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Archives


def _archive_kind(name: str) -> Literal["zip", "tar"] | None:
    lowered = name.lower()
    for suffix, kind in _ARCHIVE_SUFFIXES:
        if lowered.endswith(suffix):
            return kind
    return None


class _UnsafeArchive(Exception):
    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"{member!r}: {reason}")
        self.member = member
        self.reason = reason


def _member_path(name: str) -> str | None:
    """A member name as a safe relative posix path, None for the archive root, or raise.

    Refuses what could write outside the extraction folder: absolute names, drive letters,
    '..' anywhere. Backslashes count as separators (zip files made on Windows use them).
    """
    raw = name.replace("\\", "/")
    if raw.startswith("/") or _DRIVE_RE.match(raw):
        raise _UnsafeArchive(name, "absolute path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _UnsafeArchive(name, "'..' in path")
    if any("\0" in p for p in parts):
        raise _UnsafeArchive(name, "NUL in path")
    return "/".join(parts) or None


def _link_target(member: str, linkname: str, *, relative_to_member: bool) -> str:
    """Where a link member points, as a path inside the archive; refuse targets outside it."""
    target = linkname.replace("\\", "/")
    if target.startswith("/") or _DRIVE_RE.match(target):
        raise _UnsafeArchive(member, f"link to absolute path {linkname!r}")
    base = posixpath.dirname(member) if relative_to_member else ""
    joined = posixpath.normpath(posixpath.join(base, target))
    if joined == ".." or joined.startswith("../") or joined == ".":
        raise _UnsafeArchive(member, f"link {linkname!r} points outside the archive")
    return joined


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
        name = _member_path(info.name)
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
            raise _UnsafeArchive(info.name, "device, fifo or other special file")
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
        name = _member_path(info.filename)
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


def _extract_archive(
    archive: Path, kind: Literal["zip", "tar"], dest: Path, progress: bool, *, label: str
) -> tuple[dict[str, str], dict[str, int]]:
    """Extract into `dest`, hashing each file as it is written.

    Never calls tarfile/zipfile extract: every member is checked and written by hand, links
    are never created on disk (a link whose target is a file inside the archive becomes a copy
    of it), so nothing can land outside `dest` whatever the archive holds.
    """

    def refuse(message: str, exc: BaseException | None, **extra: Any) -> ModelMoraError:
        details: dict[str, Any] = {"source": label, "archive": archive.name, **extra}
        if exc is not None:
            details["reason"] = f"{type(exc).__name__}: {_first_line(exc)}"
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
            links: dict[str, str] = {}
            with _ByteProgress(progress, f"extracting {archive.name}", total) as bar:
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
                            files[path], sizes[path] = _write_stream(stream, dest / path, bar.advance)
                        links.pop(path, None)
                _materialize_links(links, dest, files, sizes)
    except _UnsafeArchive as exc:
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
        raise refuse(f"cannot extract archive {label}: {_first_line(exc)}", exc) from exc
    if not files:
        raise refuse(f"archive {label} contains no files", None)
    return files, sizes


def _materialize_links(
    links: dict[str, str], dest: Path, files: dict[str, str], sizes: dict[str, int]
) -> None:
    """Turn in-archive links into copies of their targets (chains resolved in rounds)."""
    pending = dict(links)
    while pending:
        done = [path for path, target in pending.items() if target in files]
        if not done:
            path, target = next(iter(pending.items()))
            raise _UnsafeArchive(path, f"link target {target!r} is not a file in the archive")
        for path in done:
            target = pending.pop(path)
            (dest / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(dest / target, dest / path)
            files[path], sizes[path] = files[target], sizes[target]


# --------------------------------------------------------------------------------------------
# Files, hashing, progress


def _make_fetch_dir(staging_dir: Path) -> Path:
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


def _write_error(path: Path, exc: OSError) -> ModelMoraError:
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


def _write_stream(stream: IO[bytes], dst: Path, advance: Callable[[int], None]) -> tuple[str, int]:
    """Copy a stream to a new file, returning (sha256, size). Read errors are the caller's to
    classify (archive vs file); write errors become INTERNAL_ERROR."""
    digest = hashlib.sha256()
    size = 0
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        out = dst.open("wb")
    except OSError as exc:
        raise _write_error(dst, exc) from exc
    with out:
        while chunk := stream.read(CHUNK_SIZE):
            digest.update(chunk)
            try:
                out.write(chunk)
            except OSError as exc:
                raise _write_error(dst, exc) from exc
            size += len(chunk)
            advance(len(chunk))
    return digest.hexdigest(), size


def _copy_file(src: Path, dst: Path, advance: Callable[[int], None]) -> str:
    try:
        stream = src.open("rb")
    except OSError as exc:
        raise _read_error(src, exc) from exc
    with stream:
        try:
            sha, _ = _write_stream(stream, dst, advance)
        except ModelMoraError:
            raise
        except OSError as exc:
            raise _read_error(src, exc) from exc
    return sha


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


def _check_expected(
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


class _ByteProgress:
    """A rich progress bar in bytes on stderr, or nothing at all when disabled."""

    def __init__(self, enabled: bool, description: str, total: int | None) -> None:
        self._enabled = enabled
        self._description = description
        self._total = total
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> _ByteProgress:
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


__all__ = [
    "FetchResult",
    "SourceKind",
    "classify_source",
    "content_hash_of",
    "fetch",
    "file_origin",
    "hash_folder",
]
