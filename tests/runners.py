"""Both runners behind one factory, for integration tests that run over each: the worker
in a real process (`ProcessRunner`) and its in-process twin (`InProcessRunner`).

`RecordingFactory` wraps what it builds so a test can see what reached the worker (the
inputs of every batch) and end a worker as a crash would, the same way for both kinds."""

from __future__ import annotations

import os
import signal

from modelmora.contracts.channel import BatchDone, Healthy, Loaded, LoadSpec, WorkerStats, WorkItem
from modelmora.contracts.runner import EventHandler, ExitHandler, Runner
from modelmora.lifecycle.runners import InProcessRunner, in_process_runner_factory, process_runner_factory

RUNNER_KINDS = ["in-process", "process"]


class RecordingRunner:
    """A Runner that passes everything to the real one and remembers each batch's inputs."""

    def __init__(self, inner: Runner) -> None:
        self.inner = inner
        self.batches: list[list[object]] = []

    @property
    def seen(self) -> list[object]:
        return [value for batch in self.batches for value in batch]

    @property
    def alive(self) -> bool:
        return self.inner.alive

    @property
    def pid(self) -> int | None:
        return self.inner.pid

    async def start(self, spec: LoadSpec, timeout: float) -> Loaded:
        return await self.inner.start(spec, timeout)

    async def infer(self, items: list[WorkItem], priority: int = 3) -> BatchDone:
        self.batches.append([value for item in items for value in item.inputs])
        return await self.inner.infer(items, priority)

    async def cancel(self, request_ids: list[str]) -> None:
        await self.inner.cancel(request_ids)

    async def health(self, timeout: float = 5.0) -> Healthy:
        return await self.inner.health(timeout)

    async def stats(self, timeout: float = 1.0) -> WorkerStats:
        return await self.inner.stats(timeout)

    async def close(self, grace: float) -> None:
        await self.inner.close(grace)

    def rss_bytes(self) -> int:
        return self.inner.rss_bytes()

    def kill(self) -> None:
        """End the worker as a crash would: SIGKILL for a process, the simulated exit for
        the in-process twin (which has no process of its own to kill)."""
        if isinstance(self.inner, InProcessRunner):
            self.inner.kill("simulated crash")
        else:
            assert self.inner.pid is not None
            os.kill(self.inner.pid, signal.SIGKILL)


class RecordingFactory:
    """A runner factory of one kind that keeps every runner it made, in order."""

    def __init__(self, kind: str) -> None:
        assert kind in RUNNER_KINDS
        self.kind = kind
        self.runners: list[RecordingRunner] = []

    def __call__(self, name: str, on_event: EventHandler, on_exit: ExitHandler) -> Runner:
        make = in_process_runner_factory if self.kind == "in-process" else process_runner_factory
        runner = RecordingRunner(make(name, on_event, on_exit))
        self.runners.append(runner)
        return runner
