"""Membership on the real Redis (cluster/membership.py): replicas see each other, a model that
starts loading is published at once, a replica that leaves or goes silent disappears; and
the settings routing refuses to start with."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from modelmora.cluster.membership import Membership, check_cluster_settings
from modelmora.cluster.view import ModelPresence, ReplicaInfo
from modelmora.config import ConfigurationError, Settings
from tests.integration.test_job_store import REDIS_URL, redis_or_skip


def settings(prefix: str, **cluster: Any) -> Settings:
    return Settings(
        jobs={"backend": "redis", "redis_url": REDIS_URL, "redis_prefix": prefix},  # type: ignore[arg-type]
        cluster={
            "advertise_url": "http://127.0.0.1:1",
            "heartbeat_seconds": 0.2,
            "ttl_seconds": 0.6,
            **cluster,
        },  # type: ignore[arg-type]
    )


class Node:
    """One replica's record, changed by the test as a model manager would change it."""

    def __init__(self, rid: str) -> None:
        self.id = rid
        self.models: tuple[ModelPresence, ...] = ()

    def snapshot(self) -> ReplicaInfo:
        return ReplicaInfo(
            id=self.id, advertise_url=f"http://{self.id}:8000", heartbeat_at=time.time(), models=self.models
        )


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    redis_or_skip()
    prefix = f"mmclu-{uuid.uuid4().hex[:8]}:"
    yield prefix
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    async for key in client.scan_iter(match=f"{prefix}*"):
        await client.delete(key)
    await client.aclose()


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll observable state; `timeout` is a failure bound, not a measurement."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "not reached in time"
        await asyncio.sleep(0.01)


Pair = tuple[Node, Membership, Node, Membership]


@pytest.fixture
async def pair(prefix: str) -> AsyncIterator[Callable[..., Awaitable[Pair]]]:
    """Starts replicas a and b (`cluster` settings as keywords) and waits until they see each
    other; stops them afterwards."""
    started: list[Membership] = []

    async def start(**cluster: Any) -> Pair:
        a, b = Node("a"), Node("b")
        ma = Membership(settings(prefix, **cluster), "a", a.snapshot)
        mb = Membership(settings(prefix, **cluster), "b", b.snapshot)
        for membership in (ma, mb):
            await membership.start()
            started.append(membership)
        await until(lambda: [p.id for p in ma.peers()] == ["b"] and [p.id for p in mb.peers()] == ["a"])
        return a, ma, b, mb

    yield start
    for membership in started:
        await membership.stop()


# A heartbeat far longer than any wait below: only the publish on change (or a leave) can
# explain what the other replica sees.
SLOW_HEARTBEAT = {"heartbeat_seconds": 30, "ttl_seconds": 60}


async def record_exists(prefix: str, rid: str) -> bool:
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    try:
        return bool(await client.exists(f"{prefix}cluster:replica:{rid}"))
    finally:
        await client.aclose()


async def test_a_model_changing_state_is_published_at_once(pair: Callable[..., Awaitable[Pair]]) -> None:
    a, _, _, mb = await pair(**SLOW_HEARTBEAT)
    a.models = (ModelPresence("m", "loading"),)
    await until(lambda: (p := mb.peers()[0].model("m")) is not None and p.state == "loading")
    view = await mb.view()
    assert view["enabled"] and view["self"] == "b"
    assert [(r["id"], r["self"]) for r in view["replicas"]] == [("a", False), ("b", True)]
    assert view["replicas"][0]["models"][0]["name"] == "m"


async def test_a_replica_that_stops_leaves_at_once(pair: Callable[..., Awaitable[Pair]], prefix: str) -> None:
    _, ma, _, mb = await pair(**SLOW_HEARTBEAT)
    await mb.stop()
    assert not await record_exists(prefix, "b")  # deleted, not left to expire (TTL 60 s)
    assert [r["id"] for r in (await ma.view())["replicas"]] == ["a"]


async def test_a_silent_replica_disappears_when_its_record_expires(
    pair: Callable[..., Awaitable[Pair]], prefix: str
) -> None:
    _, ma, _, mb = await pair()
    assert mb._task is not None
    mb._task.cancel()  # b stops heartbeating without leaving: as if SIGKILLed
    assert await record_exists(prefix, "b")  # still there: it goes by its TTL (0.6 s here)
    await until(lambda: ma.peers() == [])
    assert not await record_exists(prefix, "b")
    mb._task = None


async def test_a_peer_marked_down_is_skipped_until_marked_up(pair: Callable[..., Awaitable[Pair]]) -> None:
    _, ma, _, _ = await pair()
    ma.mark_down("b")
    assert ma.peers() == []
    ma.mark_up("b")
    assert [p.id for p in ma.peers()] == ["b"]


def test_routing_refuses_settings_that_cannot_work() -> None:
    on = {"advertise_url": "http://10.0.0.1:8000"}
    with pytest.raises(ConfigurationError, match=r"jobs\.backend"):
        check_cluster_settings(Settings(cluster=on), auth_on=False)  # type: ignore[arg-type]
    redis_jobs = {"backend": "redis"}
    with pytest.raises(ConfigurationError, match=r"cluster\.secret"):
        check_cluster_settings(Settings(cluster=on, jobs=redis_jobs), auth_on=True)  # type: ignore[arg-type]
    check_cluster_settings(Settings(cluster={**on, "secret": "x" * 32}, jobs=redis_jobs), auth_on=True)  # type: ignore[arg-type]
    check_cluster_settings(Settings(), auth_on=True)  # off: nothing to check
    assert (
        Settings(cluster={"advertise_url": "https://[fd00::5]:8443/"}).cluster.advertise_url
        == "https://[fd00::5]:8443"
    )  # type: ignore[arg-type]
    for bad in (
        {"advertise_url": "10.0.0.1:8000"},
        {"advertise_url": "http://10.0.0.1:8000/api"},
        {"advertise_url": "http://fe80::1:8000"},  # IPv6 without brackets
        {"advertise_url": "http://10.0.0.1"},  # no port
        {"advertise_url": "ftp://10.0.0.1:21"},
        {"advertise_url": "http://user@10.0.0.1:8000"},
        {"secret": "short"},
        {"heartbeat_seconds": 2, "ttl_seconds": 3},
        {"replica_id": "a b"},
    ):
        with pytest.raises(ValueError, match="cluster"):
            Settings(cluster=bad)  # type: ignore[arg-type]
