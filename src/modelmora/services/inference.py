"""Inference as every door calls it: validate, queue, wait, shape the response.

Routers translate to and from these calls and nothing else, so behaviour cannot differ
between interfaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from modelmora.cluster.forwarder import Forwarder, PeerUnavailable
from modelmora.cluster.view import ReplicaInfo
from modelmora.config import Settings
from modelmora.contracts.channel import WorkItem
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.inference.queue import Priority, parse_priority
from modelmora.inference.scheduler import Completed
from modelmora.lifecycle.manager import ModelManager
from modelmora.observability.metrics import current_protocol
from modelmora.observability.tracing import SpanRecorder
from modelmora.registry.catalog import ModelRecord, validate_name
from modelmora.results.store import ResultStore, build_result_store, new_key
from modelmora.tasks.image_urls import fetch_image_urls
from modelmora.tasks.inputs import ParsedInput
from modelmora.tasks.specs import SPECS, TaskSpec, default_timeout

log = logging.getLogger("modelmora.requests")

# Request ids only need to be unique within this server (they name work items to its workers).
_request_ids = itertools.count(1)


@dataclass(slots=True)
class _Call:
    """One validated request, ready to queue."""

    name: str
    record: ModelRecord
    spec: TaskSpec
    parsed: ParsedInput
    item: WorkItem
    level: Priority
    timeout: float
    received: float

    @property
    def deadline(self) -> float:
        return self.received + self.timeout


EventCallback = Callable[[str, dict[str, Any]], None]

# The bounds of InferRequest (api/schemas.py) for every door: gRPC's doubles carry NaN, the
# infinities and negatives that the REST schema refuses before they get here.
MAX_TIMEOUT_SECONDS = 86_400.0


def check_timing(timeout_seconds: float | None, keep_alive: float | None) -> None:
    errors: list[dict[str, str]] = []
    if timeout_seconds is not None and not (
        math.isfinite(timeout_seconds) and 0 < timeout_seconds <= MAX_TIMEOUT_SECONDS
    ):
        errors.append({"field": "timeout_seconds", "message": "seconds, > 0 and <= 86400"})
    if keep_alive is not None and not (math.isfinite(keep_alive) and keep_alive >= -1):
        errors.append({"field": "keep_alive", "message": "finite seconds, >= -1 (-1: forever)"})
    if errors:
        fields = ", ".join(e["field"] for e in errors)
        raise ModelMoraError(ErrorCode.VALIDATION_ERROR, f"invalid {fields}", {"errors": errors})


class InferenceService:
    def __init__(
        self,
        settings: Settings,
        manager: ModelManager,
        results: ResultStore | None = None,
        spans: SpanRecorder | None = None,
    ) -> None:
        self.settings = settings
        self.manager = manager
        self.metrics = manager.metrics
        self.spans = spans  # None: tracing off (the default), and nothing is built per request
        self.slow_seconds = settings.telemetry.slow_request_seconds
        # Where large results (images) go; the response then carries a URL.
        self.results = results or build_result_store(settings)
        self._sink = _StoreSink(self)
        # Set by the composition root when cluster routing is on: a request for a model that
        # another replica holds with room goes there (cluster/forwarder.py).
        self.forwarder: Forwarder | None = None
        # The longest a request may wait when it sets no timeout (bounds a forwarded wait; the
        # holder applies the model's own default).
        self._max_default_timeout = max(default_timeout(settings.scheduler, t) for t in SPECS)

    def routes_elsewhere(self, name: str) -> bool:
        """Whether a request for `name` made now would be forwarded to another replica."""
        return self.forwarder is not None and self.forwarder.route(name) is not None

    def _peer_for(
        self, name: str, timeout_seconds: float | None, keep_alive: float | None
    ) -> ReplicaInfo | None:
        if self.forwarder is None:
            return None
        peer = self.forwarder.route(name)
        if peer is not None:  # the checks a local call makes first, with the same errors
            validate_name(name)
            check_timing(timeout_seconds, keep_alive)
        return peer

    async def infer(
        self,
        name: str,
        input_data: dict[str, Any],
        parameters: dict[str, Any] | None = None,
        *,
        priority: str | int | None = None,
        timeout_seconds: float | None = None,
        keep_alive: float | None = None,
        trace_id: str | None = None,
        disconnected: asyncio.Future[Any] | None = None,
        on_event: EventCallback | None = None,
    ) -> dict[str, Any]:
        """Validate, queue, wait; returns the common response (results may hold numpy
        arrays: the REST layer serialises them without a copy through orjson).

        `on_event(kind, data)` is called on the event loop for each event the worker emits
        for this request (`token`, `progress`), in order, all before this call returns.
        A request for a model that another replica holds with room is answered there (the
        events of a forwarded request are not relayed: `on_event` sees none)."""
        peer = self._peer_for(name, timeout_seconds, keep_alive)
        if peer is not None and self.forwarder is not None:
            body = _hop_body(input_data, parameters, priority, timeout_seconds, keep_alive)
            timeout = timeout_seconds or self._max_default_timeout
            try:
                return await self.forwarder.infer(peer, name, body, timeout, trace_id, disconnected)
            except PeerUnavailable:
                pass  # served here
        call = await self.prepare(
            name, input_data, parameters, priority, timeout_seconds, trace_id, keep_alive=keep_alive
        )
        return await self._run(call, keep_alive, disconnected, on_event)

    async def stream(
        self,
        name: str,
        input_data: dict[str, Any],
        parameters: dict[str, Any] | None = None,
        *,
        priority: str | int | None = None,
        timeout_seconds: float | None = None,
        keep_alive: float | None = None,
        trace_id: str | None = None,
        disconnected: asyncio.Future[Any] | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The request's events as `{"event": "token"|"progress", "data": ...}`, then
        `{"event": "done", "data": <the common response>}` or `{"event": "error", "data":
        <error body>}`. An error before the first event (unknown model, bad input, queue full,
        load failure) is raised as ModelMoraError instead, so a door can still answer it with
        a plain status. Closing the iterator early cancels the request, in the worker too."""
        peer = self._peer_for(name, timeout_seconds, keep_alive)
        if peer is not None and self.forwarder is not None:
            body = _hop_body(input_data, parameters, priority, timeout_seconds, keep_alive)
            timeout = timeout_seconds or self._max_default_timeout
            remote = self.forwarder.stream(peer, name, body, timeout, trace_id, disconnected)
            try:
                first = await anext(remote)
            except PeerUnavailable:
                pass  # served here, below
            except StopAsyncIteration:
                return
            else:
                try:
                    yield first
                    async for forwarded in remote:
                        yield forwarded
                finally:
                    await remote.aclose()
                return
        call = await self.prepare(
            name, input_data, parameters, priority, timeout_seconds, trace_id, keep_alive=keep_alive
        )
        if call.spec.stream is None:
            raise ModelMoraError(
                ErrorCode.VALIDATION_ERROR,
                "streaming is for generation tasks",
                {"errors": [{"field": "stream", "message": f"not supported for {call.spec.task.value}"}]},
            )
        call.item.params["stream"] = True  # the adapter emits per-token events only when asked
        events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        def on_event(kind: str, data: dict[str, Any]) -> None:
            events.put_nowait({"event": kind, "data": data})

        task = asyncio.ensure_future(self._run(call, keep_alive, disconnected, on_event))
        # Every event reaches the queue before the result does (one ordered channel), so the
        # sentinel put when the call ends comes after the last event.
        task.add_done_callback(lambda _t: events.put_nowait(None))
        sent = 0
        try:
            while (event := await events.get()) is not None:
                sent += 1
                yield event
            try:
                response = task.result()
            except ModelMoraError as exc:
                if not sent:
                    raise
                yield {"event": "error", "data": exc.to_body(trace_id)}
                return
            yield {"event": "done", "data": response}
        finally:
            if not task.done():  # the consumer left early: withdraw the work, in the worker too
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, ModelMoraError):
                    await task

    async def prepare(
        self,
        name: str,
        input_data: dict[str, Any],
        parameters: dict[str, Any] | None,
        priority: str | int | None,
        timeout_seconds: float | None,
        trace_id: str | None,
        *,
        keep_alive: float | None = None,
    ) -> _Call:
        """Check a request as it will run (model, input, parameters, priority, deadline)
        without queueing it; async jobs call this at submission. A request refused here is
        counted, under its model's name once the model is known to exist, else under
        model="" (labels stay bounded), and traced (its request span, with the error)."""
        known: list[ModelRecord] = []
        received = self.manager.clock()
        try:
            check_timing(timeout_seconds, keep_alive)
            call = await self._validate(
                name, input_data, parameters, priority, timeout_seconds, trace_id, known, received
            )
        except ModelMoraError as exc:
            model, task = (name, known[0].task_type.value) if known else ("", "")
            protocol = current_protocol.get()
            self.metrics.record_error(model, task, protocol, exc.code.value)
            # The span names the model asked for: spans have no label cardinality to bound.
            self._error_span(trace_id, received, name, task, protocol, exc.code.value)
            raise
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request received", extra={"model": name, "request_id": call.item.request_id})
        return call

    async def _validate(
        self,
        name: str,
        input_data: dict[str, Any],
        parameters: dict[str, Any] | None,
        priority: str | int | None,
        timeout_seconds: float | None,
        trace_id: str | None,
        known: list[ModelRecord],
        received: float,
    ) -> _Call:
        validate_name(name)  # also refuses NAME@VERSION: the active version serves
        record = await self.manager.record(name)
        known.append(record)
        defaults = record.config.get("parameters") or {}
        params = {**defaults, **(parameters or {})}
        spec = SPECS[record.task_type]
        if spec.image_inputs:
            input_data = await fetch_image_urls(input_data, self.settings.limits)
        parsed = spec.parse_request(input_data, params, self.settings.limits)
        level = parse_priority(priority)
        timeout = timeout_seconds or float(
            record.config.get("default_timeout_seconds")
            or default_timeout(self.settings.scheduler, spec.task)
        )
        item = WorkItem(
            f"r{next(_request_ids)}",
            parsed.inputs,
            dict(parsed.params),
            trace_id,
            # The worker drops the item once this passes (its clock is time.monotonic too).
            deadline=time.monotonic() + timeout - (self.manager.clock() - received),
            max_decoded_bytes=self.settings.limits.max_decoded_image_bytes_per_request
            if spec.image_inputs
            else None,
        )
        return _Call(name, record, spec, parsed, item, level, timeout, received)

    async def _run(
        self,
        call: _Call,
        keep_alive: float | None,
        disconnected: asyncio.Future[Any] | None,
        on_event: EventCallback | None,
    ) -> dict[str, Any]:
        """Run the request and count it (metrics, logs, spans), whatever its outcome."""
        task = call.record.task_type.value
        protocol = current_protocol.get()
        try:
            response = await self._run_counted(call, keep_alive, disconnected, on_event)
        except ModelMoraError as exc:
            self._failed(call, task, protocol, exc.code.value, exc)
            raise
        except asyncio.CancelledError:
            self._failed(call, task, protocol, ErrorCode.CANCELLED.value, None)
            raise
        except Exception as exc:
            self._failed(call, task, protocol, ErrorCode.INTERNAL_ERROR.value, exc)
            raise
        timing = response["timing"]
        queue_s, inference_s = timing["queue_time_ms"] / 1000, timing["inference_time_ms"] / 1000
        total_s = timing["total_time_ms"] / 1000
        self.metrics.record_success(
            call.name, task, protocol, queue_s, inference_s, total_s, response["metadata"]["batch_size"]
        )
        if total_s >= self.slow_seconds:
            self.metrics.slow.labels(call.name).inc()
            log.warning(
                "slow request",
                extra={"model": call.name, "request_id": call.item.request_id, **timing},
            )
        elif log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request completed", extra={"model": call.name, "request_id": call.item.request_id, **timing}
            )
        if self.spans is not None:
            self.spans.request(
                trace_id=call.item.trace_id,
                received_ago_s=self.manager.clock() - call.received,
                queue_s=queue_s,
                inference_s=inference_s,
                attributes={
                    "modelmora.model": call.name,
                    "modelmora.task": task,
                    "modelmora.protocol": protocol,
                    "modelmora.batch_size": response["metadata"]["batch_size"],
                },
            )
        return response

    def _failed(self, call: _Call, task: str, protocol: str, code: str, exc: BaseException | None) -> None:
        self.metrics.record_error(call.name, task, protocol, code)
        if code in ("INTERNAL_ERROR", "INFERENCE_FAILED"):
            log.warning(
                "request failed",
                extra={"model": call.name, "request_id": call.item.request_id, "error_code": code},
                exc_info=exc if code == "INTERNAL_ERROR" else None,
            )
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("request failed", extra={"model": call.name, "error_code": code})
        self._error_span(call.item.trace_id, call.received, call.name, task, protocol, code)

    def _error_span(
        self, trace_id: str | None, received: float, model: str, task: str, protocol: str, code: str
    ) -> None:
        """The request span of a request that ended in an error, refused or failed."""
        if self.spans is not None:
            self.spans.request(
                trace_id=trace_id,
                received_ago_s=self.manager.clock() - received,
                queue_s=0.0,
                inference_s=0.0,
                attributes={
                    "modelmora.model": model,
                    "modelmora.task": task,
                    "modelmora.protocol": protocol,
                },
                error_code=code,
            )

    async def _run_counted(
        self,
        call: _Call,
        keep_alive: float | None,
        disconnected: asyncio.Future[Any] | None,
        on_event: EventCallback | None,
    ) -> dict[str, Any]:
        name, record, item, deadline = call.name, call.record, call.item, call.deadline
        # The ref count keeps the model from being evicted or reaped while this runs.
        slot = await self.manager.acquire(name, record, deadline)
        if on_event is not None:
            callback = on_event
            # Registered before the work is queued, so no event can arrive unrouted.
            slot.event_handlers[item.request_id] = lambda ev: callback(ev.kind, ev.data)
        try:
            scheduler = slot.scheduler
            if scheduler is None:  # the worker died between load and use
                raise ModelMoraError(ErrorCode.WORKER_DIED, f"the worker of {name!r} is gone")
            entry = scheduler.submit(item, call.level, deadline, call.parsed.group)
            try:
                done = await _wait(entry.payload.future, deadline - self.manager.clock(), disconnected)
            except asyncio.CancelledError:  # the handler itself was cancelled: drop the work
                scheduler.withdraw(entry)
                raise
            if done is None:
                scheduler.withdraw(entry)
                if disconnected is not None and disconnected.done():
                    raise ModelMoraError(ErrorCode.CANCELLED, "the client went away")
                self.metrics.expired.labels(name, "wait").inc()
                raise ModelMoraError(
                    ErrorCode.INFERENCE_TIMEOUT,
                    f"no result within {call.timeout:g} s",
                    {"timeout_seconds": call.timeout},
                )
            loaded = slot.loaded
        finally:
            slot.event_handlers.pop(item.request_id, None)
            self.manager.release(slot, keep_alive)
        result = await call.spec.shape(done.value, call.parsed, self._sink)
        total_ms = (self.manager.clock() - call.received) * 1000
        metadata = {
            "model": name,
            "version": slot.version,
            "task_type": record.task_type.value,
            "device": loaded.device if loaded else None,
            "batch_size": done.batch_size,
            "truncated": int(done.meta.get("truncated", 0)),  # type: ignore[call-overload]
        }
        if "prompt_tokens" in done.meta:  # counted by the worker's tokenizer (embedding tasks)
            metadata["prompt_tokens"] = int(done.meta["prompt_tokens"])  # type: ignore[call-overload]
        return {
            "result": result,
            "metadata": metadata,
            "timing": {
                "queue_time_ms": round(done.queue_ms, 3),
                "inference_time_ms": round(done.inference_ms, 3),
                "total_time_ms": round(total_ms, 3),
            },
        }

    async def warmup(self, name: str) -> dict[str, Any]:
        """Load the model and run the task's built-in sample through the real path (queue,
        batcher, worker), so the first user request meets warm caches."""
        record = await self.manager.record(validate_name(name))
        request = SPECS[record.task_type].warmup
        if request is None:
            # The load's own health check is this task's warm-up.
            await self.manager.load(name)
            return {"name": name, "warmed": False}
        response = await self.infer(name, dict(request.input_data), dict(request.parameters))
        return {"name": name, "warmed": True, "timing": response["timing"]}


