"""Fetch a model from an S3-compatible bucket: `s3://bucket/prefix` (a folder) or one object.

boto3 finds credentials the usual AWS way (variables, profile, instance role); the endpoint
comes from `registry.s3_endpoint_url`, else boto3's own `AWS_ENDPOINT_URL(_S3)`, else AWS.
Every object is streamed to the staging folder and hashed as it arrives, like a URL source.
boto3 is imported (through `s3_client`) only when an S3 source is fetched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry.sources.archive import UnsafeArchive, member_path
from modelmora.registry.sources.common import ByteProgress
from modelmora.registry.sources.files import write_stream


def parse_s3_url(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    bucket, prefix = parts.netloc, parts.path.lstrip("/")
    if not bucket:
        raise ModelMoraError(
            ErrorCode.VALIDATION_ERROR,
            f"{url!r} names no bucket (s3://bucket/prefix)",
            {"errors": [{"field": "source", "message": "no bucket"}]},
        )
    return bucket, prefix


def fetch_s3(
    url: str, fetch_dir: Path, endpoint_url: str | None, progress: bool
) -> tuple[str, dict[str, str], dict[str, int]]:
    """(origin, {path: sha256}, {path: size}); SOURCE_UNAVAILABLE for anything on S3's side."""
    # The one import of the S3 client factory in the registry (it imports boto3 when called).
    from modelmora.contracts.s3 import s3_client

    bucket, prefix = parse_s3_url(url)
    origin = f"s3://{bucket}/{prefix}"

    def unavailable(message: str, exc: BaseException | None = None) -> ModelMoraError:
        details: dict[str, Any] = {"source": origin, "source_kind": "s3"}
        if exc is not None:
            details["reason"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return ModelMoraError(ErrorCode.SOURCE_UNAVAILABLE, message, details)

    try:
        client = s3_client(endpoint_url)
        objects = _list(client, bucket, prefix)
    except ModelMoraError:
        raise
    except Exception as exc:  # botocore: no credentials, no bucket, endpoint down ...
        raise unavailable(f"cannot list {origin}", exc) from exc
    if not objects:
        raise unavailable(f"nothing found under {origin}")
    files: dict[str, str] = {}
    sizes: dict[str, int] = {}
    total = sum(size for _, size in objects)
    with ByteProgress(progress, f"downloading {origin}", total) as bar:
        for key, _size in objects:
            rel = _relative(key, prefix)
            try:
                safe = member_path(rel)
            except UnsafeArchive as exc:
                raise unavailable(f"refusing object {key!r}: {exc.reason}") from exc
            if safe is None:
                continue
            try:
                body = client.get_object(Bucket=bucket, Key=key)["Body"]
            except Exception as exc:
                raise unavailable(f"cannot read s3://{bucket}/{key}", exc) from exc
            with body:
                try:
                    files[safe], sizes[safe] = write_stream(body, fetch_dir / safe, bar.advance)
                except ModelMoraError:
                    raise
                except Exception as exc:
                    raise unavailable(f"reading s3://{bucket}/{key} failed", exc) from exc
    return origin, files, sizes


def _relative(key: str, prefix: str) -> str:
    """A folder prefix keeps the paths below it; a prefix naming one object keeps its name."""
    if key == prefix:
        return key.rsplit("/", 1)[-1]
    base = prefix if prefix.endswith("/") or not prefix else prefix + "/"
    return key[len(base) :]


def _list(client: Any, bucket: str, prefix: str) -> list[tuple[str, int]]:
    """Objects of the folder `prefix/` (not of `prefix-other/`), or the one object `prefix`."""
    folder = prefix if prefix.endswith("/") or not prefix else prefix + "/"
    found: list[tuple[str, int]] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):  # folder markers some tools create
                found.append((obj["Key"], int(obj["Size"])))
    if not found and prefix and not prefix.endswith("/"):
        try:
            head = client.head_object(Bucket=bucket, Key=prefix)
        except Exception:
            return []
        found.append((prefix, int(head["ContentLength"])))
    return found
