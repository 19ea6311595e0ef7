"""The code that runs inside a worker process: it owns one model and nothing else.

`WorkerCore` does not know it runs in a subprocess (the in-process runner drives it directly
in tests); `main()` wraps it with the socket channel. The process exits when the channel
closes, so no worker outlives its server.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import logging
import math
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import structlog

from modelmora.contracts import channel
from modelmora.contracts.channel import (
    BatchDone,
    Cancel,
    Close,
    Event,
    Health,
    Healthy,
    Infer,
    ItemError,
    Load,
    Loaded,
    LoadFailed,
    LoadFailure,
    LoadSpec,
    Outcome,
    Prepare,
    Prepared,
    Stats,
    Stepping,
    WorkerStats,
    WorkItem,
)
from modelmora.contracts.tasks import TaskType
from modelmora.lifecycle import stepping
from modelmora.tasks.base import Emitter, RequestRejected, TaskAdapter
from modelmora.tasks.specs import spec_for

log = logging.getLogger("modelmora.worker")

SendFn = Callable[[object], None]


def _gpu_bytes() -> int:
    # Only a worker whose adapter imported torch can hold GPU memory.
    if "torch" not in sys.modules:
        return 0
    from modelmora.tasks.torch_utils import gpu_bytes

    return gpu_bytes()


def _apply_threads(threads: object) -> int | None:
    """`options.threads`: the CPU threads this model's torch may use. By default torch takes
    every core, and several models on one CPU then fight over the same cores (spinning
    OpenMP threads can burn several times the CPU of the work itself); giving each its share
    avoids that."""
    if threads is None:
        return None
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"options.threads must be a whole number >= 1, not {threads!r}")
    import torch

    torch.set_num_threads(threads)
    return int(torch.get_num_threads())


def _gpu_peak_bytes() -> int:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    return int(torch.cuda.max_memory_reserved())


def _trace_ids(items: list[WorkItem]) -> list[str]:
    """The batch's trace ids, for its log lines (each request's id from its traceparent)."""
    return [i.trace_id for i in items if i.trace_id]


def _expired(item: WorkItem, now: float) -> bool:
    return item.deadline is not None and now >= item.deadline


def _dropped(item: WorkItem, when: str) -> ItemError:
    """The outcome of an item the worker did not finish: its deadline passed, or the server
    cancelled it (the client went away, or gave up)."""
    if _expired(item, time.monotonic()):
        return ItemError("INFERENCE_TIMEOUT", f"the request's deadline passed {when}")
    return ItemError("CANCELLED", f"cancelled {when}")


def non_finite(value: Any) -> bool:
    """Whether a result holds NaN or an infinity (floats, lists and dicts of them, numpy
    arrays): what damaged weights produce while everything else looks fine."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list | tuple):
        return any(non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(non_finite(v) for v in value.values())
    kind = getattr(getattr(value, "dtype", None), "kind", None)
    numpy = sys.modules.get("numpy")
    if kind in ("f", "c") and numpy is not None:
        return not bool(numpy.isfinite(value).all())
    return False


@dataclass
class Begun:
    """A batch whose preprocessing is done (or failed), waiting for the model."""

    message: Infer
    live: list[WorkItem]
    prepared: Any = None
    failed: Exception | None = None
    pre_ms: float = 0.0
    forward_s: float = 0.0
    post_s: float = 0.0


class WorkerCore:
    """Load a model, run batches, answer health checks. Every exception is turned into an
    outcome: bad input must never end the worker."""

    def __init__(self, emit: Callable[[Event], None] | None = None) -> None:
        self.adapter: TaskAdapter | None = None
        self.spec: LoadSpec | None = None
        self.cancelled: set[str] = set()
        self._emit = emit or (lambda _event: None)
        self.batches = 0  # totals since the load, for `stats`
        self.items = 0

    def load(self, spec: LoadSpec) -> Loaded | LoadFailed:
        started = time.perf_counter()
        try:
            task = spec_for(TaskType(spec.task_type))
            adapter = task.adapter(spec.adapter).build()
            threads = _apply_threads(spec.options.get("threads"))
            adapter.load(Path(spec.path), spec.device, spec.dtype, spec.options)
            self.adapter, self.spec = adapter, spec
            if spec.health_check:
                done = self.infer(Infer(batch_id=-1, items=[task.health_item()]))
                first = done.outcomes[0]
                if isinstance(first, ItemError):
                    self.adapter = None
                    return LoadFailed(
                        f"health check failed: {first.message}",
                        {"health_check": first.details},
                        LoadFailure.HEALTH_CHECK,
                    )
                if non_finite(first.value):
                    # Damaged weights often load fine and compute NaN: never serve them.
                    self.adapter = None
                    return LoadFailed(
                        "health check failed: the sample's output has NaN or infinite values",
                        {"health_check": {"non_finite": True}},
                        LoadFailure.HEALTH_CHECK,
                    )
        except Exception as exc:
            self.adapter = None
            return LoadFailed(
                f"{type(exc).__name__}: {exc}",
                {"traceback": traceback.format_exc(limit=8)},
                LoadFailure.ERROR,
            )
        return Loaded(
            device=adapter.device,
            dtype=adapter.dtype,
            rss_bytes=psutil.Process().memory_info().rss,
            gpu_bytes=_gpu_bytes(),
            load_seconds=time.perf_counter() - started,
            info={**adapter.info(), **({"threads": threads} if threads else {})},
        )

    def infer(self, message: Infer) -> BatchDone:
        return self.finish(self.begin(message))

    def begin(self, message: Infer) -> Begun:
        """The CPU part (drop cancelled items and those past their deadline, preprocess): a
        pipelined worker runs it for the next batch while `finish` runs the model on the
        current one."""
        started = time.perf_counter()
        now = time.monotonic()
        live = [i for i in message.items if i.request_id not in self.cancelled and not _expired(i, now)]
        begun = Begun(message, live)
        if self.adapter is not None and live:
            try:
                begun.prepared = self.adapter.preprocess(live)
            except Exception as exc:
                begun.failed = exc
        begun.pre_ms = (time.perf_counter() - started) * 1000
        return begun

    def finish(self, begun: Begun) -> BatchDone:
        started = time.perf_counter()
        items = begun.message.items
        outcomes: dict[str, Outcome] = {i.request_id: _dropped(i, "before it ran") for i in items}
        if self.adapter is None:
            err = ItemError("MODEL_LOAD_FAILED", "no model is loaded in this worker")
            return BatchDone(begun.message.batch_id, [err for _ in items], 0.0)
        if begun.live:
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "batch started",
                    extra={"batch_id": begun.message.batch_id, "trace_ids": _trace_ids(begun.live)},
                )
            results = self._run(begun.live, begun)
            for item, outcome in zip(begun.live, results, strict=True):
                if isinstance(outcome, ItemError) and outcome.code == "CANCELLED":
                    outcome = _dropped(item, "while it ran")  # the deadline may be why
                outcomes[item.request_id] = outcome
        for item in items:
            self.cancelled.discard(item.request_id)
        if len(self.cancelled) > 4096:  # cancels that came after their batch: forget them
            self.cancelled.clear()
        compute_ms = begun.pre_ms + (time.perf_counter() - started) * 1000
        ordered = [outcomes[i.request_id] for i in items]
        self.batches += 1
        self.items += len(begun.live)
        errors = sum(1 for o in ordered if isinstance(o, ItemError))
        stats = {
            "preprocess": begun.pre_ms / 1000,
            "forward": begun.forward_s,
            "postprocess": begun.post_s,
            "items_ok": float(len(ordered) - errors),
            "items_error": float(errors - (len(items) - len(begun.live))),
            "items_cancelled": float(len(items) - len(begun.live)),
        }
        return BatchDone(begun.message.batch_id, ordered, compute_ms, stats)

    def _run(self, items: list[WorkItem], begun: Begun | None = None) -> list[Outcome]:
        adapter = self.adapter
        assert adapter is not None

        def send(request_id: str, kind: str, data: dict[str, Any]) -> None:
            self._emit(Event(request_id, kind, data))

        deadlines = {i.request_id: i.deadline for i in items if i.deadline is not None}
        emit = Emitter(send, self.cancelled, deadlines)
        try:
            if begun is not None and begun.failed is not None:
                raise begun.failed
            prepared = begun.prepared if begun is not None else adapter.preprocess(items)
            t0 = time.perf_counter()
            output = adapter.forward(prepared, emit)
            t1 = time.perf_counter()
            outcomes = adapter.postprocess(output, items)
            if begun is not None:
                begun.forward_s, begun.post_s = t1 - t0, time.perf_counter() - t1
        except Exception as exc:
            rejected = isinstance(exc, RequestRejected)  # the request's fault, not the model's
            if not rejected:
                # The trace ids tie this stack trace to the requests (and their server-side logs).
                log.exception(
                    "batch failed", extra={"trace_ids": _trace_ids(items), "batch_size": len(items)}
                )
            if len(items) > 1:
                # One poisoned input must not fail its neighbours: retry each alone.
                return [self._run([item])[0] for item in items]
            if isinstance(exc, RequestRejected):
                return [ItemError(exc.code, str(exc))]
            failed = ItemError(
                "INFERENCE_FAILED", f"{type(exc).__name__}: {exc}", {"exception": type(exc).__name__}
            )
            return [failed]
        if len(outcomes) != len(items):
            bad = ItemError("INFERENCE_FAILED", "adapter returned the wrong number of outcomes")
            return [bad for _ in items]
        return outcomes

    def prepare(self, message: Prepare) -> Prepared:
        started = time.perf_counter()
        failed = []
        for module in message.modules:
            try:
                importlib.import_module(module)
            except Exception:
                failed.append(module)
        return Prepared(psutil.Process().memory_info().rss, time.perf_counter() - started, failed)

    def health(self, message: Health) -> Healthy:
        return Healthy(message.nonce, psutil.Process().memory_info().rss, _gpu_bytes())

    def stats(self, message: Stats) -> WorkerStats:
        return WorkerStats(
            message.nonce,
            psutil.Process().memory_info().rss,
            _gpu_bytes(),
            _gpu_peak_bytes(),
            self.batches,
            self.items,
        )

    def close(self) -> None:
        self.adapter = None
        if "torch" in sys.modules:
            from modelmora.tasks.torch_utils import release_gpu

            release_gpu()


