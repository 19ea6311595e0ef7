"""Metrics, status and the Grafana dashboard against a real `modelmora serve`: scrape
`/metrics` before and after real traffic (REST fast path, the FastAPI routes, gRPC, errors,
a concurrent burst) and check that the values moved as they should."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelmora.v1 import modelmora_pb2 as pb
from modelmora.v1 import modelmora_pb2_grpc as pb_grpc
from modelmora.v1.convert import build_request
from tests.e2e.conftest import Server, cli

MODEL = "all-MiniLM-L6-v2"
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "modelmora.json"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: Server, path: str = "/metrics") -> tuple[str, Samples]:
    response = server.client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return response.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture(scope="module")
def grpc_stub(server: Server) -> Iterator[pb_grpc.InferenceServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield pb_grpc.InferenceServiceStub(channel)


@pytest.fixture(scope="module")
def traffic(server: Server, grpc_stub: pb_grpc.InferenceServiceStub) -> tuple[Samples, Samples, str]:
    """Scrape, send known traffic, scrape again."""
    warm = server.client.post(f"/infer/{MODEL}", json={"text": "warm up"})  # loads the model
    assert warm.status_code == 200
    _, before = scrape(server)
    for i in range(5):  # the ASGI fast path, short form
        assert server.client.post(f"/infer/{MODEL}", json={"text": f"hello {i}"}).status_code == 200
    for i in range(2):  # the fast path, full form
        body = {"input_data": {"text": f"full {i}"}}
        assert server.client.post(f"/api/v1/infer/{MODEL}", json=body).status_code == 200
    for i in range(3):
        grpc_stub.Infer(build_request(MODEL, {"text": f"grpc {i}"}))
    with pytest.raises(grpc.RpcError) as missing:
        grpc_stub.Infer(build_request("no-such-model", {"text": "x"}))
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        pb_grpc.RegistryServiceStub(channel).ListModels(pb.ListModelsRequest())
    assert server.client.post("/infer/no-such-model", json={"text": "x"}).status_code == 404
    assert server.client.post(f"/infer/{MODEL}", json={"text": "x" * 6000}).status_code == 422

    def one(i: int) -> int:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            return c.post(f"/infer/{MODEL}", json={"text": f"burst {i}"}).status_code

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(24))) == [200] * 24
    text, after = scrape(server)
    return before, after, text


def test_request_counts_moved(traffic: tuple[Samples, Samples, str]) -> None:
    before, after, _ = traffic
    ok = {"model": MODEL, "task": "txt2embed", "status": "ok"}
    assert delta(before, after, "modelmora_requests_total", protocol="rest", **ok) == 5 + 2 + 24
    assert delta(before, after, "modelmora_requests_total", protocol="grpc", **ok) == 3
    missing = {"model": "", "error_code": "MODEL_NOT_FOUND"}
    assert delta(before, after, "modelmora_requests_total", protocol="rest", **missing) == 1
    assert delta(before, after, "modelmora_requests_total", protocol="grpc", **missing) == 1
    assert delta(before, after, "modelmora_requests_total", model=MODEL, error_code="INPUT_TOO_LONG") == 1
    # Every door counts its own answers too.
    assert delta(before, after, "modelmora_http_requests_total", handler="infer", code="200") == 31
    assert delta(before, after, "modelmora_http_requests_total", handler="infer", code="404") == 1
    grpc_calls = "modelmora_grpc_requests_total"
    assert delta(before, after, grpc_calls, method="Infer", code="OK") == 3
    assert delta(before, after, grpc_calls, method="Infer", code="NOT_FOUND") == 1
    assert delta(before, after, grpc_calls, method="ListModels", code="OK") == 1
    assert delta(before, after, grpc_calls) == 5  # health checks and reflection are not counted


def test_latency_histograms_moved(traffic: tuple[Samples, Samples, str]) -> None:
    before, after, _ = traffic
    labels = {"model": MODEL, "task": "txt2embed"}
    for name in ("request_duration", "request_queue", "request_inference"):
        count = f"modelmora_{name}_seconds_count"
        assert delta(before, after, count, **labels) == 34, name
        # All 34 fell in the buckets up to 300 s (and so in +Inf), none went missing.
        assert delta(before, after, f"modelmora_{name}_seconds_bucket", le="300.0", **labels) == 34
        assert delta(before, after, f"modelmora_{name}_seconds_bucket", le="+Inf", **labels) == 34
    assert delta(before, after, "modelmora_request_duration_seconds_sum", **labels) > 0
    # Batches: at least one per 8 concurrent requests, each with at least one input.
    batches = delta(before, after, "modelmora_batch_size_count", model=MODEL)
    assert 1 <= batches <= 34
    assert delta(before, after, "modelmora_batch_size_sum", model=MODEL) == 34


def test_worker_figures_arrive_over_the_channel(traffic: tuple[Samples, Samples, str]) -> None:
    before, after, _ = traffic
    batches = delta(before, after, "modelmora_batch_size_count", model=MODEL)
    for stage in ("preprocess", "forward", "postprocess"):
        assert (
            delta(before, after, "modelmora_worker_batch_seconds_count", model=MODEL, stage=stage) == batches
        )
    assert delta(before, after, "modelmora_worker_items_total", model=MODEL, outcome="ok") == 34
    assert value(after, "modelmora_worker_rss_bytes", model=MODEL) > 50 << 20


def test_state_gauges_after_the_load(traffic: tuple[Samples, Samples, str]) -> None:
    _, after, _ = traffic
    assert value(after, "modelmora_queue_depth", model=MODEL) == 0
    assert {ls for (n, ls) in after if n == "modelmora_queue_depth" and ("model", MODEL) in ls} == {
        frozenset({("model", MODEL), ("priority", p)}) for p in ("critical", "high", "normal", "low")
    }
    assert value(after, "modelmora_queued_requests") == 0
    assert value(after, "modelmora_model_state", model=MODEL, state="ready") == 1
    assert value(after, "modelmora_model_state", model=MODEL, state="failed") == 0
    assert value(after, "modelmora_models_loaded") >= 1
    assert value(after, "modelmora_model_loads_total", model=MODEL, result="success") >= 1
    assert value(after, "modelmora_model_load_duration_seconds_count", model=MODEL) >= 1
    assert value(after, "modelmora_system_memory_available_bytes") > 0
    assert value(after, "modelmora_memory_used_bytes") >= value(after, "modelmora_worker_rss_bytes")
    assert value(after, "modelmora_ready") == 1
    assert value(after, "modelmora_build_info") == 1


def test_failed_loads_are_counted(server: Server) -> None:
    _, before = scrape(server)
    assert server.client.post("/infer/broken", json={"text": "x"}).status_code == 503
    _, after = scrape(server)
    assert delta(before, after, "modelmora_model_loads_total", model="broken", result="failure") >= 1
    assert (
        delta(before, after, "modelmora_requests_total", model="broken", error_code="MODEL_LOAD_FAILED") == 1
    )
    assert value(after, "modelmora_model_state", model="broken", state="failed") == 1


def test_exposition_is_the_same_at_both_paths_and_well_formed(
    server: Server, traffic: tuple[Samples, Samples, str]
) -> None:
    _, text = scrape(server, "/api/v1/metrics")[0], traffic[2]
    names = {f.name for f in text_string_to_metric_families(text)}
    ours = {n for n in names if n.startswith("modelmora_")}
    assert len(ours) >= 30
    # Bounded labels: no request ids or trace ids anywhere.
    assert not re.search(r'="r\d+"', text) and not re.search(r'="[0-9a-f]{32}"', text)
    promtool = shutil.which("promtool")
    if promtool is None:
        assert not os.environ.get("MODELMORA_REQUIRE_PROMTOOL"), "CI must have promtool"
        pytest.skip("promtool not installed (Debian package prometheus; .ci/run installs it)")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_status_over_rest_cli_and_grpc(server: Server, traffic: tuple[Samples, Samples, str]) -> None:
    body = server.client.get("/api/v1/status").json()
    assert body["version"] and body["uptime_seconds"] > 0 and body["ready"] is True
    model = next(m for m in body["models"] if m["name"] == MODEL)
    assert model["state"] == "ready" and model["queued"] == 0 and model["memory"]["rss_bytes"] > 0
    assert body["workers"] >= 1 and isinstance(body["gpus"], list) and isinstance(body["jobs"], dict)
    assert body["memory"]["system_available_bytes"] > 0

    as_json = json.loads(cli(server.env, "--url", server.url, "status", "--json").stdout)
    assert {m["name"] for m in as_json["models"]} >= {MODEL}
    assert as_json["version"] == body["version"]
    table = cli({**server.env, "COLUMNS": "250"}, "--url", server.url, "status").stdout
    assert MODEL in table and "ready" in table and body["version"] in table

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        status = pb_grpc.ManagementServiceStub(channel).GetSystemStatus(pb.GetSystemStatusRequest())
    assert status.version == body["version"] and status.ready
    assert {m.name for m in status.models} == {m["name"] for m in body["models"]}
    assert dict(status.jobs) == body["jobs"] and len(status.gpus) == len(body["gpus"])
    assert status.started_at > 0


def test_grafana_dashboard_queries_existing_metrics(traffic: tuple[Samples, Samples, str]) -> None:
    text = traffic[2]
    # A family is exposed (HELP and TYPE) even while it has no series, e.g. the GPU figures
    # on a machine without a GPU: its name counts as existing.
    exposed = set()
    for family in text_string_to_metric_families(text):
        exposed.add(family.name)
        exposed.update(s.name for s in family.samples)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
        exposed.update(family.name + suffix for suffix in suffixes.get(family.type, ()))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    assert len(exprs) >= 10
    queried = {name for expr in exprs for name in re.findall(r"\b(modelmora_[a-z_]+)", expr)}
    missing = sorted(queried - exposed)
    assert not missing, f"the dashboard queries metrics the server does not expose: {missing}"
