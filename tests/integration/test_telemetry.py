"""Spans and metrics of the service layer over both runners: the spans a request
yields (checked with OpenTelemetry's in-memory exporter), the worker's stats message, and
the counters the scheduler and manager record."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from modelmora.config import Settings
from modelmora.errors import ModelMoraError
from modelmora.lifecycle.manager import ModelManager
from modelmora.observability.metrics import Metrics
from modelmora.observability.tracing import SpanRecorder, build_span_recorder, current_parent_span
from modelmora.registry.installer import InstallRequest, install
from modelmora.registry.store import RegistryStore
from modelmora.services.inference import InferenceService
from tests.conftest import make_fake_model
from tests.runners import RUNNER_KINDS, RecordingFactory

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = 0x00F067AA0BA902B7


@pytest.fixture(params=RUNNER_KINDS)
async def served(
    settings: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[InferenceService, ModelManager, InMemorySpanExporter]]:
    store = RegistryStore(settings.database_url)
    store.create_schema()
    install(settings, store, InstallRequest(source=str(make_fake_model(tmp_path / "f")), name="fake"))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    manager = ModelManager(settings, store, RecordingFactory(request.param), metrics=Metrics())
    yield InferenceService(settings, manager, spans=SpanRecorder(provider)), manager, exporter
    await manager.shutdown()
    store.close()


async def test_a_request_exports_request_queue_and_inference_spans_in_its_trace(
    served: tuple[InferenceService, ModelManager, InMemorySpanExporter],
) -> None:
    svc, _, exporter = served
    token = current_parent_span.set(PARENT)  # as the edge sets it from a traceparent
    try:
        response = await svc.infer("fake", {"text": ["a", "b"]}, trace_id=TRACE)
    finally:
        current_parent_span.reset(token)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"modelmora.request", "modelmora.queue", "modelmora.inference"}
    request, queue, inference = (
        spans["modelmora.request"],
        spans["modelmora.queue"],
        spans["modelmora.inference"],
    )
    for span in spans.values():
        assert span.context is not None and f"{span.context.trace_id:032x}" == TRACE
    assert request.parent is not None and request.parent.span_id == PARENT and request.kind is SpanKind.SERVER
    assert request.context is not None
    assert queue.parent is not None and queue.parent.span_id == request.context.span_id
    assert inference.parent is not None and inference.parent.span_id == request.context.span_id
    assert request.attributes is not None and request.attributes["modelmora.model"] == "fake"
    assert inference.attributes is not None
    assert inference.attributes["modelmora.batch_size"] == response["metadata"]["batch_size"] == 2
    assert request.start_time is not None and request.end_time is not None
    assert queue.start_time is not None and queue.end_time is not None and inference.end_time is not None
    assert request.start_time <= queue.start_time <= queue.end_time <= inference.end_time == request.end_time


async def test_a_failed_request_exports_an_error_span(
    served: tuple[InferenceService, ModelManager, InMemorySpanExporter],
) -> None:
    svc, _, exporter = served
    with pytest.raises(ModelMoraError):
        await svc.infer("fake", {"text": "fail: on purpose"}, trace_id=TRACE)
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "modelmora.request"]
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None and span.attributes["modelmora.error_code"] == "INFERENCE_FAILED"


async def test_a_refused_request_exports_an_error_span(
    served: tuple[InferenceService, ModelManager, InMemorySpanExporter],
) -> None:
    """Refused before it was queued (unknown model, bad input): still one request span, so a
    caller's trace shows the server's answer."""
    svc, _, exporter = served
    with pytest.raises(ModelMoraError):
        await svc.infer("ghost", {"text": "x"}, trace_id=TRACE)
    with pytest.raises(ModelMoraError):
        await svc.infer("fake", {"text": ""}, parameters={"nope": 1}, trace_id=TRACE)
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["modelmora.request"] * 2
    assert [s.attributes["modelmora.error_code"] for s in spans if s.attributes] == [
        "MODEL_NOT_FOUND",
        "VALIDATION_ERROR",
    ]
    assert [s.attributes["modelmora.model"] for s in spans if s.attributes] == ["ghost", "fake"]
    assert all(s.status.status_code is StatusCode.ERROR for s in spans)
    assert all(s.context is not None and f"{s.context.trace_id:032x}" == TRACE for s in spans)


async def test_metrics_and_worker_stats(
    served: tuple[InferenceService, ModelManager, InMemorySpanExporter],
) -> None:
    svc, manager, _ = served
    for i in range(3):
        await svc.infer("fake", {"text": f"t{i}"})
    m = manager.metrics
    ok = m.requests.labels("fake", "txt2embed", "internal", "ok", "")._value.get()
    assert ok == 3
    assert m.loads.labels("fake", "success")._value.get() == 1
    await manager.poll_stats()
    stats = manager.slots["fake"].stats
    assert stats is not None and stats.batches >= 3 and stats.items >= 3
    await manager.unload("fake")
    assert m.unloads.labels("fake", "requested")._value.get() == 1


def test_tracing_is_off_without_an_endpoint() -> None:
    assert build_span_recorder(None, "modelmora") is None
    assert build_span_recorder("", "modelmora") is None
