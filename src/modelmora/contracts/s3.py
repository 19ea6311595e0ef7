"""The S3 client factory shared by the result store (jobs/) and the S3 model source (registry/)."""

from __future__ import annotations

from typing import Any


def s3_client(endpoint_url: str | None) -> Any:
    # boto3 is an optional extra and slow to import: only when S3 is actually used.
    import boto3
    from botocore.config import Config

    # Fail fast when the store is down: a job must fail with a clear error, not hang.
    config = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint_url, config=config)
