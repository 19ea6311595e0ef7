"""Issue 14's "Found" list replayed against `modelmora serve`: the items no test on main
replays yet are here; the others are named with the test that replays them.

1. No authentication (installs from server paths and internal URLs, adapter swaps, file
   probing, other callers' jobs and idempotency keys, gRPC admin calls): branch auth1 and
   auth2, srcpolicy -- tests/e2e/test_auth.py (401 without a key on JSON, multipart, SSE, the
   short paths and gRPC; scopes; expired and revoked keys; public bind; TLS),
   tests/e2e/test_install_sources.py (/proc/self/environ, internal URLs, the fake adapter and
   `fail_health_if_exists`, the same over gRPC), tests/integration/test_job_ownership.py
   (jobs, results and idempotency keys per caller, REST and gRPC), tests/integration/test_audit.py.
2. Image decompression bombs: tests/unit/test_image_bounds.py (header checks),
   tests/integration/test_worker_bounds.py::test_the_worker_refuses_image_bombs_from_their_headers
   (the worker); the attack as sent to a server: here.
3. 80,000 empty multipart parts: tests/e2e/test_edge_limits.py::
   test_80000_empty_parts_are_refused_at_the_cap_without_reading_the_rest and
   ::test_health_answers_while_a_big_multipart_body_is_parsed.
4. Damaged weights served: branch weights -- tests/integration/test_verified_weights.py.
5. No read timeouts, unbounded buffering: tests/e2e/test_edge_limits.py (a silent connection,
   partial headers, partial bodies, idle keep-alive, total buffered bytes),
   tests/unit/test_edge_body.py.
6. A timed-out request keeps computing: branch weights -- tests/integration/test_worker_bounds.py.
7. 500s from the fuzzer (`page=9223372036854775807`): tests/e2e/test_edge_limits.py::
   test_page_bounds_are_validation_errors and the fuzz step itself (tests/fuzz); the gRPC
   listings' pages, and integers past 64 bits in free-form objects (found by the fuzz step:
   stored in a model, they made every later read of the catalog a 500): here.
8. Smaller ones:
   - `"priority": true`, `keep_alive: Infinity` over REST: tests/e2e/test_edge_limits.py::
     test_non_strict_bodies_are_refused_before_anything_runs, ::test_multipart_fields_are_typed_strictly,
     tests/unit/test_strict_input.py; the short path and the same over gRPC (whose doubles
     carry NaN and the infinities, and whose NaN timeout was an INTERNAL error): here;
   - archives without a size limit: tests/integration/test_archive_limits.py;
   - uvicorn's protocol errors as plain text: tests/e2e/test_edge_limits.py::
     test_malformed_http_gets_400_in_the_error_shape, ::test_oversized_headers_get_413_in_the_error_shape,
     ::test_partial_headers_get_408_then_the_connection_closes;
   - a worker started as the spare keeps `--name <spare>` in its command line: here;
   - docs marking `INVALID_IMAGE` and `limits.max_image_*` as not used: here.
"""

from __future__ import annotations

import base64
import io
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from modelmora.errors import ErrorCode
from modelmora.v1 import modelmora_pb2 as pb
from modelmora.v1 import modelmora_pb2_grpc as pb_grpc
from tests.conftest import make_fake_model
from tests.e2e.conftest import Server, clean_env, cli, start_server

ROOT = Path(__file__).resolve().parents[2]
UINT32_MAX = 2**32 - 1


def bomb_png(side: int = 6320) -> bytes:
    """The issue's bomb: a few KB of 1-bit PNG, under the 40 MP limit, ~120 MB once RGB."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("1", (side, side)).save(out, format="PNG", optimize=True)
    return out.getvalue()


def image_model(folder: Path) -> Path:
    """An img2embed model with no weights: a request that reached a worker would fail its load."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "modelmora.json").write_text(json.dumps({"task_type": "img2embed"}), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def server(module_tmp: Path) -> Iterator[Server]:
    data = module_tmp / "data"
    env = clean_env(data)
    cli(env, "install", str(make_fake_model(module_tmp / "fake")))
    cli(env, "install", str(image_model(module_tmp / "pictures")))
    srv = start_server(data, module_tmp / "server.log", MODELMORA_LIFECYCLE__LOAD_RETRIES="0")
    yield srv
    srv.stop()


