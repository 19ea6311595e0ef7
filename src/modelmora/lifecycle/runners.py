"""The two implementations of the Runner protocol (`modelmora.contracts.runner`).

`ProcessRunner` runs one OS process per model and speaks the worker channel over a
socketpair: a fresh `python -m modelmora.lifecycle.worker`, or a fork of the zygote when it is
given a `Forker` (`zygote_pool.ZygotePool`); either way the process is this server's child and
its exit status is exact. `InProcessRunner` drives the same `WorkerCore` in a thread, for fast
tests. Both fail every pending batch with WORKER_DIED when the worker goes away, and then call
`on_exit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import queue
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

from modelmora.contracts import channel
from modelmora.contracts.channel import (
    BatchDone,
    Cancel,
    Close,
    Credit,
    Event,
    Health,
    Healthy,
    Infer,
    Load,
    Loaded,
    LoadFailed,
    LoadFailure,
    LoadSpec,
    Prepare,
    Prepared,
    Stats,
    Stepping,
    WorkerStats,
    WorkItem,
)
from modelmora.contracts.runner import EventHandler, ExitHandler, Runner
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.lifecycle import stepping
from modelmora.lifecycle.state import LoadError
from modelmora.lifecycle.worker import WorkerCore

log = logging.getLogger("modelmora.runner")

CreditHandler = Callable[[Credit], None]


def _died(reason: str) -> ModelMoraError:
    return ModelMoraError(ErrorCode.WORKER_DIED, f"the model's worker process ended: {reason}")


class _Pending:
    """Futures waiting for a worker reply, failed all at once when the worker goes away."""

    def __init__(self) -> None:
        self.batches: dict[int, asyncio.Future[BatchDone]] = {}
        self.health: dict[int, asyncio.Future[Healthy]] = {}
        self.stats: dict[int, asyncio.Future[WorkerStats]] = {}
        self.load: asyncio.Future[Loaded | LoadFailed] | None = None
        self.prepare: asyncio.Future[Prepared] | None = None
        self.stepping: asyncio.Future[Credit] | None = None  # the answer to `Stepping`
        self.on_credit: CreditHandler | None = None  # every later `Credit`
        self.ids = itertools.count(1)

    def fail_all(self, error: Exception) -> None:
        futures: list[asyncio.Future[object]] = [
            *self.batches.values(),  # type: ignore[list-item]
            *self.health.values(),  # type: ignore[list-item]
            *self.stats.values(),  # type: ignore[list-item]
        ]
        for single in (self.load, self.prepare, self.stepping):
            if single is not None:
                futures.append(single)  # type: ignore[arg-type]
        for fut in futures:
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # mark retrieved: nobody may be waiting any more
        self.batches.clear()
        self.health.clear()
        self.stats.clear()
        self.load = self.prepare = self.stepping = None

    def resolve(self, message: object) -> None:
        fut: asyncio.Future[Any] | None
        if isinstance(message, BatchDone):
            fut = self.batches.pop(message.batch_id, None)
        elif isinstance(message, Healthy):
            fut = self.health.pop(message.nonce, None)
        elif isinstance(message, WorkerStats):
            fut = self.stats.pop(message.nonce, None)
        elif isinstance(message, Loaded | LoadFailed):
            fut, self.load = self.load, None
        elif isinstance(message, Prepared):
            fut, self.prepare = self.prepare, None
        elif isinstance(message, Credit):
            if self.stepping is None:
                if self.on_credit is not None:
                    self.on_credit(message)
                return
            fut, self.stepping = self.stepping, None
        else:
            return
        reply: Any = message  # the future's type was matched by the branch above
        if fut is not None and not fut.done():
            fut.set_result(reply)


async def _expect_loaded(fut: asyncio.Future[Loaded | LoadFailed], timeout: float) -> Loaded:
    try:
        reply = await asyncio.wait_for(fut, timeout)
    except TimeoutError as exc:
        raise LoadError(LoadFailure.TIMEOUT, f"the model did not load within {timeout:.0f} s") from exc
    except ModelMoraError as exc:
        raise LoadError(LoadFailure.WORKER_DIED, f"the worker died while loading: {exc.message}") from exc
    if isinstance(reply, LoadFailed):
        raise LoadError(reply.reason, reply.message, reply.details)
    return reply


class WorkerProcess(Protocol):
    """What the runner needs of its worker's process: `asyncio.subprocess.Process` for a fresh
    one, `zygote_pool.ForkedProcess` for a fork."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def kill(self) -> None: ...


