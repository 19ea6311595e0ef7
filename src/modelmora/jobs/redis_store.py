"""The job store for several replicas: Redis streams with a consumer group.

Each job is a hash; its id also sits in one stream per model and priority level, read by the
consumer group `workers` in which every replica is a consumer. Streams per model let a replica
leave the jobs of a model whose queue is already full to the others (`room`). Reading an
entry puts it in the replica's pending list; the replica renews it (XCLAIM, which resets its
idle time) while the job runs and acknowledges it when the job ends. A replica that dies
stops renewing, and once its entries have been idle longer than `jobs.lease_seconds` any
other replica takes them over with XAUTOCLAIM and runs the jobs again (at-least-once;
`attempts` counts the runs). The housekeeping pass removes the consumers of replicas that
ended from the group.

Every status change is one Lua script, so two replicas can never both move a job (for
example, finish it and cancel it) and the per-status indexes stay in step with the hashes.

A job's owner (who may read it, see jobs/service.py) is the hash field `created_by` (the
field `owner` is older and names the replica running the job); each owner's jobs are also
indexed in `owner:<owner>`, and an idempotency key is `idem:<owner>:<key>`, so equal keys of
two callers are unrelated. Jobs stored before owners existed have no `created_by`: they were
made with auth off and read as the anonymous caller's.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from modelmora.jobs.store import (
    ANONYMOUS_OWNER,
    IDEMPOTENCY_TTL_SECONDS,
    JobRecord,
    JobStatus,
    idempotency_conflict,
    never_started,
    not_found,
    store_full,
)

GROUP = "workers"
_LEVELS = (1, 2, 3, 4)

# Consumers of replicas that are gone: each process run is a new consumer name, so without
# this every restart would leave four consumers per model in the group for good. Only one
# with nothing pending is removed (DELCONSUMER would drop its pending entries, which another
# replica must take over), and the check and the removal are one step. A live replica idle
# that long loses nothing: its next read creates its consumer again.
_FORGET_CONSUMERS = """
local removed = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if info['name'] ~= ARGV[2] and tonumber(info['pending']) == 0
      and tonumber(info['idle']) >= tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    removed = removed + 1
  end