def _model(srv: Server, name: str) -> dict[str, Any]:
    models = srv.client.get("/api/v1/status").json()["models"]
    return next((m for m in models if m["name"] == name), {})


def _error(reply: Any) -> dict[str, Any]:
    body: dict[str, Any] = reply.json()
    assert set(body) == {"error_code", "message", "details", "trace_id"}, body
    assert ErrorCode(body["error_code"]).http_status == reply.status_code, body
    return body


# -- item 2: image decompression bombs ----------------------------------------------------------


def test_item2_image_bombs_are_refused_from_their_headers_before_any_worker(server: Server) -> None:
    bomb = bomb_png()
    assert len(bomb) < 6_000
    one = {"input_data": {"image": base64.b64encode(bomb).decode()}}
    ten = {"input_data": {"image": [base64.b64encode(bomb).decode()] * 10}}
    for body in (one, ten):
        reply = server.client.post("/api/v1/infer/pictures", json=body)
        assert reply.status_code == 422, reply.text
        error = _error(reply)
        assert error["error_code"] == "INVALID_IMAGE"
        assert error["details"]["field"] in ("input_data.image", "input_data.image[0]")
        assert error["details"]["decoded_bytes"] == 6320 * 6320 * 3
    # The same as an upload, on the multipart fast path.
    files = [("image", (f"b{i}.png", bomb, "image/png")) for i in range(10)]
    reply = server.client.post("/api/v1/infer/pictures", files=files)
    assert reply.status_code == 422, reply.text
    assert _error(reply)["error_code"] == "INVALID_IMAGE"
    # Refused in the server from the headers: no worker was started, no load was tried.
    assert _model(server, "pictures").get("pid") is None
    assert server.client.get("/api/v1/models/pictures").json()["state"] == "registered"


# -- item 7: the gRPC listings' pages -----------------------------------------------------------


def test_item7_grpc_pages_at_their_limits_are_answered_never_internal(server: Server) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        inference = pb_grpc.InferenceServiceStub(channel)
        registry = pb_grpc.RegistryServiceStub(channel)
        calls: list[tuple[Any, Any]] = [
            (inference.ListJobs, pb.ListJobsRequest(page=UINT32_MAX, page_size=UINT32_MAX)),
            (inference.ListJobs, pb.ListJobsRequest(page=UINT32_MAX, page_size=1000)),
            (registry.ListModels, pb.ListModelsRequest(page=UINT32_MAX, page_size=UINT32_MAX)),
            (registry.ListModels, pb.ListModelsRequest(page=UINT32_MAX, page_size=500)),
        ]
        for method, request in calls:
            try:
                reply = method(request, timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT, (request, exc.details())
            else:
                assert list(reply.data) == [] and reply.meta.page == UINT32_MAX


def test_item7_integers_past_64_bits_are_refused_not_stored(server: Server) -> None:
    """Found by the fuzz step: stored in a model's `resource_requirements`, such an integer
    made every later read of the catalog a 500 (orjson writes no integer past 64 bits)."""
    huge = b"-61453399564001668525384141360857088"
    for method, path, body, field in (
        (
            "PUT",
            "/api/v1/models/fake",
            b'{"resource_requirements": {"a": {"b": %s}}}' % huge,
            "resource_requirements",
        ),
        ("PUT", "/api/v1/models/fake", b'{"config": {"parameters": {"n": %s}}}' % huge, "config"),
        (
            "POST",
            "/api/v1/infer/fake",
            b'{"input_data": {"text": "a"}, "parameters": {"n": %s}}' % huge,
            "parameters",
        ),
        (
            "POST",
            "/api/v1/infer/fake/async",
            b'{"input_data": {"text": "a", "n": [%s]}}' % huge,
            "input_data",
        ),
        # The short form's inputs (NaN there was a 500 too, found once the full request was built).
        ("POST", "/infer/fake", b'{"text": [[null, %s]]}' % huge, "text"),
        ("POST", "/infer/fake", b'{"text": ["a", NaN]}', "text"),
        ("POST", "/infer/fake", b'{"image": [{"x": %s}], "stream": true}' % huge, "image"),
    ):
        reply = server.client.request(
            method, path, content=body, headers={"content-type": "application/json"}
        )
        assert reply.status_code == 422, (path, reply.text)
        assert _error(reply)["details"]["errors"][0]["field"] == field
    for path in ("/api/v1/models", "/api/v1/models/fake", "/health/models", "/api/v1/jobs"):
        assert server.client.get(path).status_code == 200, path
    # The largest 64-bit integers still pass.
    reply = server.client.put(
        "/api/v1/models/fake", json={"resource_requirements": {"n": 2**63 - 1, "m": -(2**63)}}
    )
    assert reply.status_code == 200, reply.text
    assert server.client.get("/api/v1/models").status_code == 200


# -- item 8: strict numbers and priorities on the gRPC door -------------------------------------


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"keep_alive": math.inf}, "keep_alive"),
        ({"keep_alive": math.nan}, "keep_alive"),
        ({"keep_alive": -5.0}, "keep_alive"),
        ({"timeout_seconds": math.nan}, "timeout_seconds"),  # was INTERNAL (a ValueError)
        ({"timeout_seconds": -1.0}, "timeout_seconds"),  # was DEADLINE_EXCEEDED at once
        ({"timeout_seconds": 0.0}, "timeout_seconds"),  # present (`optional`), as REST's 0: refused
        ({"priority": "true"}, "priority"),
    ],
)
def test_item8_grpc_refuses_what_the_rest_schema_refuses(
    server: Server, fields: dict[str, Any], field: str
) -> None:
    request = pb.InferRequest(model="fake", input=pb.Input(text="a"), **fields)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        inference = pb_grpc.InferenceServiceStub(channel)
        for method, message in (
            (inference.Infer, request),
            (inference.InferAsync, pb.InferAsyncRequest(request=request)),
        ):
            with pytest.raises(grpc.RpcError) as err:
                method(message, timeout=60)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert field in (err.value.details() or ""), err.value.details()


