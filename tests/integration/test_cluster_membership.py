"""Membership on the real Redis (cluster/membership.py): replicas see each other, a model that
starts loading is published at once, a replica that leaves or goes silent disappears; and
the settings routing refuses to start with."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
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


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "not reached in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_replicas_see_each_other_and_each_others_models(prefix: str) -> None:
    a, b = Node("a"), Node("b")
    ma, mb = Membership(settings(prefix), "a", a.snapshot), Membership(settings(prefix), "b", b.snapshot)
    await ma.start()
    await mb.start()
    try:
        await until(lambda: [p.id for p in ma.peers()] == ["b"] and [p.id for p in mb.peers()] == ["a"])
        # a model that starts loading on a is in b's view well before the next heartbeat
        a.models = (ModelPresence("m", "loading"),)
        await until(lambda: (p := mb.peers()[0].model("m")) is not None and p.state == "loading")
        view = await mb.view()
        assert view["enabled"] and view["self"] == "b"
        assert [(r["id"], r["self"]) for r in view["replicas"]] == [("a", False), ("b", True)]
        assert view["replicas"][0]["models"][0]["name"] == "m"
    finally:
        await mb.stop()
    # a replica that stops says so: gone from the other's view without waiting for its TTL
    await until(lambda: ma.peers() == [], timeout=0.5)
    await ma.stop()


async def test_a_silent_replica_disappears_within_its_ttl(prefix: str) -> None:
    a, b = Node("a"), Node("b")
    ma, mb = Membership(settings(prefix), "a", a.snapshot), Membership(settings(prefix), "b", b.snapshot)
    await ma.start()
    await mb.start()
    try:
        await until(lambda: len(ma.peers()) == 1)
        assert mb._task is not None
        mb._task.cancel()  # b stops heartbeating without leaving: as if SIGKILLed
        waited = await until(lambda: ma.peers() == [], timeout=5)
        assert waited <= 0.6 + 0.5  # its key's TTL, plus a read interval (not a timing claim: a bound)
    finally:
        await ma.stop()
        mb._task = None
        await mb.stop()


async def test_a_peer_marked_down_is_skipped_until_its_record_could_expire(prefix: str) -> None:
    a, b = Node("a"), Node("b")
    ma, mb = Membership(settings(prefix), "a", a.snapshot), Membership(settings(prefix), "b", b.snapshot)
    await ma.start()
    await mb.start()
    try:
        await until(lambda: len(ma.peers()) == 1)
        ma.mark_down("b")
        assert ma.peers() == []
        ma.mark_up("b")
        assert [p.id for p in ma.peers()] == ["b"]
    finally:
        await ma.stop()
        await mb.stop()


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
