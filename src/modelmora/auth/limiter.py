"""Per-key rate and concurrency limits, checked by each door right after authentication.

- `auth.rate_limit` (the `limits` notation, e.g. "100/second" or "10/second;2000/hour"):
  a moving window per key: at most N calls in any period of that length, so a burst at a
  window's edge cannot double the rate. Kept in this process (per replica), or in Redis
  (cluster-wide) when `jobs.backend` is redis, on `jobs.redis_url`. If Redis cannot be
  reached the replica falls back to its own in-memory windows (a warning is logged), so an
  outage of the limiter's store limits per replica instead of refusing or opening.
- `auth.max_concurrent_per_key`: calls of one key in progress at once on this replica (a
  count in this process: the slot must be released when the call ends, which a crashed
  replica could not do in a shared store).

A refusal is RATE_LIMITED (429, `Retry-After`): for the rate, the seconds until the oldest
call in the window leaves it; for concurrency, one second. Only authenticated callers are
limited: with auth off every call is anonymous and `build_limiter` builds nothing.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from modelmora.auth.keys import ANONYMOUS, Principal
from modelmora.errors import ErrorCode, ModelMoraError

if TYPE_CHECKING:
    from limits import RateLimitItem
    from limits.aio.storage import Storage

    from modelmora.config import Settings

log = logging.getLogger("modelmora.auth")

Release = Callable[[], None]
_WARN_EVERY_SECONDS = 60.0
CONCURRENCY_RETRY_SECONDS = 1.0


def _nothing() -> None:
    return None


class _Slot:
    """A concurrency slot; releasing it twice (a door's error path after its normal one)
    gives it back once."""

    __slots__ = ("_limiter", "_owner")

    def __init__(self, limiter: KeyLimiter, owner: str) -> None:
        self._limiter: KeyLimiter | None = limiter
        self._owner = owner

    def __call__(self) -> None:
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            limiter._leave(self._owner)


class KeyLimiter:
    def __init__(
        self,
        rate_limit: str | None,
        max_concurrent: int | None,
        *,
        storage: Storage | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`storage`: where the windows live (default: this process's memory); `clock`: the
        wall clock the storage's windows are kept in, for Retry-After."""
        from limits import parse_many
        from limits.aio.storage import MemoryStorage
        from limits.aio.strategies import MovingWindowRateLimiter

        self.items: list[RateLimitItem] = parse_many(rate_limit) if rate_limit else []
        self.max_concurrent = max_concurrent
        self._clock = clock
        self._limiter = MovingWindowRateLimiter(storage or MemoryStorage())
        self._fallback = MovingWindowRateLimiter(MemoryStorage()) if storage is not None else None
        self._warned_at = -math.inf
        self.active: dict[str, int] = {}  # calls in progress per owner

    async def admit(self, principal: Principal) -> Release:
        """Let the call through and return what ends its concurrency slot (call it once the
        call is over, response streamed; calling it again does nothing), or raise
        RATE_LIMITED. The anonymous principal (auth off) is never limited."""
        if principal == ANONYMOUS:
            return _nothing
        owner = principal.owner
        release: Release = _nothing
        if self.max_concurrent is not None:
            if self.active.get(owner, 0) >= self.max_concurrent:
                raise ModelMoraError(
                    ErrorCode.RATE_LIMITED,
                    f"this API key already has {self.max_concurrent} calls in progress",
                    {"key": owner, "max_concurrent": self.max_concurrent},
                    retry_after=CONCURRENCY_RETRY_SECONDS,
                )
            # Taken before the rate check awaits, so two calls cannot both see the last slot.
            self.active[owner] = self.active.get(owner, 0) + 1
            release = _Slot(self, owner)
        try:
            if len(self.items) > 1:
                # Several windows: a call refused by one must not spend the others.
                for item in self.items:
                    if not await self._call("test", item, owner):
                        raise await self._refusal(item, owner)
            for item in self.items:
                if not await self._call("hit", item, owner):
                    raise await self._refusal(item, owner)
        except BaseException:
            release()
            raise
        return release

    def _leave(self, owner: str) -> None:
        left = self.active.get(owner, 0) - 1
        if left > 0:
            self.active[owner] = left
        else:
            self.active.pop(owner, None)

    async def _call(self, method: str, item: RateLimitItem, owner: str) -> bool:
        try:
            return bool(await getattr(self._limiter, method)(item, owner))
        except Exception as exc:
            if self._fallback is None:
                raise
            self._storage_down(exc)
            return bool(await getattr(self._fallback, method)(item, owner))

    async def _refusal(self, item: RateLimitItem, owner: str) -> ModelMoraError:
        try:
            stats = await self._limiter.get_window_stats(item, owner)
        except Exception as exc:
            if self._fallback is None:
                raise
            self._storage_down(exc)
            stats = await self._fallback.get_window_stats(item, owner)
        # The oldest call in the window leaves it at reset_time: one slot frees then.
        wait = max(1, math.ceil(stats.reset_time - self._clock()))
        return ModelMoraError(
            ErrorCode.RATE_LIMITED,
            f"this API key is over its rate limit ({item}); retry in {wait} s",
            {"key": owner, "limit": str(item)},
            retry_after=float(wait),
        )

    def _storage_down(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_SECONDS:
            self._warned_at = now
            log.warning(
                "the rate limit store is unreachable: limiting per replica meanwhile",
                extra={"error": f"{type(exc).__name__}: {exc}"},
            )


def _async_uri(url: str) -> str:
    """The `limits` spelling of a Redis URL (its async storages want an `async+` scheme)."""
    if url.startswith("unix://"):
        return "async+redis+unix://" + url.removeprefix("unix://")
    return "async+" + url


def build_limiter(settings: Settings, auth_on: bool) -> KeyLimiter | None:
    """The limiter the doors call after authenticating; None when auth is off or no limit
    is set (then the doors skip the call)."""
    cfg = settings.auth
    if not auth_on or (cfg.rate_limit is None and cfg.max_concurrent_per_key is None):
        return None
    storage: Any = None
    if cfg.rate_limit is not None and settings.jobs.backend == "redis":
        from limits.aio.storage import RedisStorage

        storage = RedisStorage(
            _async_uri(settings.jobs.redis_url),
            implementation="redispy",
            key_prefix=f"{settings.jobs.redis_prefix}limits",
        )
    return KeyLimiter(cfg.rate_limit, cfg.max_concurrent_per_key, storage=storage)
