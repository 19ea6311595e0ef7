"""Retries: errors the contract marks retryable are retried with exponential backoff and full
jitter, never sooner than the server's Retry-After; all others are raised at once."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from modelmora.client.errors import ApiError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4  # 1: never retry
    initial_backoff: float = 0.2
    max_backoff: float = 10.0
    multiplier: float = 2.0

    def delay(self, error: ApiError, attempt: int) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None when the error is final."""
        if not error.retryable or attempt >= self.max_attempts:
            return None
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        backoff = random.uniform(0, ceiling)
        return max(backoff, error.retry_after or 0.0)

    def _delay_for(self, error: ApiError, attempt: int, idempotent: bool) -> float | None:
        # A call that is not idempotent is retried only when the server said it did nothing
        # (an error with a code); a transport error may have come after the server acted.
        if not idempotent and error.error_code is None:
            return None
        return self.delay(error, attempt)

    def call(self, fn: Callable[[], T], idempotent: bool) -> T:
        """Run `fn`, retrying as this policy says (the sync clients)."""
        attempt = 1
        while True:
            try:
                return fn()
            except ApiError as exc:
                delay = self._delay_for(exc, attempt, idempotent)
                if delay is None:
                    raise
            time.sleep(delay)
            attempt += 1

    async def acall(self, fn: Callable[[], Awaitable[T]], idempotent: bool) -> T:
        """The same for the async clients."""
        attempt = 1
        while True:
            try:
                return await fn()
            except ApiError as exc:
                delay = self._delay_for(exc, attempt, idempotent)
                if delay is None:
                    raise
            await asyncio.sleep(delay)
            attempt += 1


NO_RETRY = RetryPolicy(max_attempts=1)
