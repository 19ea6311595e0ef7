"""Pure batching decisions over a RequestQueue, with the clock passed in."""

from __future__ import annotations

from dataclasses import dataclass

from modelmora.inference.queue import Entry, Priority, RequestQueue


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_batch_size: int  # inputs per batch
    max_wait_ms: float = 0.0  # how long an idle worker may hold a batch that is not full


# How many entries of another group the batcher looks past, at most, to fill a batch: enough
# to find compatible work behind a few odd requests, bounded so one decision stays cheap.
MAX_SKIPPED = 64


def next_batch(
    queue: RequestQueue, now: float, limits: BatchLimits, only: Priority | None = None
) -> tuple[list[Entry], list[Entry]]:
    """Take the next batch in priority order. Entries whose deadline passed come back in
    `expired` and never reach a worker. An entry larger than the limit goes alone rather than
    never. The head decides the batch's group: entries of another group are looked past (and
    stay queued, in their places), so a seeded request never shares a batch with another seed.
    With `only`, the batch stops at the first entry less urgent than that level: a batch that
    jumps the worker's line carries only what earned the jump, so it is short."""
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
        if only is not None and head.priority > only:
            break
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


# How long an idle worker waits for the clients it has just answered: while they keep
# arriving (each within RETURN_GAP_S of the one before), up to a share of the batch's compute
# time, never more than RETURN_WAIT_MAX_S.
RETURN_GAP_S = 0.005
RETURN_WAIT_SHARE = 0.25
RETURN_WAIT_MAX_S = 0.050


@dataclass(frozen=True, slots=True)
class Returning:
    """The requests the last batch answered. Clients that send their next request when the
    last one comes back (most clients) do so together, a millisecond or so apart; a batch cut
    at the first arrival runs a fraction of them and leaves the rest for a second, smaller
    batch, and the two groups stay out of step from then on (8 such clients of a generation
    model ran as alternating batches of 1 and 7)."""

    count: int  # entries in that batch
    finished: float  # when its answers went out
    until: float  # wait no later than this

    @staticmethod
    def after(count: int, finished: float, compute_s: float) -> Returning:
        wait = min(RETURN_WAIT_MAX_S, RETURN_WAIT_SHARE * compute_s)
        return Returning(count, finished, finished + wait)


def hold_until(
    queue: RequestQueue,
    now: float,
    limits: BatchLimits,
    returning: Returning | None = None,
    last_arrival: float = 0.0,
) -> float | None:
    """When an idle worker should dispatch what is queued: None for 'now', else the later of
    the time at which the oldest entry has waited `max_wait_ms`, and, while fewer requests are
    queued than the last batch answered and they keep arriving, the end of the return wait.
    Never when the batch is already full."""
    if queue.items >= limits.max_batch_size:
        return None
    release: float | None = None
    oldest = queue.oldest_arrival()
    if limits.max_wait_ms > 0 and oldest is not None:
        release = oldest + limits.max_wait_ms / 1000
    if returning is not None and len(queue) < returning.count:
        back = min(returning.until, max(returning.finished, last_arrival) + RETURN_GAP_S)
        if back > now:
            release = back if release is None else max(release, back)
    return release if release is not None and release > now else None
