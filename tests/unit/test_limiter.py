"""Per-key rate and concurrency limits (auth/limiter.py) on the `limits` in-memory storage,
with the wall clock that storage reads replaced by one the test moves."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import limits.aio.storage.memory
import pytest
from limits.aio.storage import MemoryStorage, RedisStorage

from modelmora.auth.keys import ANONYMOUS, BOOTSTRAP, Principal, Scope
from modelmora.auth.limiter import KeyLimiter, build_limiter
from modelmora.config import Settings
from modelmora.errors import ErrorCode, ModelMoraError

ALICE = Principal("a1a1a1a1a1a1", "alice", frozenset({Scope.INFER}))
BOB = Principal("b2b2b2b2b2b2", "bob", frozenset({Scope.INFER}))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    # The storage module's `time` only: it reads time.time() for its windows.
    monkeypatch.setattr(limits.aio.storage.memory, "time", SimpleNamespace(time=c))
    return c


def limiter(clock: Clock, rate: str | None = None, concurrent: int | None = None) -> KeyLimiter:
    return KeyLimiter(rate, concurrent, storage=MemoryStorage(), clock=clock)


async def refused(lim: KeyLimiter, who: Principal) -> ModelMoraError:
    with pytest.raises(ModelMoraError) as err:
        await lim.admit(who)
    assert err.value.code is ErrorCode.RATE_LIMITED
    return err.value


async def test_a_key_over_its_rate_waits_until_its_oldest_call_leaves_the_window(clock: Clock) -> None:
    lim = limiter(clock, "3/minute")
    for offset in (0.0, 10.0, 20.0):
        clock.now = 1_000_000.0 + offset
        await lim.admit(ALICE)
    clock.now = 1_000_030.0
    error = await refused(lim, ALICE)
    # The call at t=0 leaves the moving window at t=60: 30 s from now.
    assert error.retry_after == 30.0
    assert error.details == {"key": ALICE.key_id, "limit": "3 per 1 minute"}
    clock.now = 1_000_059.0
    assert (await refused(lim, ALICE)).retry_after == 1.0  # never 0: a client must wait
    clock.now = 1_000_060.5
    await lim.admit(ALICE)  # one slot back
    await refused(lim, ALICE)


async def test_keys_are_limited_apart_and_anonymous_never(clock: Clock) -> None:
    lim = limiter(clock, "1/second", concurrent=1)
    await lim.admit(ALICE)
    await refused(lim, ALICE)
    await lim.admit(BOB)  # another key's window
    await lim.admit(BOOTSTRAP)  # the bootstrap key is a key: limited under its own name
    await refused(lim, BOOTSTRAP)
    for _ in range(5):  # auth off: every call is anonymous, and none is counted
        await lim.admit(ANONYMOUS)
    assert ANONYMOUS.owner not in lim.active


async def test_a_call_refused_by_one_window_spends_no_other(clock: Clock) -> None:
    lim = limiter(clock, "1/second;3/minute")
    await lim.admit(ALICE)
    clock.now += 0.5
    error = await refused(lim, ALICE)  # over 1/second
    assert error.details["limit"] == "1 per 1 second"
    clock.now += 0.6
    await lim.admit(ALICE)
    clock.now += 1.1
    await lim.admit(ALICE)  # the refused call did not count against 3/minute
    clock.now += 1.1
    error = await refused(lim, ALICE)
    assert error.details["limit"] == "3 per 1 minute"
    assert error.retry_after == 57.0  # 60 s after the first call, 3.3 s ago (rounded up)


async def test_concurrency_slots_per_key(clock: Clock) -> None:
    lim = limiter(clock, concurrent=2)
    first = await lim.admit(ALICE)
    second = await lim.admit(ALICE)
    error = await refused(lim, ALICE)
    assert error.retry_after == 1.0 and error.details == {"key": ALICE.key_id, "max_concurrent": 2}
    await lim.admit(BOB)
    first()
    first()  # a second release of the same slot gives nothing back
    third = await lim.admit(ALICE)
    await refused(lim, ALICE)
    second()
    third()
    assert ALICE.key_id not in lim.active


async def test_a_rate_refusal_gives_the_concurrency_slot_back(clock: Clock) -> None:
    lim = limiter(clock, "1/second", concurrent=1)
    release = await lim.admit(ALICE)
    release()
    await refused(lim, ALICE)  # the rate refuses...
    assert lim.active == {}  # ...and the slot it took first is free again
    clock.now += 1.5
    await lim.admit(ALICE)


class _Down(MemoryStorage):
    """A shared store that cannot be reached."""

    async def acquire_entry(self, *args: Any, **kwargs: Any) -> bool:
        raise ConnectionError("redis is down")

    async def get_moving_window(self, *args: Any, **kwargs: Any) -> tuple[float, int]:
        raise ConnectionError("redis is down")


async def test_an_unreachable_shared_store_limits_per_replica(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    lim = KeyLimiter("2/minute", None, storage=_Down(), clock=clock)
    with caplog.at_level(logging.WARNING, "modelmora.auth"):
        await lim.admit(ALICE)
        await lim.admit(ALICE)
        error = await refused(lim, ALICE)
    assert error.retry_after == 60.0
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1  # once, not per call


def _settings(**sections: dict[str, Any]) -> Settings:
    return Settings.model_validate(sections)


def test_build_limiter_only_with_auth_on_and_a_limit() -> None:
    limited = _settings(auth={"rate_limit": "5/second", "max_concurrent_per_key": 3})
    assert build_limiter(limited, auth_on=False) is None
    assert build_limiter(_settings(), auth_on=True) is None
    built = build_limiter(limited, auth_on=True)
    assert built is not None and built.max_concurrent == 3
    assert [str(i) for i in built.items] == ["5 per 1 second"]
    assert isinstance(built._limiter.storage, MemoryStorage)
    only_concurrency = build_limiter(_settings(auth={"max_concurrent_per_key": 1}), auth_on=True)
    assert only_concurrency is not None and only_concurrency.items == []


def test_build_limiter_shares_the_rate_in_redis_with_the_redis_job_store() -> None:
    cfg = _settings(
        auth={"rate_limit": "5/second"},
        jobs={"backend": "redis", "redis_url": "redis://127.0.0.1:6379/3", "redis_prefix": "mm1:"},
    )
    built = build_limiter(cfg, auth_on=True)
    assert built is not None
    storage = built._limiter.storage
    assert isinstance(storage, RedisStorage)  # connects at the first call (tested on Redis)
