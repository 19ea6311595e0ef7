"""One contract, two stores: the SQLite file and the machine's real Redis."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.jobs.store import (
    IDEMPOTENCY_TTL_SECONDS,
    JobRecord,
    JobStatus,
    JobStore,
    new_job_id,
    request_hash,
)
from tests.conftest import service_client, service_unavailable

REDIS_URL = os.environ.get("MODELMORA_TEST_REDIS", "redis://127.0.0.1:6379/0")

StoreFactory = Callable[[], Awaitable[JobStore]]


def redis_or_skip() -> None:
    """Skips without Redis on a bare laptop; fails in CI (MODELMORA_REQUIRE_SERVICES)."""
    redis = service_client("redis")
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.exceptions.ConnectionError as exc:  # CI starts Redis; a bare laptop may not
        service_unavailable(f"Redis not reachable at {REDIS_URL}: {exc}")


@pytest.fixture(params=["sqlite", "redis"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    """Opens stores over the same backing data (two handles = two replicas, or a restart)."""
    opened: list[JobStore] = []
    prefix = f"mmtest-{uuid.uuid4().hex[:8]}:"

    async def factory() -> JobStore:
        store: JobStore
        if request.param == "sqlite":
            from modelmora.jobs.sqlite_store import SqliteJobStore

            store = SqliteJobStore(tmp_path / "jobs.db")
        else:
            redis_or_skip()
            from modelmora.jobs.redis_store import RedisJobStore

            store = RedisJobStore(REDIS_URL, lease_seconds=0.3, prefix=prefix)
        await store.open()
        opened.append(store)
        return store

    yield factory
    if request.param == "redis" and opened:
        await opened[0].reset()  # type: ignore[attr-defined]
    for store in opened:
        await store.close()


def job(
    model: str = "m",
    priority: int = 3,
    key: str | None = None,
    text: str = "x",
    at: float = 0.0,
    owner: str = "anonymous",
) -> JobRecord:
    request = {"input_data": {"text": text}}
    return JobRecord(
        job_id=new_job_id(),
        model=model,
        request=request,
        priority=priority,
        created_at=at or time.time(),
        idempotency_key=key,
        request_hash=request_hash(model, request),
        owner=owner,
    )


async def test_idempotency_keys_expire_after_their_ttl(
    make_store: StoreFactory, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past IDEMPOTENCY_TTL_SECONDS a key names a new job: a store that kept keys forever
    would answer a new submission with a job from days ago."""
    store = await make_store()
    if request.node.callspec.params["make_store"] == "sqlite":
        # SQLite compares the records' creation times: time is injected through them.
        t = time.time()
        first, _ = await store.create(job(key="k", at=t), 100)
        same, created = await store.create(job(key="k", at=t + IDEMPOTENCY_TTL_SECONDS - 1), 100)
        assert not created and same.job_id == first.job_id
        later, created = await store.create(job(key="k", at=t + IDEMPOTENCY_TTL_SECONDS + 1), 100)
        assert created and later.job_id != first.job_id
        again, created = await store.create(job(key="k", at=t + IDEMPOTENCY_TTL_SECONDS + 2), 100)
        assert not created and again.job_id == later.job_id  # the key now names the new job
        return
    # Redis expires the key itself: the key carries the TTL, and with a TTL of one second
    # (the wait below is that expiry, the behaviour under test) the key names a new job.
    from modelmora.jobs import redis_store

    first, _ = await store.create(job(key="k"), 100)
    client = service_client("redis.asyncio").Redis.from_url(REDIS_URL)
    try:
        ttl = await client.ttl(f"{store.prefix}idem:anonymous:k")  # type: ignore[attr-defined]
    finally:
        await client.aclose()
    assert IDEMPOTENCY_TTL_SECONDS - 60 < ttl <= IDEMPOTENCY_TTL_SECONDS
    monkeypatch.setattr(redis_store, "IDEMPOTENCY_TTL_SECONDS", 1)
    short, created = await store.create(job(key="short"), 100)
    assert created
    deadline = time.monotonic() + 15
    while True:
        renewed, created = await store.create(job(key="short"), 100)
        if created:
            break
        assert renewed.job_id == short.job_id
        assert time.monotonic() < deadline, "the idempotency key never expired"
        await asyncio.sleep(0.05)
    assert renewed.job_id != short.job_id


