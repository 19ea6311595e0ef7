"""The S3-compatible result store (AWS S3, MinIO, Ceph ...), through boto3.

boto3 is synchronous; every call runs in a worker thread so the event loop never blocks on
the network. Endpoint and bucket come from `results.s3.*`; credentials from the usual AWS
environment (variables, profile, instance role), as boto3 finds them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from modelmora.config import S3Settings
from modelmora.contracts.s3 import s3_client
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.results.store import StoredObject, check_key, content_type_of, missing_result


def _unavailable(exc: Exception, bucket: str | None) -> ModelMoraError:
    return ModelMoraError(
        ErrorCode.INTERNAL_ERROR,
        f"the S3 result store could not be written: {exc}",
        {"store": "s3", "bucket": bucket},
    )


class S3ResultStore:
    def __init__(self, cfg: S3Settings, ttl_seconds: float, client: Any = None) -> None:
        if not cfg.bucket:
            raise ModelMoraError(
                ErrorCode.VALIDATION_ERROR, "results.backend is s3 but results.s3.bucket is not set"
            )
        self.cfg = cfg
        self.bucket: str = cfg.bucket
        self.ttl = ttl_seconds
        self._client = client or s3_client(cfg.endpoint_url)

    def _object(self, key: str) -> str:
        return self.cfg.prefix + check_key(key)

    def url_for(self, key: str) -> str:
        url: str = self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._object(key)},
            ExpiresIn=self.cfg.presign_seconds,
        )
        return url

    async def put(self, key: str, data: bytes) -> str:
        name = self._object(key)
        try:
            await asyncio.to_thread(
                self._client.put_object,
                Bucket=self.bucket,
                Key=name,
                Body=data,
                ContentType=content_type_of(key),
            )
        except Exception as exc:  # botocore raises many types; all mean "not stored"
            raise _unavailable(exc, self.bucket) from exc
        return self.url_for(key)

    async def stat(self, key: str) -> StoredObject:
        try:
            head = await asyncio.to_thread(
                self._client.head_object, Bucket=self.bucket, Key=self._object(key)
            )
        except Exception as exc:
            raise missing_result(key) from exc
        kind = str(head.get("ContentType") or content_type_of(key))
        return StoredObject(key, int(head["ContentLength"]), kind)

    async def chunks(self, key: str, chunk_size: int) -> AsyncIterator[bytes]:
        try:
            obj = await asyncio.to_thread(self._client.get_object, Bucket=self.bucket, Key=self._object(key))
        except Exception as exc:
            raise missing_result(key) from exc
        body = obj["Body"]
        try:
            while True:
                block = await asyncio.to_thread(body.read, chunk_size)
                if not block:
                    return
                yield block
        finally:
            body.close()

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._client.delete_object, Bucket=self.bucket, Key=self._object(key))

    async def sweep(self) -> int:
        """Delete objects under the prefix older than the TTL (a bucket lifecycle rule does
        the same without ModelMora; this keeps the embedded behaviour identical)."""

        def run() -> int:
            cutoff = time.time() - self.ttl
            gone = 0
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.cfg.prefix
            )
            for page in pages:
                listed = page.get("Contents", [])
                old = [{"Key": o["Key"]} for o in listed if o["LastModified"].timestamp() < cutoff]
                if old:
                    self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": old, "Quiet": True})
                    gone += len(old)
            return gone

        return await asyncio.to_thread(run)

    async def close(self) -> None:
        return None
