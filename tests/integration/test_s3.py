"""S3 as a model source and as the result store, against a local S3 server over HTTP."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import boto3
import httpx
import pytest

from modelmora.config import S3Settings, Settings, load_settings
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry.installer import InstallRequest, install, install_from_lock_entry, lock_entries
from modelmora.registry.store import RegistryStore
from modelmora.results.s3 import S3ResultStore
from tests.conftest import make_fake_model, new_bucket


def _upload(endpoint: str, bucket: str, prefix: str, folder: Path) -> dict[str, str]:
    client = boto3.client("s3", endpoint_url=endpoint)
    hashes = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            rel = path.relative_to(folder).as_posix()
            client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=path.read_bytes())
            hashes[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


@pytest.fixture
def s3_settings(settings: Settings, s3_endpoint: str) -> Settings:
    return load_settings(
        overrides={
            "server": {"data_dir": str(settings.server.data_dir)},
            "registry": {"s3_endpoint_url": s3_endpoint},
        }
    )


def test_install_from_s3_records_checksums_and_reinstalls_from_the_lock(
    s3_settings: Settings, s3_endpoint: str, tmp_path: Path
) -> None:
    folder = make_fake_model(tmp_path / "fake-s3")
    (folder / "weights").mkdir()
    (folder / "weights" / "part1.bin").write_bytes(b"\x00\x01" * 5000)
    bucket = new_bucket(s3_endpoint)
    # A sibling prefix that starts the same must not leak into the model.
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.put_object(Bucket=bucket, Key="models/fake-s3-old/x", Body=b"x")
    expected = _upload(s3_endpoint, bucket, "models/fake-s3", folder)
    store = RegistryStore(s3_settings.database_url)
    store.create_schema()
    try:
        record = install(s3_settings, store, InstallRequest(source=f"s3://{bucket}/models/fake-s3"))
        assert record.name == "fake-s3" and record.task_type.value == "txt2embed"
        v = record.version()
        assert v.files == expected and v.source_kind == "s3"
        assert v.origin == f"s3://{bucket}/models/fake-s3"
        assert (Path(v.path) / "weights" / "part1.bin").read_bytes() == b"\x00\x01" * 5000
        (entry,) = lock_entries([store.get("fake-s3")])
        assert entry.origin == f"s3://{bucket}/models/fake-s3"
        # A fresh registry installs it from the lock entry, checksums verified...
        other = RegistryStore(f"sqlite:///{tmp_path / 'other.db'}")
        other.create_schema()
        assert install_from_lock_entry(s3_settings, other, entry, progress=False) == "installed"
        # ...and refuses an object changed behind the lock's back.
        boto3.client("s3", endpoint_url=s3_endpoint).put_object(
            Bucket=bucket, Key="models/fake-s3/weights/part1.bin", Body=b"tampered"
        )
        third = RegistryStore(f"sqlite:///{tmp_path / 'third.db'}")
        third.create_schema()
        with pytest.raises(ModelMoraError) as err:
            install_from_lock_entry(s3_settings, third, entry, progress=False)
        assert err.value.code is ErrorCode.CHECKSUM_MISMATCH
        other.close()
        third.close()
    finally:
        store.close()


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("s3://no-such-bucket-here/models/x", "cannot list"),
        ("s3://{bucket}/nothing/here", "nothing found"),
    ],
)
def test_s3_source_errors_are_source_unavailable(
    s3_settings: Settings, s3_endpoint: str, source: str, fragment: str
) -> None:
    bucket = new_bucket(s3_endpoint)
    store = RegistryStore(s3_settings.database_url)
    store.create_schema()
    try:
        with pytest.raises(ModelMoraError) as err:
            install(s3_settings, store, InstallRequest(source=source.format(bucket=bucket), name="x"))
        assert err.value.code is ErrorCode.SOURCE_UNAVAILABLE
        assert fragment in err.value.message
        assert err.value.details["source_kind"] == "s3"
        assert not list((s3_settings.models_dir / ".staging").iterdir())  # nothing left behind
    finally:
        store.close()


def test_s3_endpoint_down_is_source_unavailable(settings: Settings, s3_endpoint: str) -> None:
    down = load_settings(
        overrides={
            "server": {"data_dir": str(settings.server.data_dir)},
            "registry": {"s3_endpoint_url": "http://127.0.0.1:9"},
        }
    )
    store = RegistryStore(down.database_url)
    store.create_schema()
    try:
        with pytest.raises(ModelMoraError) as err:
            install(down, store, InstallRequest(source="s3://bucket/models/x"))
        assert err.value.code is ErrorCode.SOURCE_UNAVAILABLE
    finally:
        store.close()


async def test_s3_result_store_put_fetch_by_presigned_url_stream_and_sweep(s3_endpoint: str) -> None:
    bucket = new_bucket(s3_endpoint)
    cfg = S3Settings(endpoint_url=s3_endpoint, bucket=bucket, prefix="res/")
    store = S3ResultStore(cfg, ttl_seconds=0.5)
    data = bytes(range(256)) * 4096  # 1 MiB
    url = await store.put("abc123.png", data)
    assert url.startswith(s3_endpoint) and ("X-Amz-Signature=" in url or "Signature=" in url)
    async with httpx.AsyncClient() as client:
        fetched = await client.get(url)
    assert fetched.status_code == 200 and fetched.content == data
    obj = await store.stat("abc123.png")
    assert obj.size == len(data) and obj.content_type == "image/png"
    chunks = [c async for c in store.chunks("abc123.png", 300_000)]
    assert b"".join(chunks) == data and len(chunks) == 4
    with pytest.raises(ModelMoraError) as missing:
        await store.stat("nothing.png")
    assert missing.value.code is ErrorCode.NOT_FOUND
    await asyncio.sleep(1.6)  # LastModified has one-second resolution
    assert await store.sweep() == 1
    with pytest.raises(ModelMoraError):
        await store.stat("abc123.png")


async def test_s3_result_store_down_is_a_clear_error(s3_endpoint: str) -> None:
    store = S3ResultStore(S3Settings(endpoint_url=s3_endpoint, bucket="no-such-bucket-x"), ttl_seconds=60)
    with pytest.raises(ModelMoraError) as err:
        await store.put("k.json", b"{}")
    assert err.value.code is ErrorCode.INTERNAL_ERROR
    assert "S3 result store" in err.value.message and err.value.details["bucket"] == "no-such-bucket-x"