def _serve(sock: socket.socket) -> None:
    send_lock = threading.Lock()

    def send(message: object) -> None:
        data = channel.encode(message)
        with send_lock:
            sock.sendall(data)

    core = WorkerCore(emit=send)
    # Control messages first, then batches by priority, FIFO within one: (rank, seq, message).
    inbox: queue.PriorityQueue[tuple[int, int, object]] = queue.PriorityQueue()
    order = itertools.count()

    def enqueue(message: object) -> None:
        rank = message.priority if isinstance(message, Infer) else 0
        inbox.put((rank, next(order), message))

    def reader() -> None:
        """Reads the channel; handles cancel and health at once so they never wait behind a
        long batch; everything else goes to the main thread in order."""
        stream = sock.makefile("rb")
        try:
            while True:
                header = stream.read(channel.header_size())
                if len(header) < channel.header_size():
                    break
                body = stream.read(channel.body_size(header))
                message = channel.decode(body)
                if isinstance(message, Cancel):
                    core.cancelled.update(message.request_ids)
                elif isinstance(message, Health):
                    send(core.health(message))
                elif isinstance(message, Stats):
                    send(core.stats(message))
                else:
                    enqueue(message)
        except (OSError, ValueError):
            pass
        # The server went away: nobody waits for what runs now. Exit at once rather than
        # after the batch in progress (the OS frees memory, GPU included).
        os._exit(0)

    threading.Thread(target=reader, name="channel-reader", daemon=True).start()
    model: ModelThread | None = None
    while True:
        if model is not None:
            model.wait_for_room()  # hold a slot before choosing the next batch: choose late
        message = inbox.get()[2]
        if model is not None:
            if isinstance(message, Infer):
                model.submit(core.begin(message))  # preprocess while the model computes
                continue
            model.room.release()  # not a batch: give the slot back
        if isinstance(message, Load):
            loaded = core.load(message.spec)
            # On a GPU the model runs in its own thread and this one tokenizes the next batch
            # meanwhile; on a CPU both would share the same cores, so it stays sequential
            # (the model option `pipeline` decides either way).
            pipeline = message.spec.options.get("pipeline")
            if pipeline is None:
                pipeline = isinstance(loaded, Loaded) and loaded.device.startswith("cuda")
            if isinstance(loaded, Loaded) and pipeline:
                model = ModelThread(core, send)
            send(loaded)
        elif isinstance(message, Prepare):
            send(core.prepare(message))
        elif isinstance(message, Infer):
            send(core.infer(message))
        elif isinstance(message, Stepping):
            # Continuous batching: the step loop serves every batch from now on, until Close.
            stepper = stepping.open_stepper(core, message, send)
            if stepper is not None:
                if model is not None:
                    model.stop()
                stepping.Loop(core, stepper, send).run(lambda block: inbox.get(block)[2])
                core.close()
                return
        elif isinstance(message, Close):
            if model is not None:
                model.stop()
            core.close()
            return


