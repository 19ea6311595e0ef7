"""Membership: each replica heartbeats its record into the jobs' Redis and reads the others'.

One key per replica, `<prefix>cluster:replica:<id>`, written with a TTL (`cluster.ttl_seconds`):
a replica that stops heartbeating (killed, partitioned) disappears from every view when its
key expires, with no clock compared across machines. An index set lists the ids to read.

The record is written every `cluster.heartbeat_seconds`, and also at once when a model of
this replica changes state (checked every `_CHECK_SECONDS`): a model that starts loading here
is seen by the other replicas within a fraction of a second, so they send its requests here
instead of loading copies of their own. The others' records are read every `_READ_SECONDS`;
routing reads that snapshot and never waits on Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

import orjson

from modelmora.cluster.view import ReplicaInfo, view_document
from modelmora.config import ConfigurationError, Settings

log = logging.getLogger("modelmora.cluster")

_CHECK_SECONDS = 0.1
_READ_SECONDS = 0.25

Snapshot = Callable[[], ReplicaInfo]
Shape = Callable[[], tuple[Any, ...]]


def _shape_of(info: ReplicaInfo) -> tuple[Any, ...]:
    return (info.ready, info.draining, tuple((m.name, m.state) for m in info.models))


class Membership:
    def __init__(
        self, settings: Settings, replica_id: str, snapshot: Snapshot, shape: Shape | None = None
    ) -> None:
        self.settings = settings
        self.cfg = settings.cluster
        self.id = replica_id
        self.snapshot = snapshot  # this replica's record as of now (built by the composition root)
        # What is compared every _CHECK_SECONDS to publish a change at once (cheap: readiness
        # and each model's state); None: derived from a full snapshot.
        self.shape = shape or (lambda: _shape_of(self.snapshot()))
        prefix = settings.jobs.redis_prefix
        self._key_prefix = f"{prefix}cluster:replica:"
        self._index = f"{prefix}cluster:replicas"
        self._redis: Any = None
        self._task: asyncio.Task[None] | None = None
        self._peers: dict[str, ReplicaInfo] = {}
        self._read_at = 0.0  # monotonic time of the last successful read of the others
        self._published: tuple[Any, ...] | None = None
        self._published_at = 0.0
        # Peers this replica failed to reach, until a monotonic time: skipped by routing even
        # while their record lives on (a SIGKILLed replica's key outlives it by up to the TTL).
        self._down: dict[str, float] = {}
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    async def start(self) -> None:
        if not self.enabled:
            return
        import redis.asyncio as aioredis

        self._redis = aioredis.from_url(self.settings.jobs.redis_url)
        await self._beat(force=True)
        self._task = asyncio.create_task(self._run(), name="cluster-membership")

    async def stop(self) -> None:
        """Leave at once: the others stop forwarding here without waiting for the TTL."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.delete(self._key_prefix + self.id)
                await self._redis.zrem(self._index, self.id)
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(_CHECK_SECONDS)
            try:
                await self._beat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: serve locally meanwhile (peers() ages out)
                if not self._warned:
                    log.warning("cluster heartbeat failed", extra={"error": repr(exc)})
                    self._warned = True

    async def _beat(self, force: bool = False) -> None:
        now = time.monotonic()
        shape = self.shape()
        if force or shape != self._published or now - self._published_at >= self.cfg.heartbeat_seconds:
            await self._publish(self.snapshot())
            self._published, self._published_at = shape, now
            self._warned = False
        if force or now - self._read_at >= _READ_SECONDS:
            await self._read()

    async def _publish(self, info: ReplicaInfo) -> None:
        ttl_ms = max(1, round(self.cfg.ttl_seconds * 1000))
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self._key_prefix + self.id, orjson.dumps(info.to_dict()), px=ttl_ms)
            pipe.zadd(self._index, {self.id: info.heartbeat_at})
            # ids whose key expired long ago: keep the index small
            pipe.zremrangebyscore(self._index, "-inf", info.heartbeat_at - 10 * self.cfg.ttl_seconds)
            await pipe.execute()

    async def _read(self) -> None:
        ids = [
            i.decode() if isinstance(i, bytes) else str(i)
            for i in await self._redis.zrange(self._index, 0, -1)
        ]
        others = [i for i in ids if i != self.id]
        peers: dict[str, ReplicaInfo] = {}
        if others:
            raw = await self._redis.mget([self._key_prefix + i for i in others])
            for rid, value in zip(others, raw, strict=True):
                if value is None:
                    continue  # expired: that replica is gone
                try:
                    peers[rid] = ReplicaInfo.from_dict(orjson.loads(value))
                except Exception:  # a record this version cannot read: skip it, never crash
                    continue
        self._peers = peers
        self._read_at = time.monotonic()

    def peers(self) -> list[ReplicaInfo]:
        """The other live replicas, as last read; none once reads have failed for a TTL (the
        records may describe replicas that are gone by now)."""
        now = time.monotonic()
        if now - self._read_at > self.cfg.ttl_seconds:
            return []
        return [p for p in self._peers.values() if self._down.get(p.id, 0.0) <= now]

    def mark_down(self, replica_id: str) -> None:
        """A peer did not answer: skip it until its record could have expired."""
        self._down[replica_id] = time.monotonic() + self.cfg.ttl_seconds

    def mark_up(self, replica_id: str) -> None:
        self._down.pop(replica_id, None)

    async def view(self) -> dict[str, Any]:
        """Every live replica (this one as of now), for `GET /api/v1/cluster` and its twins."""
        if self.enabled and self._redis is not None:
            with contextlib.suppress(Exception):
                await self._read()
        replicas = [self.snapshot(), *self.peers()] if self.enabled else [self.snapshot()]
        return view_document(self.id, self.enabled, replicas, time.time())


def new_replica_id() -> str:
    """hostname-pid-random: unique across restarts of one pod (a restarted replica is a new
    member; its old record expires)."""
    return f"{socket.gethostname()[:64]}-{os.getpid()}-{secrets.token_hex(3)}"


def check_cluster_settings(settings: Settings, auth_on: bool) -> None:
    """Routing needs the jobs' Redis (membership lives there) and, with authentication on, a
    credential for the hop: without it a forged hop header would carry any caller."""
    cfg = settings.cluster
    if not cfg.enabled:
        return
    if settings.jobs.backend != "redis":
        raise ConfigurationError(
            "cluster.advertise_url is set but jobs.backend is not redis: the replicas find each "
            "other in the jobs' Redis (set jobs.backend: redis and jobs.redis_url)"
        )
    if auth_on and cfg.secret is None:
        raise ConfigurationError(
            "cluster.advertise_url is set with authentication on but cluster.secret is not: set "
            "the same secret (>= 32 characters) on every replica (MODELMORA_CLUSTER__SECRET)"
        )