end
return removed
"""
# How long a consumer with nothing pending may stay idle before it counts as gone, in leases.
IDLE_CONSUMER_LEASES = 10

# KEYS: job hash, stream, owner index. ARGV: prefix, job id, created_at, field, value, ...
_CREATE = """
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('ZADD', ARGV[1] .. 'all', ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
redis.call('ZADD', ARGV[1] .. 'status:queued', ARGV[3], ARGV[2])
local entry = redis.call('XADD', KEYS[2], '*', 'job', ARGV[2])
redis.call('HSET', KEYS[1], 'stream', KEYS[2], 'entry', entry)
return entry
"""

# KEYS: job hash. ARGV: prefix, job id, now, owner, stream, entry, takeover ('1': the job may
# be 'processing' on a dead replica). Returns 1 when this replica now runs the job.
_CLAIM = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 0 end
local created = redis.call('HGET', KEYS[1], 'created_at')
if st == 'processing' and ARGV[7] == '1' and redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  redis.call('ZREM', ARGV[1] .. 'status:processing', ARGV[2])
  redis.call('ZADD', ARGV[1] .. 'status:cancelled', created, ARGV[2])
  redis.call('ZADD', ARGV[1] .. 'finished', ARGV[3], ARGV[2])
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'completed_at', ARGV[3])
  return 0
end
if st == 'queued' or (st == 'processing' and ARGV[7] == '1') then
  redis.call('ZREM', ARGV[1] .. 'status:queued', ARGV[2])
  redis.call('ZADD', ARGV[1] .. 'status:processing', created, ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  redis.call('HSET', KEYS[1], 'status', 'processing', 'started_at', ARGV[3], 'owner', ARGV[4],
             'progress', '', 'stream', ARGV[5], 'entry', ARGV[6])
  return 1
end
return 0
"""

# KEYS: job hash. ARGV: prefix, job id, from status, to status, now, response, result_key,
# error, progress. Acknowledges and deletes the job's stream entry.
_FINISH = """
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= ARGV[3] then return 0 end
local created = redis.call('HGET', KEYS[1], 'created_at')
redis.call('ZREM', ARGV[1] .. 'status:' .. st, ARGV[2])
redis.call('ZADD', ARGV[1] .. 'status:' .. ARGV[4], created, ARGV[2])
redis.call('ZADD', ARGV[1] .. 'finished', ARGV[5], ARGV[2])
redis.call('HSET', KEYS[1], 'status', ARGV[4], 'completed_at', ARGV[5], 'response', ARGV[6],
           'result_key', ARGV[7], 'error', ARGV[8])
if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'progress', ARGV[9]) end
local stream = redis.call('HGET', KEYS[1], 'stream')
local entry = redis.call('HGET', KEYS[1], 'entry')
if stream and entry then
  redis.call('XACK', stream, 'workers', entry)
  redis.call('XDEL', stream, entry)
end
return 1
"""

# KEYS: job hash. ARGV: progress. Only while the job runs: a late write after it finished
# must not replace its final progress.
_PROGRESS = """
if redis.call('HGET', KEYS[1], 'status') == 'processing' then
  redis.call('HSET', KEYS[1], 'progress', ARGV[1])
end
"""

# KEYS: job hash. ARGV: prefix, job id, undo (1: the attempt does not count). Back to the
# tail of its priority's stream.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'status') ~= 'processing' then return 0 end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return 0 end
local created = redis.call('HGET', KEYS[1], 'created_at')
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts')) - tonumber(ARGV[3])
if attempts < 0 then attempts = 0 end
redis.call('ZREM', ARGV[1] .. 'status:processing', ARGV[2])
redis.call('ZADD', ARGV[1] .. 'status:queued', created, ARGV[2])
local stream = redis.call('HGET', KEYS[1], 'stream')
local entry = redis.call('HGET', KEYS[1], 'entry')
redis.call('XACK', stream, 'workers', entry)
redis.call('XDEL', stream, entry)
local fresh = redis.call('XADD', stream, '*', 'job', ARGV[2])
redis.call('HSET', KEYS[1], 'status', 'queued', 'attempts', attempts, 'started_at', '', 'progress', '',
           'entry', fresh, 'owner', '')
return 1
"""

# KEYS: job hash. ARGV: prefix, job id, now. A queued job is cancelled here; a processing one
# is flagged for its replica. Returns the status afterwards.
_CANCEL = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return false end
if st == 'queued' then
  local created = redis.call('HGET', KEYS[1], 'created_at')
  redis.call('ZREM', ARGV[1] .. 'status:queued', ARGV[2])
  redis.call('ZADD', ARGV[1] .. 'status:cancelled', created, ARGV[2])
  redis.call('ZADD', ARGV[1] .. 'finished', ARGV[3], ARGV[2])
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'completed_at', ARGV[3])
  redis.call('XDEL', redis.call('HGET', KEYS[1], 'stream'), redis.call('HGET', KEYS[1], 'entry'))
  return 'cancelled'
end
if st == 'processing' then redis.call('HSET', KEYS[1], 'cancel_requested', '1') end
return st
"""


# KEYS: reporter key. ARGV: this consumer, ttl ms. Keep the role, or take it when free.
_ELECT = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not current then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""


def _s(value: bytes | None) -> str | None:
    return value.decode() if value else None


def _f(value: bytes | None) -> float | None:
    return float(value) if value else None


def _to_job(job_id: str, h: dict[bytes, bytes]) -> JobRecord:
    error = h.get(b"error")
    return JobRecord(
        job_id=job_id,
        model=h[b"model"].decode(),
        request=orjson.loads(h[b"request"]),
        priority=int(h[b"priority"]),
        created_at=float(h[b"created_at"]),
        status=JobStatus(h[b"status"].decode()),
        progress=_f(h.get(b"progress")),
        started_at=_f(h.get(b"started_at")),
        completed_at=_f(h.get(b"completed_at")),
        attempts=int(h.get(b"attempts") or 0),
        error=orjson.loads(error) if error else None,
        response=h.get(b"response") or None,
        result_key=_s(h.get(b"result_key")),
        idempotency_key=_s(h.get(b"idempotency_key")),
        request_hash=(h.get(b"request_hash") or b"").decode(),
        trace_id=_s(h.get(b"trace_id")),
        cancel_requested=h.get(b"cancel_requested") == b"1",
        owner=_s(h.get(b"created_by")) or ANONYMOUS_OWNER,
    )


class RedisJobStore:
    def __init__(self, url: str, lease_seconds: float, prefix: str = "modelmora:") -> None:
        import redis.asyncio as aioredis

        self.url = url
        self.lease_ms = int(lease_seconds * 1000)
        self.prefix = prefix
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._redis: Any = aioredis.from_url(url, decode_responses=False)
        self._create = self._redis.register_script(_CREATE)
        self._claim = self._redis.register_script(_CLAIM)
        self._finish = self._redis.register_script(_FINISH)
        self._release = self._redis.register_script(_RELEASE)
        self._cancel = self._redis.register_script(_CANCEL)
        self._progress = self._redis.register_script(_PROGRESS)
        self._forget_consumers = self._redis.register_script(_FORGET_CONSUMERS)
        self._elect = self._redis.register_script(_ELECT)
        self._advertised: set[str] = set()  # models this replica said it has loaded while idle
        self._entries: dict[str, tuple[str, str]] = {}  # running job -> (stream, entry id)
        self._ready_models: set[str] = set()
        self._turn = 0  # rotates the model a claim reads first

    def _job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def _owned(self, owner: str) -> str:
        return f"{self.prefix}owner:{owner}"

    def _stream(self, model: str, priority: int) -> str:
        return f"{self.prefix}stream:{model}:{priority}"

    async def _ensure_streams(self, model: str) -> None:
        """Every model gets its streams and their group once, recorded in `models`."""
        import redis.exceptions

        if model in self._ready_models:
            return
        for level in _LEVELS:
            try:
                await self._redis.xgroup_create(self._stream(model, level), GROUP, id="0", mkstream=True)
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        await self._redis.sadd(f"{self.prefix}models", model)
        self._ready_models.add(model)

    async def _models(self) -> list[str]:
        return sorted(m.decode() for m in await self._redis.smembers(f"{self.prefix}models"))

    async def open(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        # Leave this consumer's pending entries: whatever it did not finish is taken over.
        # Give up the idle mark and the reporter role at once (others would wait out the ttl).
        with contextlib.suppress(Exception):
            await self.set_idle(False, 0.0, [])
            if await self._redis.get(f"{self.prefix}reporter") == self.consumer.encode():
                await self._redis.delete(f"{self.prefix}reporter")
        await self._redis.aclose()

    async def create(self, job: JobRecord, max_pending: int) -> tuple[JobRecord, bool]:
        key = job.idempotency_key
        # Owners (key ids, "anonymous", "bootstrap") have no ':', so this never collides.
        idem = f"{self.prefix}idem:{job.owner}:{key}" if key else None
        if idem is not None and key is not None:
            taken = await self._redis.set(idem, job.job_id, nx=True, ex=IDEMPOTENCY_TTL_SECONDS)
            if not taken:
                other = (await self._redis.get(idem) or b"").decode()
                found = await self.get(other) if other else None
                if found is not None:
                    if found.request_hash != job.request_hash:
                        raise idempotency_conflict(key, found.job_id)
                    return found, False
                await self._redis.set(idem, job.job_id, ex=IDEMPOTENCY_TTL_SECONDS)  # its job expired
        await self._ensure_streams(job.model)
        pending = int(await self._redis.zcard(f"{self.prefix}status:queued"))
        if pending >= max_pending:
            if idem is not None:
                await self._redis.delete(idem)
            raise store_full(pending, max_pending)
        fields: list[Any] = [
            "model", job.model,
            "request", orjson.dumps(job.request),
            "priority", job.priority,
            "status", JobStatus.QUEUED.value,
            "created_at", repr(job.created_at),
            "attempts", 0,
            "request_hash", job.request_hash,
            "idempotency_key", key or "",
            "trace_id", job.trace_id or "",
            "cancel_requested", "0",
            "created_by", job.owner,
        ]  # fmt: skip
        await self._create(
            keys=[self._job(job.job_id), self._stream(job.model, job.priority), self._owned(job.owner)],
            args=[self.prefix, job.job_id, repr(job.created_at), *fields],
        )
        return job, True

    async def get(self, job_id: str) -> JobRecord | None:
        h = await self._redis.hgetall(self._job(job_id))
        return _to_job(job_id, h) if h else None

    async def list_jobs(
        self,
        status: JobStatus | None,
        model: str | None,
        page: int,
        page_size: int,
        owner: str | None = None,
    ) -> tuple[list[JobRecord], int]:
        if owner is not None:
            index = self._owned(owner)
            if status is None and model is None:
                return await self._page(index, page, page_size)
            return await self._filtered(index, status, model, page, page_size)
        index = f"{self.prefix}status:{status.value}" if status else f"{self.prefix}all"
        if model is None:
            return await self._page(index, page, page_size)
        return await self._filtered(index, None, model, page, page_size)

    async def _page(self, index: str, page: int, page_size: int) -> tuple[list[JobRecord], int]:
        total = int(await self._redis.zcard(index))
        start = (page - 1) * page_size
        ids = [i.decode() for i in await self._redis.zrevrange(index, start, start + page_size - 1)]
        jobs = [j for j in [await self.get(i) for i in ids] if j is not None]
        return jobs, total

    async def _filtered(
        self, index: str, status: JobStatus | None, model: str | None, page: int, page_size: int
    ) -> tuple[list[JobRecord], int]:
        """Filter the index (bounded by max_pending plus the jobs kept for their TTL)."""
        matched: list[JobRecord] = []
        async for raw, _score in self._redis.zscan_iter(index):
            job = await self.get(raw.decode())
            if job is None or (model is not None and job.model != model):
                continue
            if status is None or job.status is status:
                matched.append(job)
        matched.sort(key=lambda j: (-j.created_at, j.job_id))
        start = (page - 1) * page_size
        return matched[start : start + page_size], len(matched)

    async def _take(
        self, stream: str, entry: str, job_id: str, now: float, takeover: bool
    ) -> JobRecord | None:
        ok = await self._claim(
            keys=[self._job(job_id)],
            args=[self.prefix, job_id, repr(now), self.consumer, stream, entry, "1" if takeover else "0"],
        )
        if not ok:  # cancelled, finished or gone: the entry has nothing left to do
            await self._redis.xack(stream, GROUP, entry)
            await self._redis.xdel(stream, entry)
            return None
        self._entries[job_id] = (stream, entry)
        return await self.get(job_id)

    async def claim(
        self, limit: int, room: Mapping[str, int], default_room: int, now: float
    ) -> list[JobRecord]:
        """Jobs of dead replicas first (their entries idle past the lease), then new ones by
        priority, then age within a model. A job's age across models is not compared: within
        a priority level the models' streams are read in turn, starting one model further at
        each claim, so that no model waits behind the others' backlogs for long."""
        claimed: list[JobRecord] = []
        left = {m: room.get(m, default_room) for m in await self._models()}
        models = [m for m, n in left.items() if n > 0]
        if models:
            start = self._turn % len(models)
            models = models[start:] + models[:start]
        self._turn += 1

        def want(model: str) -> int:
            return min(limit - len(claimed), left[model])

        for model in models:
            for level in _LEVELS:
                if want(model) <= 0:
                    break
                stream = self._stream(model, level)
                _next, entries, *_ = await self._redis.xautoclaim(
                    stream, GROUP, self.consumer, self.lease_ms, start_id="0-0", count=want(model)
                )
                for entry_id, fields in entries:
                    if not fields:  # deleted while pending
                        await self._redis.xack(stream, GROUP, entry_id)
                        continue
                    job_id = fields[b"job"].decode()
                    job = await self._take(stream, entry_id.decode(), job_id, now, takeover=True)
                    if job is not None:
                        claimed.append(job)
                        left[model] -= 1
        for level, model in ((lv, m) for lv in _LEVELS for m in models):
            if len(claimed) >= limit:
                break
            if want(model) <= 0:
                continue
            stream = self._stream(model, level)
            read = await self._redis.xreadgroup(GROUP, self.consumer, {stream: ">"}, count=want(model))
            for _stream, entries in read or []:
                for entry_id, fields in entries:
                    job_id = fields[b"job"].decode()
                    job = await self._take(stream, entry_id.decode(), job_id, now, takeover=False)
                    if job is not None:
                        claimed.append(job)
                        left[model] -= 1
        return claimed

    # -- presence (fair claiming, one reporter of the cluster-wide figures) ----------------------

    async def set_idle(self, idle: bool, now: float, loaded: list[str]) -> None:
        """Idle replicas are members of `idle`, and of `idle:<model>` for each model they have
        loaded, scored by when they last said so."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for model in self._advertised - set(loaded if idle else []):
                pipe.zrem(f"{self.prefix}idle:{model}", self.consumer)
            if idle:
                pipe.zadd(f"{self.prefix}idle", {self.consumer: now})
                for model in loaded:
                    pipe.zadd(f"{self.prefix}idle:{model}", {self.consumer: now})
            else:
                pipe.zrem(f"{self.prefix}idle", self.consumer)
            await pipe.execute()
        self._advertised = set(loaded) if idle else set()

    async def idle_elsewhere(self, now: float, within: float, model: str | None) -> int:
        key = f"{self.prefix}idle" if model is None else f"{self.prefix}idle:{model}"
        await self._redis.zremrangebyscore(key, "-inf", now - 10 * within)  # replicas long gone
        members = await self._redis.zrangebyscore(key, now - within, "+inf")
        return sum(1 for m in members if m.decode() != self.consumer)

    async def elect_reporter(self, ttl: float) -> bool:
        taken = await self._elect(keys=[f"{self.prefix}reporter"], args=[self.consumer, int(ttl * 1000)])
        return bool(taken)

    async def heartbeat(self, job_ids: list[str], now: float) -> None:
        by_stream: dict[str, list[str]] = {}
        for job_id in job_ids:
            where = self._entries.get(job_id)
            if where is not None:
                by_stream.setdefault(where[0], []).append(where[1])
        for stream, entries in by_stream.items():
            # Claiming our own entries with min-idle 0 resets their idle time: the lease.
            await self._redis.xclaim(stream, GROUP, self.consumer, 0, entries, justid=True)

    async def set_progress(self, job_id: str, progress: float) -> None:
        await self._progress(keys=[self._job(job_id)], args=[repr(progress)])

    async def finish(
        self,
        job_id: str,
        status: JobStatus,
        now: float,
        *,
        response: bytes | None = None,
        result_key: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> bool:
        done = await self._finish(
            keys=[self._job(job_id)],
            args=[
                self.prefix,
                job_id,
                JobStatus.PROCESSING.value,
                status.value,
                repr(now),
                response or b"",
                result_key or "",
                orjson.dumps(error) if error is not None else b"",
                "1.0" if status is JobStatus.COMPLETED else "",
            ],
        )
        self._entries.pop(job_id, None)
        return bool(done)

    async def release(self, job_id: str, count_attempt: bool) -> None:
        undo = "0" if count_attempt else "1"
        await self._release(keys=[self._job(job_id)], args=[self.prefix, job_id, undo])
        self._entries.pop(job_id, None)

    async def request_cancel(self, job_id: str, now: float) -> JobRecord:
        status = await self._cancel(keys=[self._job(job_id)], args=[self.prefix, job_id, repr(now)])
        job = await self.get(job_id) if status else None
        if job is None:
            raise not_found(job_id)
        return job

    async def cancel_requested(self, job_ids: list[str]) -> list[str]:
        if not job_ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(self._job(job_id), "cancel_requested")
            flags = await pipe.execute()
        return [j for j, flag in zip(job_ids, flags, strict=True) if flag == b"1"]

    async def expire(self, now: float, queued_ttl: float, result_ttl: float) -> list[str]:
        await self.forget_idle_consumers()
        error = never_started(queued_ttl)
        stale = await self._redis.zrangebyscore(f"{self.prefix}status:queued", "-inf", now - queued_ttl)
        for raw in stale:
            job_id = raw.decode()
            await self._finish(
                keys=[self._job(job_id)],
                args=[self.prefix, job_id, "queued", "failed", repr(now), b"", "", error, ""],
            )
        old = await self._redis.zrangebyscore(f"{self.prefix}finished", "-inf", now - result_ttl)
        keys: list[str] = []
        for raw in old:
            job_id = raw.decode()
            h = await self._redis.hmget(self._job(job_id), ["result_key", "created_by"])
            if h[0]:
                keys.append(h[0].decode())
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._job(job_id))
                pipe.zrem(f"{self.prefix}all", job_id)
                pipe.zrem(self._owned(_s(h[1]) or ANONYMOUS_OWNER), job_id)
                pipe.zrem(f"{self.prefix}finished", job_id)
                for s in JobStatus:
                    pipe.zrem(f"{self.prefix}status:{s.value}", job_id)
                await pipe.execute()
        return keys

    async def forget_idle_consumers(self) -> int:
        """Remove the group's consumers with nothing pending, idle for IDLE_CONSUMER_LEASES
        leases (replicas that ended); returns how many."""
        idle_ms = IDLE_CONSUMER_LEASES * self.lease_ms
        removed = 0
        for model in await self._models():
            for level in _LEVELS:
                stream = self._stream(model, level)
                removed += int(
                    await self._forget_consumers(keys=[stream], args=[GROUP, self.consumer, idle_ms])
                )
        return removed

    async def counts(self) -> dict[str, int]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for s in JobStatus:
                pipe.zcard(f"{self.prefix}status:{s.value}")
            found = await pipe.execute()
        return {s.value: int(n) for s, n in zip(JobStatus, found, strict=True)}

    async def reset(self) -> None:
        """Delete every key of this prefix (the contract tests use one prefix each)."""
        async for key in self._redis.scan_iter(match=f"{self.prefix}*"):
            await self._redis.delete(key)
