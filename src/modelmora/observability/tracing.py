"""Trace ids: taken from a W3C `traceparent` header when present, else generated."""

from __future__ import annotations

import contextlib
import logging
import random
import re
import time
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

current_trace_id: ContextVar[str | None] = ContextVar("trace_id", default=None)


def new_trace_id() -> str:
    # Not a secret, just unique: the PRNG is several times cheaper than os.urandom per request.
    return f"{random.getrandbits(128):032x}"


def trace_id_from(traceparent: str | None) -> str:
    """The trace id of a valid traceparent (version 00, non-zero ids), else a new one."""
    if traceparent:
        match = _TRACEPARENT.match(traceparent.strip().lower())
        if match and match.group(1) != "0" * 32 and match.group(2) != "0" * 16:
            return match.group(1)
    return new_trace_id()


def traceparent_for(trace_id: str) -> str:
    """A traceparent for the response, naming a fresh span of ours in the caller's trace."""
    return f"00-{trace_id}-{random.getrandbits(64):016x}-01"


# -- OpenTelemetry spans (optional) -------------------------------------------------------------
#
# Off by default and free when off: `spans` stays None and every call site checks that one
# attribute. When `telemetry.otlp_endpoint` is set (and the `otel` extra is installed), each
# inference request yields a span tree in the request's own trace (the traceparent's trace id):
#
#   modelmora.request            received -> answered (model, task, status, error code)
#     modelmora.queue            queued -> its batch left for the worker
#     modelmora.inference        the batch's compute in the worker (batch size)
#
# The spans are built when the request ends, from the timings the scheduler measured, so the
# hot path holds no span objects and takes no locks for them.

current_parent_span: ContextVar[int | None] = ContextVar("parent_span", default=None)


def parent_span_from(traceparent: str | None) -> int | None:
    """The caller's span id in a valid traceparent (our request span's parent), else None."""
    if traceparent:
        match = _TRACEPARENT.match(traceparent.strip().lower())
        if match and match.group(1) != "0" * 32 and match.group(2) != "0" * 16:
            return int(match.group(2), 16)
    return None


class SpanRecorder:
    """Turns a finished request's timings into OpenTelemetry spans."""

    def __init__(self, tracer_provider: Any) -> None:
        self.provider = tracer_provider
        self.tracer = tracer_provider.get_tracer("modelmora")

    def request(
        self,
        *,
        trace_id: str | None,
        received_ago_s: float,
        queue_s: float,
        inference_s: float,
        attributes: dict[str, Any],
        error_code: str | None = None,
    ) -> None:
        """Spans of one request that ended now and started `received_ago_s` ago."""
        from opentelemetry import trace
        from opentelemetry.trace import (
            NonRecordingSpan,
            SpanContext,
            SpanKind,
            Status,
            StatusCode,
            TraceFlags,
        )

        end = time.time_ns()
        start = end - int(received_ago_s * 1e9)
        context = None
        if trace_id is not None:
            parent = SpanContext(
                trace_id=int(trace_id, 16),
                span_id=current_parent_span.get() or random.getrandbits(64) or 1,
                is_remote=True,
                trace_flags=TraceFlags(TraceFlags.SAMPLED),
            )
            context = trace.set_span_in_context(NonRecordingSpan(parent))
        span = self.tracer.start_span(
            "modelmora.request",
            context=context,
            kind=SpanKind.SERVER,
            start_time=start,
            attributes=attributes,
        )
        if error_code is not None:
            span.set_attribute("modelmora.error_code", error_code)
            span.set_status(Status(StatusCode.ERROR, error_code))
        else:
            inner = trace.set_span_in_context(span)
            batch_start = end - int(inference_s * 1e9)
            queue_start = max(start, batch_start - int(queue_s * 1e9))
            model = attributes.get("modelmora.model", "")
            q = self.tracer.start_span(
                "modelmora.queue",
                context=inner,
                start_time=queue_start,
                attributes={"modelmora.model": model},
            )
            q.end(end_time=batch_start)
            batch_attrs = {
                "modelmora.model": model,
                "modelmora.batch_size": attributes.get("modelmora.batch_size", 0),
            }
            b = self.tracer.start_span(
                "modelmora.inference", context=inner, start_time=batch_start, attributes=batch_attrs
            )
            b.end(end_time=end)
        span.end(end_time=end)

    def interval(
        self,
        name: str,
        start_ns: int,
        end_ns: int,
        attributes: dict[str, Any],
        *,
        events: Sequence[tuple[str, int, dict[str, Any]]] = (),
        error_code: str | None = None,
    ) -> None:
        """One span of work outside a request (a model's files fetched for its load), in a
        trace of its own; `events`: (name, time ns, attributes) along the way."""
        from opentelemetry.trace import Status, StatusCode

        span = self.tracer.start_span(name, start_time=start_ns, attributes=attributes)
        for event_name, at, attrs in events:
            span.add_event(event_name, attrs, timestamp=at)
        if error_code is not None:
            span.set_attribute("modelmora.error_code", error_code)
            span.set_status(Status(StatusCode.ERROR, error_code))
        span.end(end_time=end_ns)

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.provider.shutdown()


def build_span_recorder(otlp_endpoint: str | None, service_name: str) -> SpanRecorder | None:
    """A recorder exporting over OTLP/HTTP to `otlp_endpoint`, or None when tracing is off
    or the `otel` extra is not installed (then a warning says so, once, at start)."""
    if not otlp_endpoint:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        logging.getLogger("modelmora.tracing").warning(
            "telemetry.otlp_endpoint is set but OpenTelemetry is not installed: "
            "pip install 'modelmora[otel]'; traces are off"
        )
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    endpoint = otlp_endpoint.rstrip("/")
    if not endpoint.endswith("/v1/traces"):
        endpoint += "/v1/traces"
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return SpanRecorder(provider)
