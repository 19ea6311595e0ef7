"""Retries: errors the contract marks retryable are retried with exponential backoff and full
jitter, never sooner than the server's Retry-After; all others are raised at once."""

from __future__ import annotations

import random
from dataclasses import dataclass

from modelmora.client.errors import ApiError


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


NO_RETRY = RetryPolicy(max_attempts=1)
