"""Spans leave a real server over OTLP/HTTP: a stand-in collector (an HTTP server decoding
what arrives with OpenTelemetry's own protobuf messages) receives the request, queue and
inference spans of a REST and a gRPC call, each in the caller's trace."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from modelmora.v1 import modelmora_pb2_grpc as pb_grpc
from modelmora.v1.convert import build_request
from tests.conftest import make_fake_model
from tests.e2e.conftest import Server, clean_env, cli, start_server

REST_TRACE, REST_PARENT = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
GRPC_TRACE, GRPC_PARENT = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


class Collector(ThreadingHTTPServer):
    """Keeps every span posted to /v1/traces, with its resource's attributes."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spans: list[tuple[dict[str, Any], Any]] = []
        self.paths: list[str] = []
        self.lock = threading.Lock()

    def by_trace(self, trace_id: str) -> dict[str, tuple[dict[str, Any], Any]]:
        with self.lock:
            return {s.name: (res, s) for res, s in self.spans if s.trace_id.hex() == trace_id}


class _Handler(BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:  # the name http.server calls
        body = self.rfile.read(int(self.headers["Content-Length"]))
        message = ExportTraceServiceRequest.FromString(body)
        with self.server.lock:
            self.server.paths.append(self.path)
            for resource_spans in message.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    self.server.spans.extend((resource, span) for span in scope.spans)
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def traced_server(module_tmp: Path, collector: Collector) -> Iterator[Server]:
    data = module_tmp / "data"
    cli(clean_env(data), "install", str(make_fake_model(module_tmp / "fake")))
    srv = start_server(
        data,
        module_tmp / "server.log",
        MODELMORA_TELEMETRY__OTLP_ENDPOINT=f"http://127.0.0.1:{collector.server_address[1]}",
        MODELMORA_TELEMETRY__SERVICE_NAME="modelmora-e2e",
    )
    yield srv
    srv.stop()


def _wait_for(collector: Collector, trace_id: str, names: set[str]) -> dict[str, tuple[dict[str, Any], Any]]:
    """The batching span processor sends within seconds; wait for the spans of one trace."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        spans = collector.by_trace(trace_id)
        if names <= set(spans):
            return spans
        time.sleep(0.2)
    raise AssertionError(f"spans of {trace_id} not exported: {sorted(collector.by_trace(trace_id))}")


def test_rest_and_grpc_calls_export_their_spans_over_otlp(
    traced_server: Server, collector: Collector
) -> None:
    rest = traced_server.client.post(
        "/infer/fake",
        json={"text": ["a", "b"]},
        headers={"traceparent": f"00-{REST_TRACE}-{REST_PARENT}-01"},
    )
    assert rest.status_code == 200, rest.text
    with grpc.insecure_channel(f"127.0.0.1:{traced_server.grpc_port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        stub.Infer(
            build_request("fake", {"text": "c"}),
            metadata=(("traceparent", f"00-{GRPC_TRACE}-{GRPC_PARENT}-01"),),
        )
    missing = traced_server.client.post(
        "/infer/ghost", json={"text": "x"}, headers={"traceparent": f"00-{'1' * 32}-{'2' * 16}-01"}
    )
    assert missing.status_code == 404

    names = {"modelmora.request", "modelmora.queue", "modelmora.inference"}
    for trace_id, parent in ((REST_TRACE, REST_PARENT), (GRPC_TRACE, GRPC_PARENT)):
        spans = _wait_for(collector, trace_id, names)
        resource, request = spans["modelmora.request"]
        assert resource["service.name"] == "modelmora-e2e"
        assert request.parent_span_id.hex() == parent  # the caller's span
        for child in ("modelmora.queue", "modelmora.inference"):
            assert spans[child][1].parent_span_id == request.span_id
            assert request.start_time_unix_nano <= spans[child][1].start_time_unix_nano
            assert spans[child][1].end_time_unix_nano <= request.end_time_unix_nano
        attributes = {a.key: a.value for a in request.attributes}
        assert attributes["modelmora.model"].string_value == "fake"
    batch = {a.key: a.value.int_value for a in spans["modelmora.inference"][1].attributes}
    assert batch["modelmora.batch_size"] >= 1

    # A request refused before it ran is one span, marked as an error with its code.
    failed = _wait_for(collector, "1" * 32, {"modelmora.request"})
    assert set(failed) == {"modelmora.request"}
    span = failed["modelmora.request"][1]
    assert span.status.code == span.status.STATUS_CODE_ERROR
    assert {a.key: a.value.string_value for a in span.attributes}["modelmora.error_code"] == "MODEL_NOT_FOUND"
    assert set(collector.paths) == {"/v1/traces"}
