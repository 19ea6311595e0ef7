"""Fetch a model's files from where they live: the Hugging Face Hub, a local folder or file, an
http(s) URL (a single file or an archive), or an S3-compatible bucket.

Every fetch ends in one of two ways: a `FetchResult` that names a folder holding the files and
the sha256 of every one of them, or a `ModelMoraError`. Nothing else escapes, and a failed fetch
leaves nothing behind in the staging folder, so the caller never has to clean up after us.

Hub files stay in the Hugging Face cache layout under `cache_dir` (shared with every other tool
that uses that cache); local and URL sources are copied into a fresh folder under `staging_dir`
which the caller renames into its final place: a rename on one file system is atomic, so a
half-copied model is never visible under its real name.

One module per source (`hub`, `local`, `url`, `s3`), `archive` for extraction, `files` and
`common` for what they share, `guard` for URLs under a policy; this module picks the source
and owns the all-or-nothing rule.

With an `InstallPolicy` (installs through the API, registry/policy.py) the source is checked
before anything is fetched, and local and URL fetches check again on the way (files behind
symlinks, redirects, the addresses connected to).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry.catalog import is_hub_id, read_folder_metadata
from modelmora.registry.sources.archive import ArchiveLimits
from modelmora.registry.sources.common import (
    FetchResult,
    SourceKind,
    check_expected,
    content_hash_of,
    first_line,
)
from modelmora.registry.sources.files import hash_folder, make_fetch_dir
from modelmora.registry.sources.hub import DEFAULT_REVISION, fetch_hub
from modelmora.registry.sources.local import fetch_local, file_origin
from modelmora.registry.sources.s3 import fetch_s3
from modelmora.registry.sources.url import fetch_url

if TYPE_CHECKING:
    from modelmora.registry.policy import InstallPolicy


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
    archive_limits: ArchiveLimits | None = None,
    policy: InstallPolicy | None = None,
) -> FetchResult:
    """Fetch a model's files and hash every one of them.

    `expected_files` (from a lock file) turns the fetch into a verified one: any missing, extra
    or different file raises CHECKSUM_MISMATCH and the staged copy is removed. Failures to
    reach or read the source raise SOURCE_UNAVAILABLE; nothing is left in `staging_dir`.
    A source `policy` refuses raises FORBIDDEN, before anything is fetched.
    """
    kind = classify_source(model_id, source)
    if policy is not None:
        policy.check_source(kind, source)
    if kind == "hub":
        repo_id = source[5:].strip("/") if source else model_id
        assert repo_id is not None  # classify_source checked it
        try:
            result = fetch_hub(
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
                f"cannot fetch {repo_id} from the Hub: {type(exc).__name__}: {first_line(exc)}",
                {"source_kind": "hub", "repo_id": repo_id, "reason": str(exc)},
            ) from exc
        if expected_files is not None:
            # The Hugging Face cache is shared: never delete from it, just refuse the files.
            check_expected(expected_files, result.files, result.origin, cleanup=None)
        return result

    assert source is not None
    fetch_dir = make_fetch_dir(staging_dir)
    try:
        if kind == "local":
            origin, files, sizes = fetch_local(
                source, fetch_dir, staging_dir, progress, archive_limits, policy
            )
        elif kind == "s3":
            origin, files, sizes = fetch_s3(source, fetch_dir, s3_endpoint_url, progress)
        else:
            origin, files, sizes = fetch_url(source, fetch_dir, staging_dir, progress, archive_limits, policy)
        if expected_files is not None:
            check_expected(expected_files, files, origin, cleanup=fetch_dir)
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


__all__ = [
    "ArchiveLimits",
    "FetchResult",
    "SourceKind",
    "classify_source",
    "content_hash_of",
    "fetch",
    "file_origin",
    "hash_folder",
]