async def test_create_get_and_status_body(make_store: StoreFactory) -> None:
    store = await make_store()
    j = job(text="hello")
    stored, created = await store.create(j, 100)
    assert created and stored.job_id == j.job_id
    got = await store.get(j.job_id)
    assert got is not None
    assert got.request == {"input_data": {"text": "hello"}}
    assert got.status is JobStatus.QUEUED and got.attempts == 0
    body = got.to_status()
    assert body["status"] == "queued" and body["created_at"].endswith("+00:00") and body["started_at"] is None
    assert await store.get(new_job_id()) is None


async def test_idempotency_key_returns_the_same_job_or_conflicts(make_store: StoreFactory) -> None:
    store = await make_store()
    first, created = await store.create(job(key="k1"), 100)
    again, created_again = await store.create(job(key="k1"), 100)
    assert created and not created_again
    assert again.job_id == first.job_id
    with pytest.raises(ModelMoraError) as err:
        await store.create(job(key="k1", text="another body"), 100)
    assert err.value.code is ErrorCode.IDEMPOTENCY_CONFLICT
    assert err.value.details["job_id"] == first.job_id
    assert (await store.counts())["queued"] == 1


async def test_idempotency_keys_are_per_owner(make_store: StoreFactory) -> None:
    """Two callers' equal keys name two jobs: neither replays, conflicts with or learns the
    other's job (the 409 of a shared key space leaked the other caller's job id)."""
    store = await make_store()
    mine, created = await store.create(job(key="order-1", owner="aaaaaaaaaaaa"), 100)
    assert created and mine.owner == "aaaaaaaaaaaa"
    theirs, created = await store.create(job(key="order-1", text="other body", owner="bbbbbbbbbbbb"), 100)
    assert created and theirs.job_id != mine.job_id
    replay, created = await store.create(job(key="order-1", owner="aaaaaaaaaaaa"), 100)
    assert not created and replay.job_id == mine.job_id
    with pytest.raises(ModelMoraError) as err:
        await store.create(job(key="order-1", text="changed", owner="bbbbbbbbbbbb"), 100)
    assert err.value.details["job_id"] == theirs.job_id  # its own job, never the other's
    got = await store.get(theirs.job_id)
    assert got is not None and got.owner == "bbbbbbbbbbbb"


async def test_list_by_owner(make_store: StoreFactory) -> None:
    store = await make_store()
    t = time.time()
    made = [job(model="a" if i % 2 else "b", at=t + i, owner="k1" if i < 4 else "k2") for i in range(7)]
    for j in made:
        await store.create(j, 100)
    of_k1, total = await store.list_jobs(None, None, 1, 2, owner="k1")
    assert total == 4 and [j.job_id for j in of_k1] == [made[3].job_id, made[2].job_id]
    of_k2_a, total = await store.list_jobs(None, "a", 1, 10, owner="k2")
    assert total == 1 and [j.job_id for j in of_k2_a] == [made[5].job_id]
    await store.claim(7, {}, 100, t + 20)
    running, total = await store.list_jobs(JobStatus.PROCESSING, None, 1, 10, owner="k2")
    assert total == 3 and {j.owner for j in running} == {"k2"}
    assert await store.list_jobs(JobStatus.QUEUED, None, 1, 10, owner="k2") == ([], 0)
    assert await store.list_jobs(None, None, 1, 10, owner="nobody") == ([], 0)
    everyone, total = await store.list_jobs(None, None, 1, 10)
    assert total == 7 and {j.owner for j in everyone} == {"k1", "k2"}
    # An expired job leaves its owner's list too.
    for j in made:
        await store.finish(j.job_id, JobStatus.COMPLETED, t + 21, response=b"{}")
    await store.expire(t + 100, queued_ttl=1000, result_ttl=10)
    assert await store.list_jobs(None, None, 1, 10, owner="k1") == ([], 0)