class ForkFailed(Exception):
    """The zygote could not give a worker: the runner starts a fresh process instead."""


@dataclass
class ForkedWorker:
    process: WorkerProcess
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    hello: dict[str, Any]  # what the child found at its start (pid, threads, tasks)


class Forker(Protocol):
    async def fork_worker(self, name: str, task_type: str | None, adapter: str | None) -> ForkedWorker: ...


class ProcessRunner:
    def __init__(
        self, name: str, on_event: EventHandler, on_exit: ExitHandler, forker: Forker | None = None
    ) -> None:
        self.name = name
        self._on_event = on_event
        self._on_exit = on_exit
        self._forker = forker
        self.hello: dict[str, Any] | None = None  # set when the worker was forked from the zygote
        self._proc: WorkerProcess | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending = _Pending()
        self._closing = False
        self._exited = False

    @property
    def alive(self) -> bool:
        return self._proc is not None and not self._exited

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def forked(self) -> bool:
        return self.hello is not None

    async def spawn(self, task_type: str | None = None, adapter: str | None = None) -> None:
        """Start the process and its channel; no model yet (a spare stops here)."""
        if self._proc is not None:
            return
        if self._forker is not None:
            try:
                forked = await self._forker.fork_worker(self.name, task_type, adapter)
            except ForkFailed as exc:
                log.warning(
                    "fork from the zygote failed: starting a fresh worker", extra={"reason": str(exc)}
                )
            else:
                self._proc, self._writer, self.hello = forked.process, forked.writer, forked.hello
                self._reader_task = asyncio.create_task(
                    self._read(forked.reader), name=f"worker-reader-{self.name}"
                )
                return
        parent, child = socket.socketpair()
        try:
            # No model name on the command line: a spare is adopted by a model after it started
            # (`ps` would show `--name <spare>` for good); /api/v1/status maps pids to models.
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "modelmora.lifecycle.worker",
                "--fd",
                str(child.fileno()),
                pass_fds=(child.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                env=worker_env(),
            )
        finally:
            child.close()
        reader, self._writer = await asyncio.open_unix_connection(sock=parent)
        self._reader_task = asyncio.create_task(self._read(reader), name=f"worker-reader-{self.name}")

    async def prepare(self, modules: list[str], timeout: float) -> Prepared:
        """Import the heavy libraries now, so a later load only reads weights."""
        await self.spawn()
        fut: asyncio.Future[Prepared] = asyncio.get_running_loop().create_future()
        self._pending.prepare = fut
        self._send(Prepare(modules))
        return await asyncio.wait_for(fut, timeout)

    def adopt(self, name: str, on_event: EventHandler, on_exit: ExitHandler) -> None:
        """Hand a spare to a model: from now on its events and its exit are that model's."""
        self.name, self._on_event, self._on_exit = name, on_event, on_exit

    async def start(self, spec: LoadSpec, timeout: float) -> Loaded:
        await self.spawn(spec.task_type, spec.adapter)
        fut: asyncio.Future[Loaded | LoadFailed] = asyncio.get_running_loop().create_future()
        self._pending.load = fut
        self._send(Load(spec))
        try:
            return await _expect_loaded(fut, timeout)
        except BaseException:
            await self.close(grace=0)
            raise

    def _send(self, message: object) -> None:
        if self._writer is None or self._exited:
            raise _died("the channel is closed")
        self._writer.write(channel.encode(message))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        reason = "the channel closed"
        try:
            while True:
                header = await reader.readexactly(channel.header_size())
                body = await reader.readexactly(channel.body_size(header))
                message = channel.decode(body)
                if isinstance(message, Event):
                    self._on_event(message)
                else:
                    self._pending.resolve(message)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except Exception:  # a corrupt frame: treat the worker as gone
            log.exception("worker channel failed", extra={"model": self.name})
            reason = "the channel broke"
        await self._handle_exit(reason)

    async def _handle_exit(self, reason: str) -> None:
        if self._exited:
            return
        self._exited = True
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.5)  # only to name the exit status
            if proc.returncode is not None:
                reason = _describe_exit(proc.returncode)
        self._pending.fail_all(_died(reason))
        if self._writer is not None:
            self._writer.close()
        if not self._closing:
            self._on_exit(reason)

    async def infer(self, items: list[WorkItem], priority: int = 3) -> BatchDone:
        batch_id = next(self._pending.ids)
        fut: asyncio.Future[BatchDone] = asyncio.get_running_loop().create_future()
        self._pending.batches[batch_id] = fut
        try:
            self._send(Infer(batch_id, items, priority))
        except ModelMoraError:
            self._pending.batches.pop(batch_id, None)
            raise
        return await fut

    async def cancel(self, request_ids: list[str]) -> None:
        with contextlib.suppress(ModelMoraError):
            self._send(Cancel(request_ids))

    async def start_stepping(self, slots: int, on_credit: CreditHandler, timeout: float) -> Credit:
        """Switch the worker to continuous batching; its first `Credit` (or its refusal)."""
        fut: asyncio.Future[Credit] = asyncio.get_running_loop().create_future()
        self._pending.stepping, self._pending.on_credit = fut, on_credit
        self._send(Stepping(slots))
        return await asyncio.wait_for(fut, timeout)

    async def health(self, timeout: float = 5.0) -> Healthy:
        nonce = next(self._pending.ids)
        fut: asyncio.Future[Healthy] = asyncio.get_running_loop().create_future()
        self._pending.health[nonce] = fut
        self._send(Health(nonce))
        return await asyncio.wait_for(fut, timeout)

    async def stats(self, timeout: float = 1.0) -> WorkerStats:
        """The worker's figures; its channel reader answers at once, even mid-batch."""
        nonce = next(self._pending.ids)
        fut: asyncio.Future[WorkerStats] = asyncio.get_running_loop().create_future()
        self._pending.stats[nonce] = fut
        try:
            self._send(Stats(nonce))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.stats.pop(nonce, None)

    async def close(self, grace: float) -> None:
        """Ask the worker to exit; kill it when it has not after `grace` seconds."""
        self._closing = True
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ModelMoraError, OSError):
                self._send(Close())
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._reader_task is not None:
            await asyncio.gather(self._reader_task, return_exceptions=True)
        await self._handle_exit("unloaded")

    def rss_bytes(self) -> int:
        if self._proc is None or self._exited:
            return 0
        try:
            return int(psutil.Process(self._proc.pid).memory_info().rss)
        except psutil.Error:
            return 0

    def memory(self) -> dict[str, int]:
        """RSS, PSS (shared pages divided among their sharers) and USS (pages no other process
        maps: what ending the worker frees) of the worker; {} when it is gone."""
        if self._proc is None or self._exited:
            return {}
        try:
            info = psutil.Process(self._proc.pid).memory_full_info()
        except psutil.Error:
            return {}
        return {"rss_bytes": int(info.rss), "pss_bytes": int(info.pss), "uss_bytes": int(info.uss)}

    def accounted_bytes(self) -> int:
        """What the memory budget counts for this worker: its RSS, or for a fork of the zygote
        its USS (the zygote's pages it shares are counted once, as the zygote's RSS)."""
        if not self.forked:
            return self.rss_bytes()
        return self.memory().get("uss_bytes", 0)