def test_item8_the_short_form_refuses_an_infinite_keep_alive(server: Server) -> None:
    """The issue's spelling, `Infinity`, which both JSON parsers read, on the short path (the
    full paths: tests/e2e/test_edge_limits.py)."""
    body = b'{"text": "a", "keep_alive": Infinity}'
    reply = server.client.post("/infer/fake", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 422, reply.text
    assert _error(reply)["details"]["errors"][0]["field"] == "keep_alive"


# -- item 8: the spare's command line ------------------------------------------------------------


def test_item8_a_worker_started_as_the_spare_names_no_other_model(module_tmp: Path, minilm_dir: Path) -> None:
    data = module_tmp / "spare-data"
    cli(clean_env(data), "install", "sentence-transformers/all-MiniLM-L6-v2", "--from", str(minilm_dir))
    srv = start_server(data, module_tmp / "spare.log", MODELMORA_RESOURCES__WORKER_START="spare")
    try:
        spare = _ready_spare(srv)
        reply = srv.client.post("/api/v1/infer/all-MiniLM-L6-v2", json={"input_data": {"text": "hello"}})
        assert reply.status_code == 200, reply.text
        assert _model(srv, "all-MiniLM-L6-v2")["pid"] == spare  # the spare became the worker
        cmdline = Path(f"/proc/{spare}/cmdline").read_bytes().split(b"\0")
        assert b"modelmora.lifecycle.worker" in cmdline
        assert not any(b"spare" in arg for arg in cmdline), cmdline
    finally:
        srv.stop()


def _ready_spare(srv: Server) -> int:
    deadline = time.monotonic() + 120
    spare: dict[str, Any] = {}
    while time.monotonic() < deadline:
        spare = srv.client.get("/api/v1/status").json()["memory"]["spare"]
        if spare.get("ready") and spare.get("pid"):
            assert spare["kind"] == "spare", spare
            return int(spare["pid"])
        time.sleep(0.05)
    raise AssertionError(f"no warm spare: {spare}")


# -- item 8: docs -------------------------------------------------------------------------------


def test_item8_docs_describe_the_image_checks_as_enforced() -> None:
    not_used = re.compile(r"not (yet )?(used|enforced|raised|checked)|unused|reserved", re.IGNORECASE)
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    rows = [line for line in api.splitlines() if line.startswith("| `INVALID_IMAGE`")]
    assert len(rows) == 1 and not not_used.search(rows[0]), rows
    configuration = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    rows = [line for line in configuration.splitlines() if line.startswith("| `max_image_")]
    assert {row.split("`")[1] for row in rows} >= {"max_image_bytes", "max_image_pixels"}, rows
    assert not any(not_used.search(row) for row in rows), rows