async def test_max_pending_refuses_beyond_the_limit(make_store: StoreFactory) -> None:
    store = await make_store()
    for _ in range(3):
        await store.create(job(), 3)
    with pytest.raises(ModelMoraError) as err:
        await store.create(job(), 3)
    assert err.value.code is ErrorCode.QUEUE_FULL and err.value.retry_after
    # Room again once one is taken: the bound is on waiting jobs.
    assert len(await store.claim(1, {}, 100, time.time())) == 1
    await store.create(job(), 3)


async def test_claim_takes_priority_then_age_and_counts_attempts(make_store: StoreFactory) -> None:
    store = await make_store()
    t = time.time()
    low = job(priority=4, at=t)
    normal_old = job(priority=3, at=t + 1)
    normal_new = job(priority=3, at=t + 2)
    critical = job(priority=1, at=t + 3)
    for j in (low, normal_old, normal_new, critical):  # jobs arrive in time order
        await store.create(j, 100)
    first = await store.claim(2, {}, 100, t + 10)
    assert [j.job_id for j in first] == [critical.job_id, normal_old.job_id]
    assert all(j.status is JobStatus.PROCESSING and j.attempts == 1 for j in first)
    assert first[0].started_at == pytest.approx(t + 10)
    rest = await store.claim(10, {}, 100, t + 11)
    assert [j.job_id for j in rest] == [normal_new.job_id, low.job_id]
    assert await store.claim(10, {}, 100, t + 12) == []
    assert (await store.counts())["processing"] == 4


async def test_finish_records_the_outcome_once(make_store: StoreFactory) -> None:
    store = await make_store()
    j = job()
    await store.create(j, 100)
    await store.claim(1, {}, 100, time.time())
    await store.set_progress(j.job_id, 0.5)
    assert (await store.get(j.job_id)).progress == 0.5  # type: ignore[union-attr]
    now = time.time()
    body = b'{"result":1}'
    assert await store.finish(j.job_id, JobStatus.COMPLETED, now, response=body, result_key="k.json")
    assert not await store.finish(j.job_id, JobStatus.FAILED, now, error={"error_code": "X"})
    got = await store.get(j.job_id)
    assert got is not None
    assert got.status is JobStatus.COMPLETED and got.response == body and got.result_key == "k.json"
    assert got.progress == 1.0 and got.completed_at == pytest.approx(now)
    assert await store.claim(5, {}, 100, now) == []


async def test_failed_job_keeps_its_error(make_store: StoreFactory) -> None:
    store = await make_store()
    j = job()
    await store.create(j, 100)
    await store.claim(1, {}, 100, time.time())
    error = {"error_code": "INFERENCE_FAILED", "message": "boom", "details": {}, "trace_id": "t"}
    assert await store.finish(j.job_id, JobStatus.FAILED, time.time(), error=error)
    got = await store.get(j.job_id)
    assert got is not None and got.status is JobStatus.FAILED and got.error == error and got.response is None


async def test_release_requeues_with_or_without_counting(make_store: StoreFactory) -> None:
    store = await make_store()
    j = job()
    await store.create(j, 100)
    await store.claim(1, {}, 100, time.time())
    await store.release(j.job_id, count_attempt=False)
    got = await store.get(j.job_id)
    assert got is not None and got.status is JobStatus.QUEUED and got.attempts == 0
    (again,) = await store.claim(1, {}, 100, time.time())
    assert again.attempts == 1
    await store.release(j.job_id, count_attempt=True)
    (third,) = await store.claim(1, {}, 100, time.time())
    assert third.job_id == j.job_id and third.attempts == 2


async def test_cancel_a_queued_job_means_it_never_runs(make_store: StoreFactory) -> None:
    store = await make_store()
    j = job()
    await store.create(j, 100)
    cancelled = await store.request_cancel(j.job_id, time.time())
    assert cancelled.status is JobStatus.CANCELLED and cancelled.completed_at is not None
    assert await store.claim(5, {}, 100, time.time()) == []
    assert (await store.counts())["cancelled"] == 1
    with pytest.raises(ModelMoraError) as err:
        await store.request_cancel(new_job_id(), time.time())
    assert err.value.code is ErrorCode.JOB_NOT_FOUND


