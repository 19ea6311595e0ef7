"""The Hugging Face Hub: files stay in the Hugging Face cache layout under `cache_dir`, shared
with every other tool that uses that cache. huggingface_hub is imported inside the functions,
so only an install from the Hub loads it (the server never does)."""

from __future__ import annotations

import logging
import os
import re
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry.catalog import read_folder_metadata
from modelmora.registry.sources.common import FetchResult, content_hash_of, first_line
from modelmora.registry.sources.files import hash_tree

logger = logging.getLogger(__name__)

HUB_TIMEOUT_S = 30.0
DEFAULT_REVISION = "main"


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
        details["reason"] = f"{type(exc).__name__}: {first_line(exc)}"
    return ModelMoraError(ErrorCode.SOURCE_UNAVAILABLE, message, details)


def fetch_hub(
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
            return unavailable(f"the Hub rejected {repo_id}@{revision}: {first_line(exc)}", exc)
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
                f"({type(exc).__name__}: {first_line(exc)}) and no copy is cached in {cache_dir}",
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
        files, size_bytes = hash_tree(path, progress=progress, label=repo_id)
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