class ModelThread:
    """Runs `finish` (forward + postprocess) for batches that the main thread has begun.

    One batch computes while at most one prepared batch waits for it: tokenizing overlaps the
    GPU's work, and the next batch is picked from the inbox (by priority) as late as possible.
    """

    def __init__(self, core: WorkerCore, send: Callable[[object], None]) -> None:
        self.core = core
        self.send = send
        self.handoff: queue.Queue[Begun | None] = queue.Queue(maxsize=1)
        self.room = threading.Semaphore(1)
        self.thread = threading.Thread(target=self._loop, name="model", daemon=True)
        self.thread.start()

    def wait_for_room(self) -> None:
        self.room.acquire()

    def submit(self, begun: Begun) -> None:
        self.handoff.put(begun)

    def _loop(self) -> None:
        while True:
            begun = self.handoff.get()
            self.room.release()
            if begun is None:
                return
            try:
                self.send(self.core.finish(begun))
            except BaseException:
                # A bug here would leave the batch's futures waiting on the server: end the
                # process instead, so they fail with WORKER_DIED (as in the sequential loop).
                log.exception("model thread failed")
                os._exit(1)

    def stop(self) -> None:
        self.room.acquire()
        self.handoff.put(None)
        self.thread.join()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="modelmora-worker")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--name", default="model")
    args = parser.parse_args(argv)
    # Ctrl-C in a terminal reaches the whole process group; the server ends us in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Same renderer as the server (JSON, or console on a terminal): one log stream.
    from modelmora.observability.logging import configure_logging

    configure_logging(os.environ.get("MODELMORA_WORKER_LOG_LEVEL", "warning"), "auto")
    structlog.contextvars.bind_contextvars(worker_pid=os.getpid())
    sock = socket.socket(fileno=args.fd)
    try:
        _serve(sock)
    finally:
        try:
            sock.close()
        finally:
            # Skip interpreter teardown: it can hang on library threads, and the OS frees all.
            os._exit(0)


if __name__ == "__main__":
    main()