async def test_cancel_a_running_job_flags_it_for_its_replica(make_store: StoreFactory) -> None:
    store = await make_store()
    a, b = job(), job()
    await store.create(a, 100)
    await store.create(b, 100)
    await store.claim(2, {}, 100, time.time())
    flagged = await store.request_cancel(a.job_id, time.time())
    assert flagged.status is JobStatus.PROCESSING and flagged.cancel_requested
    assert await store.cancel_requested([a.job_id, b.job_id]) == [a.job_id]
    assert await store.finish(a.job_id, JobStatus.CANCELLED, time.time(), error={"error_code": "CANCELLED"})
    assert (await store.get(a.job_id)).status is JobStatus.CANCELLED  # type: ignore[union-attr]
    # A flagged job is not handed back to the queue.
    await store.release(b.job_id, count_attempt=False)
    await store.request_cancel(b.job_id, time.time())
    assert (await store.get(b.job_id)).status is JobStatus.CANCELLED  # type: ignore[union-attr]


async def test_list_newest_first_with_filters_and_pages(make_store: StoreFactory) -> None:
    store = await make_store()
    t = time.time()
    made = [job(model="a" if i % 2 else "b", at=t + i) for i in range(7)]
    for j in made:
        await store.create(j, 100)
    page1, total = await store.list_jobs(None, None, 1, 3)
    assert total == 7 and [j.job_id for j in page1] == [m.job_id for m in reversed(made)][:3]
    page3, _ = await store.list_jobs(None, None, 3, 3)
    assert [j.job_id for j in page3] == [made[0].job_id]
    of_a, total_a = await store.list_jobs(None, "a", 1, 10)
    assert total_a == 3 and {j.model for j in of_a} == {"a"}
    await store.claim(2, {}, 100, t + 20)
    processing, n = await store.list_jobs(JobStatus.PROCESSING, None, 1, 10)
    assert n == 2 and all(j.status is JobStatus.PROCESSING for j in processing)


async def test_expiry_fails_stale_queued_jobs_and_deletes_old_results(make_store: StoreFactory) -> None:
    store = await make_store()
    t = time.time()
    stale, fresh, done = job(at=t - 100), job(at=t), job(at=t - 50)
    await store.create(done, 100)
    (claimed,) = await store.claim(1, {}, 100, t - 49)
    assert claimed.job_id == done.job_id
    await store.finish(done.job_id, JobStatus.COMPLETED, t - 40, response=b"{}", result_key="r.json")
    await store.create(stale, 100)
    await store.create(fresh, 100)
    keys = await store.expire(t, queued_ttl=60, result_ttl=30)
    assert keys == ["r.json"]
    assert await store.get(done.job_id) is None
    expired = await store.get(stale.job_id)
    assert expired is not None and expired.status is JobStatus.FAILED
    assert expired.error is not None and expired.error["error_code"] == "INFERENCE_TIMEOUT"
    assert (await store.get(fresh.job_id)).status is JobStatus.QUEUED  # type: ignore[union-attr]
    assert [j.job_id for j in await store.claim(5, {}, 100, t)] == [fresh.job_id]


async def test_a_second_handle_takes_over_the_jobs_of_one_that_died(
    make_store: StoreFactory, request: pytest.FixtureRequest
) -> None:
    """SQLite: re-opening the file (a restart) puts processing jobs back in the queue.
    Redis: another replica reclaims entries idle past the lease, but not ones still renewed."""
    first = await make_store()
    a, b = job(), job()
    await first.create(a, 100)
    await first.create(b, 100)
    assert len(await first.claim(2, {}, 100, time.time())) == 2
    second = await make_store()  # for SQLite this open() is the restart
    if request.node.callspec.params["make_store"] == "redis":
        assert await second.claim(5, {}, 100, time.time()) == []  # leases still fresh
        for _ in range(5):  # `first` keeps renewing a, and stops renewing b (its replica "died")
            await asyncio.sleep(0.1)
            await first.heartbeat([a.job_id], time.time())
        taken = await second.claim(5, {}, 100, time.time())
        assert [j.job_id for j in taken] == [b.job_id]
    else:
        taken = await second.claim(5, {}, 100, time.time())
        assert {j.job_id for j in taken} == {a.job_id, b.job_id}
    assert all(j.attempts == 2 for j in taken)
    assert await second.finish(taken[0].job_id, JobStatus.COMPLETED, time.time(), response=b"{}")