def worker_env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",  # the files are local: a load never reaches out
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # no progress bars in the server's log stream
        "TQDM_DISABLE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class InProcessRunner:
    """The same WorkerCore in a thread of this process: no IPC, for fast tests."""

    def __init__(self, name: str, on_event: EventHandler, on_exit: ExitHandler) -> None:
        self.name = name
        self._on_exit = on_exit
        self._loop = asyncio.get_event_loop()

        def emit(event: Event) -> None:
            self._loop.call_soon_threadsafe(on_event, event)

        self._core = WorkerCore(emit=emit)
        self._on_event = on_event
        self._alive = False
        self._lock = asyncio.Lock()  # one batch at a time, as in a worker process
        # Continuous batching: the worker's step loop in its own thread, fed through an inbox.
        self._inbox: queue.Queue[object] | None = None
        self._stepping_thread: threading.Thread | None = None
        self._on_credit: CreditHandler | None = None
        self._batches: dict[int, asyncio.Future[BatchDone]] = {}
        self._ids = itertools.count(1)

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def pid(self) -> int | None:
        return os.getpid() if self._alive else None

    async def start(self, spec: LoadSpec, timeout: float) -> Loaded:
        self._loop = asyncio.get_running_loop()
        reply = await _expect_loaded(asyncio.ensure_future(asyncio.to_thread(self._core.load, spec)), timeout)
        self._alive = True
        return reply

    async def infer(self, items: list[WorkItem], priority: int = 3) -> BatchDone:
        if not self._alive:
            raise _died("not running")
        if self._inbox is not None:
            batch_id = next(self._ids)
            fut: asyncio.Future[BatchDone] = self._loop.create_future()
            self._batches[batch_id] = fut
            self._inbox.put(Infer(batch_id, items, priority))
            return await fut
        async with self._lock:
            return await asyncio.to_thread(self._core.infer, Infer(0, items))

    async def start_stepping(self, slots: int, on_credit: CreditHandler, timeout: float) -> Credit:
        """As the worker process does: the step loop (lifecycle/stepping.py) in a thread."""
        replies: list[object] = []
        stepper = await asyncio.to_thread(stepping.open_stepper, self._core, Stepping(slots), replies.append)
        first = replies[0]
        assert isinstance(first, Credit)
        if stepper is None:
            return first
        self._on_credit, self._inbox = on_credit, queue.Queue()
        inbox = self._inbox
        loop = stepping.Loop(self._core, stepper, self._from_worker)
        self._stepping_thread = threading.Thread(
            target=loop.run, args=(inbox.get,), name=f"stepping-{self.name}", daemon=True
        )
        self._stepping_thread.start()
        return first

    def _from_worker(self, message: object) -> None:
        """Called in the step loop's thread: hand the message to the event loop."""
        self._loop.call_soon_threadsafe(self._deliver, message)

    def _deliver(self, message: object) -> None:
        if isinstance(message, BatchDone):
            fut = self._batches.pop(message.batch_id, None)
            if fut is not None and not fut.done():
                fut.set_result(message)
        elif isinstance(message, Credit):
            if self._on_credit is not None:
                self._on_credit(message)
        elif isinstance(message, Event):
            self._on_event(message)

    def _stop_stepping(self, error: ModelMoraError) -> threading.Thread | None:
        thread, inbox = self._stepping_thread, self._inbox
        if inbox is not None:
            inbox.put(Close())
        self._inbox = self._stepping_thread = None
        for fut in self._batches.values():
            if not fut.done():
                fut.set_exception(error)
                fut.exception()
        self._batches.clear()
        return thread

    async def cancel(self, request_ids: list[str]) -> None:
        self._core.cancelled.update(request_ids)

    async def health(self, timeout: float = 5.0) -> Healthy:
        if not self._alive:
            raise _died("not running")
        return self._core.health(Health(0))

    async def stats(self, timeout: float = 1.0) -> WorkerStats:
        if not self._alive:
            raise _died("not running")
        return self._core.stats(Stats(0))

    async def close(self, grace: float) -> None:
        was_alive, self._alive = self._alive, False
        thread = self._stop_stepping(_died("unloaded"))
        if thread is not None:
            await asyncio.to_thread(thread.join, max(grace, 5.0))  # it stops after its step
        if was_alive:
            self._core.close()

    def rss_bytes(self) -> int:
        adapter = self._core.adapter
        return int(adapter.info().get("rss_bytes", 0)) if adapter is not None and self._alive else 0

    def kill(self, reason: str = "killed") -> None:
        """Simulate a crash: what a dead worker process looks like to the server."""
        if self._alive:
            self._alive = False
            self._stop_stepping(_died(reason))
            self._on_exit(reason)


def process_runner_factory(name: str, on_event: EventHandler, on_exit: ExitHandler) -> Runner:
    return ProcessRunner(name, on_event, on_exit)


def in_process_runner_factory(name: str, on_event: EventHandler, on_exit: ExitHandler) -> Runner:
    return InProcessRunner(name, on_event, on_exit)