def _hop_body(
    input_data: dict[str, Any],
    parameters: dict[str, Any] | None,
    priority: str | int | None,
    timeout_seconds: float | None,
    keep_alive: float | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"input_data": input_data, "parameters": parameters or {}}
    for key, value in (
        ("priority", priority),
        ("timeout_seconds", timeout_seconds),
        ("keep_alive", keep_alive),
    ):
        if value is not None:
            body[key] = value
    return body


class _StoreSink:
    """The result store as the task shapers see it (`tasks.outputs.ResultSink`)."""

    __slots__ = ("service",)

    def __init__(self, service: InferenceService) -> None:
        self.service = service

    @property
    def inline_max_bytes(self) -> int:
        return self.service.settings.results.inline_max_bytes

    async def put(self, data: bytes, suffix: str) -> str:
        return await self.service.results.put(new_key(suffix), data)


async def _wait(
    future: asyncio.Future[Completed], timeout: float, disconnected: asyncio.Future[Any] | None
) -> Completed | None:
    """The result, or None when the deadline passed or the client went away first."""
    if timeout <= 0:
        return None
    if disconnected is None:
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            return None
    # Whichever comes first: the result, the client leaving, the deadline. Plain callbacks
    # rather than asyncio.wait, which costs several times more per request.
    watcher = disconnected
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    future.add_done_callback(wake)
    watcher.add_done_callback(wake)
    timer = loop.call_later(timeout, wake)
    try:
        await waiter
    finally:
        timer.cancel()
        future.remove_done_callback(wake)
        watcher.remove_done_callback(wake)
    if future.done():
        return future.result()
    return None