async def test_claim_leaves_the_jobs_of_models_without_room(make_store: StoreFactory) -> None:
    store = await make_store()
    busy, idle = job(model="busy", priority=1), job(model="idle", priority=4)
    await store.create(busy, 100)
    await store.create(idle, 100)
    assert [j.job_id for j in await store.claim(5, {"busy": 0}, 100, time.time())] == [idle.job_id]
    assert [j.job_id for j in await store.claim(5, {}, 100, time.time())] == [busy.job_id]


async def test_claim_caps_each_models_share(make_store: StoreFactory) -> None:
    store = await make_store()
    t = time.time()
    a_jobs = [job(model="a", at=t + i) for i in range(4)]
    b_jobs = [job(model="b", at=t + 10 + i) for i in range(4)]
    for j in [*a_jobs, *b_jobs]:
        await store.create(j, 100)
    taken = await store.claim(10, {"a": 1}, 2, t + 20)
    assert sorted(j.job_id for j in taken) == sorted([a_jobs[0].job_id, b_jobs[0].job_id, b_jobs[1].job_id])


async def test_progress_is_kept_only_while_a_job_runs(make_store: StoreFactory) -> None:
    store = await make_store()
    j = job()
    await store.create(j, 100)
    await store.set_progress(j.job_id, 0.3)  # queued: nothing to record
    assert (await store.get(j.job_id)).progress is None  # type: ignore[union-attr]
    await store.claim(1, {}, 100, time.time())
    await store.set_progress(j.job_id, 0.4)
    await store.finish(j.job_id, JobStatus.COMPLETED, time.time(), response=b"{}")
    await store.set_progress(j.job_id, 0.5)  # a late write from the run that just ended
    assert (await store.get(j.job_id)).progress == 1.0  # type: ignore[union-attr]


async def test_redis_forgets_the_consumers_of_replicas_that_ended() -> None:
    """Every process run is a new consumer in the group. The housekeeping pass removes the
    ones idle for ten leases with nothing pending, and never one whose entries another
    replica must still take over."""
    redis_or_skip()
    from modelmora.jobs.redis_store import GROUP, RedisJobStore

    prefix = f"mmtest-{uuid.uuid4().hex[:8]}:"
    ended, died, live = (RedisJobStore(REDIS_URL, lease_seconds=0.02, prefix=prefix) for _ in range(3))
    try:
        for store in (ended, died, live):
            await store.open()
        a, b = job(priority=3), job(priority=3)
        await ended.create(a, 100)
        await ended.create(b, 100)
        (ran,) = await ended.claim(1, {}, 100, time.time())
        await ended.finish(ran.job_id, JobStatus.COMPLETED, time.time(), response=b"{}")
        (left,) = await died.claim(1, {}, 100, time.time())  # pending: its replica "died"
        await asyncio.sleep(0.3)  # ten leases and more

        assert await live.forget_idle_consumers() > 0
        stream = live._stream("m", 3)
        consumers = {c["name"].decode(): c for c in await live._redis.xinfo_consumers(stream, GROUP)}
        assert ended.consumer not in consumers
        assert consumers[died.consumer]["pending"] == 1
        # Its entry is still there to be taken over.
        taken = await live.claim(5, {}, 100, time.time())
        assert [j.job_id for j in taken] == [left.job_id]
    finally:
        await live.reset()
        for store in (ended, died, live):
            await store.close()


async def test_redis_claims_start_at_each_model_in_turn(
    make_store: StoreFactory, request: pytest.FixtureRequest
) -> None:
    """Redis compares ages within a model only; claims that can take one job each still
    reach every model with a backlog in turn, not always the first model by name."""
    if request.node.callspec.params["make_store"] != "redis":
        pytest.skip("SQLite takes the oldest job of any model")
    store = await make_store()
    for model in ("a", "b", "c"):
        for _ in range(3):
            await store.create(job(model=model), 100)
    taken = [(await store.claim(1, {}, 100, time.time()))[0].model for _ in range(6)]
    assert sorted(taken) == ["a", "a", "b", "b", "c", "c"]
