"""An http(s) URL: one file, or an archive that is downloaded beside the staging folder and
extracted. Credentials in the URL are used but never recorded. Under an `InstallPolicy` the
client is `guard.guarded_client`: every hop's URL and every address connected to checked."""

from __future__ import annotations

import contextlib
import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx

from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry.sources.archive import ArchiveLimits, archive_kind, extract_archive
from modelmora.registry.sources.common import CHUNK_SIZE, ByteProgress, first_line
from modelmora.registry.sources.files import write_error
from modelmora.registry.sources.guard import guarded_client

if TYPE_CHECKING:
    from modelmora.registry.policy import InstallPolicy

# Connect fast or fail; a slow read of a large file is fine as long as bytes keep coming.
HTTP_TIMEOUT = httpx.Timeout(60.0, connect=15.0)
_DISPOSITION_RE = re.compile(r"""filename\*?=(?:UTF-8'')?["']?([^"';]+)""", re.IGNORECASE)


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


def fetch_url(
    url: str,
    fetch_dir: Path,
    staging_dir: Path,
    progress: bool,
    archive_limits: ArchiveLimits | None = None,
    policy: InstallPolicy | None = None,
) -> tuple[str, dict[str, str], dict[str, int]]:
    """Stream a URL to disk, hashing as it arrives; archives go to a side file first (outside
    the model folder) and are extracted from it."""
    origin = _public_url(url)
    url_name = _safe_basename(urlsplit(url).path)
    tmp_archive = fetch_dir.with_name(fetch_dir.name + ".download")

    def unavailable(message: str, exc: BaseException | None = None, **extra: Any) -> ModelMoraError:
        details: dict[str, Any] = {"source": origin, "source_kind": "url", **extra}
        if exc is not None:
            details["reason"] = f"{type(exc).__name__}: {first_line(exc)}"
        return ModelMoraError(ErrorCode.SOURCE_UNAVAILABLE, message, details)

    client = (
        httpx.Client(follow_redirects=True, timeout=HTTP_TIMEOUT)
        if policy is None
        else guarded_client(policy, HTTP_TIMEOUT)
    )
    try:
        with (
            client,
            client.stream("GET", url) as response,
        ):
            if response.status_code >= 400:
                raise unavailable(
                    f"{origin} answered HTTP {response.status_code} {response.reason_phrase}".rstrip(),
                    status=response.status_code,
                )
            name = url_name or _disposition_name(response) or _safe_basename(response.url.path)
            name = name or "download"
            kind = archive_kind(name)
            target = tmp_archive if kind is not None else fetch_dir / name
            total = _content_length(response)
            digest = hashlib.sha256()
            written = 0
            with ByteProgress(progress, f"downloading {name}", total) as bar:
                try:
                    out = target.open("xb")
                except OSError as exc:
                    raise write_error(target, exc) from exc
                with out:
                    for chunk in response.iter_bytes(CHUNK_SIZE):
                        digest.update(chunk)
                        try:
                            out.write(chunk)
                        except OSError as exc:
                            raise write_error(target, exc) from exc
                        written += len(chunk)
                        bar.advance(len(chunk))
        if kind is None:
            return origin, {name: digest.hexdigest()}, {name: written}
        files, sizes = extract_archive(
            tmp_archive, kind, fetch_dir, progress, label=origin, limits=archive_limits
        )
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
        raise unavailable(f"cannot fetch {origin}: {first_line(exc)}", exc) from exc
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
