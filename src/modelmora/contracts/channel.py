"""Messages of the worker channel (server process <-> one worker process).

Plain dataclasses, pickled and length-prefixed over a socketpair. This module imports nothing
heavy: both sides import it, and the server must never import torch.
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from modelmora.contracts.tasks import TaskType

_HEADER = struct.Struct("!I")
MAX_FRAME = 1 << 31


@dataclass(slots=True)
class LoadSpec:
    path: str
    task_type: TaskType
    device: str = "auto"
    dtype: str = "auto"
    adapter: str | None = None  # None: the task's real adapter; "fake": tasks/fake.py
    options: dict[str, Any] = field(default_factory=dict)
    health_check: bool = True


@dataclass(slots=True)
class WorkItem:
    """One request's share of a batch: its inputs (a list) and task parameters."""

    request_id: str
    inputs: list[Any]
    params: dict[str, Any] = field(default_factory=dict)
    trace_id: str | None = None
    # -- worker bounds (issue 14): the request's deadline as a time.monotonic() value (the
    # clock is system-wide, so the worker reads it as the server wrote it): a worker drops an
    # item whose deadline passed at the next batch or sub-batch boundary. None: no deadline.
    deadline: float | None = None
    # Image tasks: the most bytes this request's images may take decoded (checked again in
    # the worker from each image's header, before decoding). None: no cap.
    max_decoded_bytes: int | None = None


@dataclass(slots=True)
class ItemOk:
    value: Any
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ItemError:
    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


Outcome = ItemOk | ItemError


# server -> worker
@dataclass(slots=True)
class Load:
    spec: LoadSpec


@dataclass(slots=True)
class Infer:
    batch_id: int
    items: list[WorkItem]
    # The most urgent priority in the batch (1 = critical): a worker with several batches
    # waiting runs the most urgent first, so a critical batch overtakes one sent ahead.
    priority: int = 3


@dataclass(slots=True)
class Cancel:
    request_ids: list[str]


@dataclass(slots=True)
class Health:
    nonce: int


@dataclass(slots=True)
class Stats:
    """Ask for the worker's figures now (answered at once, even during a long batch)."""

    nonce: int


@dataclass(slots=True)
class Close:
    pass


@dataclass(slots=True)
class Prepare:
    """Import these modules now, before any model is known (the warm spare)."""

    modules: list[str]


# worker -> server
@dataclass(slots=True)
class Loaded:
    device: str
    dtype: str
    rss_bytes: int
    gpu_bytes: int
    load_seconds: float
    info: dict[str, Any] = field(default_factory=dict)


class LoadFailure(StrEnum):
    """Why a load failed: the server reacts to this, never to the message (which is for
    people and may say anything)."""

    ERROR = "error"  # the adapter (or its import) raised while loading
    HEALTH_CHECK = "health_check"  # loaded, but the task's sample request failed
    TIMEOUT = "timeout"  # no answer within the load timeout
    WORKER_DIED = "worker_died"  # the worker process ended during the load


@dataclass(slots=True)
class LoadFailed:
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    reason: LoadFailure = LoadFailure.ERROR


@dataclass(slots=True)
class BatchDone:
    batch_id: int
    outcomes: list[Outcome]
    compute_ms: float
    # The worker's own figures for this batch (seconds per stage: preprocess, forward,
    # postprocess): carried with the result, so none is lost when the worker is replaced.
    stats: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class Event:
    """A streamed event for one request (a token, a progress step)."""

    request_id: str
    kind: str
    data: dict[str, Any]


@dataclass(slots=True)
class Prepared:
    rss_bytes: int
    seconds: float
    failed: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Healthy:
    nonce: int
    rss_bytes: int
    gpu_bytes: int


@dataclass(slots=True)
class WorkerStats:
    """The worker's gauges: memory as the worker sees it (torch's view of the GPU) and
    totals since it started."""

    nonce: int
    rss_bytes: int
    gpu_bytes: int  # reserved by torch's allocator now
    gpu_peak_bytes: int  # the most torch has reserved since the load
    batches: int
    items: int


# Continuous (iteration-level) batching: lifecycle/stepping.py in the worker,
# inference/continuous.py in the server.
@dataclass(slots=True)
class Stepping:
    """server -> worker, after `Loaded`: run the model as one running batch of at most
    `slots` rows. Each `Infer` from then on is a request that joins it at the next step and
    is answered by its own `BatchDone` when its rows are done."""

    slots: int


@dataclass(slots=True)
class Credit:
    """worker -> server: the room left in the running batch, sent in answer to `Stepping`
    and whenever it changes. `received` counts the `Infer` messages the worker has taken so
    far, so the server subtracts what it sent after this report (no race). Which queued
    requests fill the room stays the server's choice. `supported` False (with `reason`):
    this model cannot be stepped and keeps static batching."""

    free_slots: int
    free_tokens: int
    received: int
    supported: bool = True
    reason: str = ""


def encode(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


def header_size() -> int:
    return _HEADER.size


def body_size(header: bytes) -> int:
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes exceeds the channel limit")
    return int(size)


def decode(body: bytes) -> object:
    return pickle.loads(body)
