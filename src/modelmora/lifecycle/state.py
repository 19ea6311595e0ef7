"""A model's residency state as the manager keeps it, and the typed reasons its changes carry.

`ModelSlot` is one model's entry (state, worker, scheduler, counts); `LoadError` is a failed
load with its `LoadFailure` reason, and `UnloadKind` says why a model was unloaded. The
manager's reactions (UNHEALTHY or FAILED, the unload metric's label) are keyed by these enums;
the free-text reasons beside them are for logs and people only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from modelmora.contracts.channel import Event, Loaded, LoadFailure, WorkerStats
from modelmora.contracts.runner import Runner
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.inference.scheduler import ModelScheduler
from modelmora.lifecycle.eviction import Plan
from modelmora.lifecycle.memory import memory_breakdown
from modelmora.registry.catalog import ModelRecord, ModelState

log = logging.getLogger("modelmora.lifecycle")

MAX_BACKOFF_SECONDS = 300.0


class UnloadKind(StrEnum):
    """Why a model was unloaded; the value is the `reason` label of the unload metric."""

    REQUESTED = "requested"  # an operator's unload (REST, gRPC, CLI)
    EVICTION = "eviction"  # room was needed for another model, or a load overshot the budget
    KEEP_ALIVE = "keep_alive"  # idle past its keep-alive
    SHUTDOWN = "shutdown"
    UNINSTALL = "uninstall"
    MEMORY = "memory"  # the idle worker stayed above its RSS high-water mark: restarted on demand
    REPLACED = "replaced"  # the catalog changed under it (use, update): the next load is anew


class LoadError(ModelMoraError):
    """A load that failed (MODEL_LOAD_FAILED), with the worker's typed reason."""

    def __init__(self, reason: LoadFailure, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(ErrorCode.MODEL_LOAD_FAILED, message, details)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ChecksumFailure:
    """A load refused because the files differ from the registry (CHECKSUM_MISMATCH): not
    retried by the backoff until the version is reinstalled (`fingerprint` changes) or
    verified again (the verified-files cache says so)."""

    error: ModelMoraError
    fingerprint: tuple[Any, ...]

    def again(self) -> ModelMoraError:
        """A fresh exception for each request refused (no traceback chains pile up)."""
        return ModelMoraError(self.error.code, self.error.message, dict(self.error.details))


# The state a model is left in after a failed load, by reason: a model that loaded but fails
# its own sample is unhealthy; anything else failed.
STATE_AFTER_FAILURE: dict[LoadFailure, ModelState] = {
    LoadFailure.ERROR: ModelState.FAILED,
    LoadFailure.HEALTH_CHECK: ModelState.UNHEALTHY,
    LoadFailure.TIMEOUT: ModelState.FAILED,
    LoadFailure.WORKER_DIED: ModelState.FAILED,
}


@dataclass
class ModelSlot:
    name: str
    record: ModelRecord
    state: ModelState = ModelState.REGISTERED
    runner: Runner | None = None
    scheduler: ModelScheduler | None = None
    loaded: Loaded | None = None
    version: str | None = None
    refs: int = 0
    last_used: float = 0.0
    loaded_at: float = 0.0
    keep_alive: float | None = None  # set by a request's keep_alive; None: the model's default
    error: str | None = None
    failure: LoadFailure | None = None  # why the last load failed (None: it did not)
    failures: int = 0
    crashes: int = 0
    retry_at: float = 0.0
    waiters: int = 0
    memory_plan: Plan | None = None  # set while the load waits for memory
    load_task: asyncio.Task[None] | None = None
    stats: WorkerStats | None = None  # the worker's last answer to `stats` (see poll_stats)
    checksum: ChecksumFailure | None = None  # set while the files are known to be damaged
    rss_baseline: int = 0  # the worker's RSS right after its load (the growth factor's base)
    rss_checked_at: float = 0.0  # when the RSS high-water mark was last checked
    event_handlers: dict[str, Callable[[Event], None]] = field(default_factory=dict)

    def is_ready(self) -> bool:
        return self.state is ModelState.READY

    @property
    def busy(self) -> bool:
        return self.refs > 0 or (self.scheduler is not None and self.scheduler.busy)

    def _reported_gpu_bytes(self) -> int:
        if self.loaded is None:
            return 0
        return self.stats.gpu_bytes if self.stats is not None else self.loaded.gpu_bytes

    def status(self, now: float) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state.value,
            "version": self.version or self.record.active_version,
            "task_type": self.record.task_type.value,
            "device": self.loaded.device if self.loaded else None,
            "pid": self.runner.pid if self.runner else None,
            "queued": self.scheduler.queued if self.scheduler else 0,
            "in_flight": self.refs,
            "idle_seconds": round(now - self.last_used, 3) if self.last_used else None,
            "keep_alive_seconds": self.keep_alive,
            "memory": {
                "rss_bytes": self.runner.rss_bytes() if self.runner else 0,
                **(memory_breakdown(self.runner) if self.runner else {}),
                "gpu_bytes": self._reported_gpu_bytes(),
            },
            "failures": self.failures,
            "error": self.error,
        }


def transition(slot: ModelSlot, state: ModelState, reason: str) -> None:
    previous, slot.state = slot.state, state
    log.info(
        "model state changed",
        extra={"model": slot.name, "from": previous.value, "to": state.value, "reason": reason},
    )


def backoff(base: float, failures: int) -> float:
    return float(min(base * (2 ** max(0, failures - 1)), MAX_BACKOFF_SECONDS))


def insufficient(name: str, plan: Plan) -> ModelMoraError:
    return ModelMoraError(
        ErrorCode.INSUFFICIENT_MEMORY,
        f"model {name!r} does not fit in memory: {plan.reason}",
        {"model": name, **plan.details},
        retry_after=5.0 if plan.action == "wait" else None,
    )


def load_failed(slot: ModelSlot, now: float) -> ModelMoraError:
    """What a request for a model whose load failed gets."""
    if slot.memory_plan is not None and slot.memory_plan.action == "impossible":
        return insufficient(slot.name, slot.memory_plan)
    return ModelMoraError(
        ErrorCode.MODEL_LOAD_FAILED,
        f"model {slot.name!r} failed to load: {slot.error}",
        {"model": slot.name, "reason": slot.error, "failures": slot.failures, "state": slot.state.value},
        retry_after=max(1.0, round(slot.retry_at - now, 3)),
    )


def gave_up_waiting(slot: ModelSlot, now: float) -> ModelMoraError:
    """What a request whose deadline passed while its model was loading gets."""
    if slot.memory_plan is not None:
        return insufficient(slot.name, slot.memory_plan)
    if slot.error is not None:
        return load_failed(slot, now)
    return ModelMoraError(
        ErrorCode.INFERENCE_TIMEOUT,
        f"the deadline passed while model {slot.name!r} was loading",
        {"model": slot.name, "state": slot.state.value},
    )
