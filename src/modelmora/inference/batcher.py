"""Pure batching decisions over a RequestQueue, with the clock passed in."""

from __future__ import annotations

from dataclasses import dataclass

from modelmora.inference.queue import Entry, RequestQueue


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_batch_size: int  # inputs per batch
    max_wait_ms: float = 0.0  # how long an idle worker may hold a batch that is not full


# How many entries of another group the batcher looks past, at most, to fill a batch: enough
# to find compatible work behind a few odd requests, bounded so one decision stays cheap.
MAX_SKIPPED = 64


def next_batch(queue: RequestQueue, now: float, limits: BatchLimits) -> tuple[list[Entry], list[Entry]]:
    """Take the next batch in priority order. Entries whose deadline passed come back in
    `expired` and never reach a worker. An entry larger than the limit goes alone rather than
    never. The head decides the batch's group: entries of another group are looked past (and
    stay queued, in their places), so a seeded request never shares a batch with another seed."""
    batch: list[Entry] = []
    expired: list[Entry] = []
    skipped: list[Entry] = []
    size = 0
    while len(skipped) <= MAX_SKIPPED:
        head = queue.peek(now)
        if head is None:
            break
        if head.deadline <= now:
            queue.pop(now)
            expired.append(head)
            continue
        if batch and head.group != batch[0].group:
            queue.pop(now)
            skipped.append(head)
            continue
        if batch and size + head.size > limits.max_batch_size:
            break
        queue.pop(now)
        batch.append(head)
        size += head.size
        if size >= limits.max_batch_size:
            break
    queue.put_back(skipped)
    return batch, expired


def hold_until(queue: RequestQueue, now: float, limits: BatchLimits) -> float | None:
    """When an idle worker should dispatch what is queued: None for 'now', else the time at
    which the oldest entry has waited `max_wait_ms` (unless the batch is already full)."""
    if limits.max_wait_ms <= 0 or queue.items >= limits.max_batch_size:
        return None
    oldest = queue.oldest_arrival()
    if oldest is None:
        return None
    release = oldest + limits.max_wait_ms / 1000
    return release if release > now else None
