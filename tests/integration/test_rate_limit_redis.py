"""Per-key rate limits shared by replicas through the machine's real Redis (jobs.backend
redis), and concurrency limits that stay per replica."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from modelmora.auth.keys import Principal, Scope
from modelmora.auth.limiter import KeyLimiter, build_limiter
from modelmora.config import Settings
from modelmora.errors import ErrorCode, ModelMoraError
from tests.integration.test_job_store import REDIS_URL, redis_or_skip

ALICE = Principal("a1a1a1a1a1a1", "alice", frozenset({Scope.INFER}))
BOB = Principal("b2b2b2b2b2b2", "bob", frozenset({Scope.INFER}))


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    redis_or_skip()
    import redis.asyncio as aioredis

    name = f"mmtest-{uuid.uuid4().hex[:8]}:"
    yield name
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        async for key in client.scan_iter(match=f"{name}*"):
            await client.delete(key)
    finally:
        await client.aclose()


def replica(prefix: str) -> KeyLimiter:
    settings = Settings.model_validate(
        {
            "auth": {"rate_limit": "3/minute", "max_concurrent_per_key": 1},
            "jobs": {"backend": "redis", "redis_url": REDIS_URL, "redis_prefix": prefix},
        }
    )
    built = build_limiter(settings, auth_on=True)
    assert built is not None
    return built


async def test_two_replicas_share_one_window_per_key(prefix: str) -> None:
    one, two = replica(prefix), replica(prefix)
    (await one.admit(ALICE))()
    (await two.admit(ALICE))()
    (await one.admit(ALICE))()
    for side in (one, two):  # the fourth call in the minute, on either replica
        with pytest.raises(ModelMoraError) as err:
            await side.admit(ALICE)
        assert err.value.code is ErrorCode.RATE_LIMITED
        assert err.value.retry_after is not None and 1 <= err.value.retry_after <= 60
    (await two.admit(BOB))()  # another key, its own window

    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k.decode() async for k in client.scan_iter(match=f"{prefix}*")]
    finally:
        await client.aclose()
    # Under the job store's prefix, one window per key.
    assert keys and all(k.startswith(f"{prefix}limits") for k in keys)
    assert sum(ALICE.key_id in k for k in keys) == 1  # type: ignore[operator]


async def test_concurrency_is_counted_per_replica(prefix: str) -> None:
    one, two = replica(prefix), replica(prefix)
    held = await one.admit(ALICE)
    with pytest.raises(ModelMoraError):
        await one.admit(ALICE)  # this replica's one slot is taken
    (await two.admit(ALICE))()  # the other replica has its own
    held()
