"""Job ownership and per-caller idempotency keys, on a real ModelMora (fake model, in-process
worker) over both job stores: through the job service under each principal, through the REST
routes and through the gRPC door with its real auth interceptor.

The doors' key checks (the REST edge, the gRPC interceptor) are wired elsewhere; here a
small ASGI wrapper and a gRPC interceptor stand in for them and set `current_principal` from
a test header, which is all the job service reads.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from modelmora.app import ModelMora
from modelmora.auth.keys import (
    ANONYMOUS,
    Principal,
    Scope,
    current_client,
    current_principal,
)
from modelmora.config import Settings
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.lifecycle.runners import in_process_runner_factory
from modelmora.registry.installer import InstallRequest
from tests.conftest import make_fake_model
from tests.integration.test_job_store import REDIS_URL, redis_or_skip

ALICE = Principal("a1a1a1a1a1a1", "alice", frozenset({Scope.INFER}))
BOB = Principal("b2b2b2b2b2b2", "bob", frozenset({Scope.INFER}))
ADMIN = Principal("c3c3c3c3c3c3", "ops", frozenset({Scope.ADMIN}))
BODY = {"input_data": {"text": "hello"}}


@pytest.fixture(params=["sqlite", "redis"])
async def mm(request: pytest.FixtureRequest, settings: Settings, tmp_path: Path) -> AsyncIterator[ModelMora]:
    overrides: dict[str, Any] = {}
    prefix = f"mmtest-{uuid.uuid4().hex[:8]}:"
    if request.param == "redis":
        redis_or_skip()
        overrides = {"backend": "redis", "redis_url": REDIS_URL, "redis_prefix": prefix}
    settings = settings.model_copy(update={"jobs": settings.jobs.model_copy(update=overrides)})
    if request.param == "redis":
        # One replica: its results directory is trivially every replica's (results.shared).
        shared = settings.results.model_copy(update={"shared": True})
        settings = settings.model_copy(update={"results": shared})
    server = ModelMora(settings, in_process_runner_factory)
    await server.start()
    await server.registry.install(InstallRequest(source=str(make_fake_model(tmp_path / "fake")), name="fake"))
    try:
        yield server
    finally:
        if request.param == "redis":
            await server.job_store.reset()  # type: ignore[attr-defined]
        await server.stop()


async def as_(who: Principal, call: Callable[[], Awaitable[Any]]) -> Any:
    token = current_principal.set(who)
    try:
        return await call()
    finally:
        current_principal.reset(token)


async def not_found(who: Principal, call: Callable[[], Awaitable[Any]]) -> None:
    with pytest.raises(ModelMoraError) as err:
        await as_(who, call)
    assert err.value.code is ErrorCode.JOB_NOT_FOUND


async def finished(mm: ModelMora, who: Principal, job_id: str) -> None:
    """Poll the job's status (what a client observes) until it completed."""
    loop = asyncio.get_running_loop()
    end = loop.time() + 30
    while (await as_(who, lambda: mm.jobs.status(job_id)))["status"] != "completed":
        assert loop.time() < end, f"job {job_id} did not complete"
        await asyncio.sleep(0.01)


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "modelmora.audit"]


async def test_a_job_is_its_owners_and_admins_only(mm: ModelMora, caplog: pytest.LogCaptureFixture) -> None:
    jobs = mm.jobs
    mine, created = await as_(ALICE, lambda: jobs.submit("fake", BODY))
    assert created
    job_id = mine["job_id"]
    await finished(mm, ALICE, job_id)
    caplog.clear()
    with caplog.at_level(logging.INFO, "modelmora.audit"):
        # Another key sees nothing, exactly as for a job that does not exist.
        await not_found(BOB, lambda: jobs.status(job_id))
        await not_found(BOB, lambda: jobs.result(job_id))
        await not_found(BOB, lambda: jobs.result_chunks(job_id, 1024))
        await not_found(BOB, lambda: jobs.cancel(job_id))
        # Its owner reads it, without an audit line.
        assert (await as_(ALICE, lambda: jobs.result(job_id)))["result"]["embeddings"]
        assert audit_lines(caplog) == []
        # An admin reads it too, and that leaves one audit line per read.
        assert (await as_(ADMIN, lambda: jobs.status(job_id)))["status"] == "completed"
        result = await as_(ADMIN, lambda: jobs.result(job_id))
        assert result["result"]["embeddings"]
    lines = audit_lines(caplog)
    assert [(r.action, r.target, r.outcome, r.key_id) for r in lines] == [  # type: ignore[attr-defined]
        ("job.status", job_id, "ok", ADMIN.key_id),
        ("job.result", job_id, "ok", ADMIN.key_id),
    ]
    assert lines[0].details == {"owner": ALICE.key_id}  # type: ignore[attr-defined]
    # An admin cancelling another owner's finished job: audited with its error code.
    caplog.clear()
    with caplog.at_level(logging.INFO, "modelmora.audit"), pytest.raises(ModelMoraError):
        await as_(ADMIN, lambda: jobs.cancel(job_id))
    assert [r.outcome for r in audit_lines(caplog)] == ["JOB_FINISHED"]  # type: ignore[attr-defined]


async def test_cancel_by_the_owner_only(mm: ModelMora) -> None:
    await mm.dispatcher.stop()  # nothing runs: the job stays queued
    job, _ = await as_(ALICE, lambda: mm.jobs.submit("fake", BODY))
    await not_found(BOB, lambda: mm.jobs.cancel(job["job_id"]))
    assert (await as_(ALICE, lambda: mm.jobs.status(job["job_id"])))["status"] == "queued"
    assert (await as_(ALICE, lambda: mm.jobs.cancel(job["job_id"])))["status"] == "cancelled"


async def test_lists_are_per_caller_and_whole_for_admins(
    mm: ModelMora, caplog: pytest.LogCaptureFixture
) -> None:
    await mm.dispatcher.stop()
    a1, _ = await as_(ALICE, lambda: mm.jobs.submit("fake", BODY))
    a2, _ = await as_(ALICE, lambda: mm.jobs.submit("fake", BODY))
    b1, _ = await as_(BOB, lambda: mm.jobs.submit("fake", BODY))

    def ids(page: dict[str, Any]) -> set[str]:
        return {j["job_id"] for j in page["data"]}

    with caplog.at_level(logging.INFO, "modelmora.audit"):
        alice = await as_(ALICE, lambda: mm.jobs.list(None, None))
        assert ids(alice) == {a1["job_id"], a2["job_id"]} and alice["meta"]["total"] == 2
        assert ids(await as_(BOB, lambda: mm.jobs.list("queued", "fake"))) == {b1["job_id"]}
        own = await as_(ALICE, lambda: mm.jobs.list(None, None, owner=ALICE.owner))
        assert ids(own) == ids(alice)  # naming oneself is allowed
        assert audit_lines(caplog) == []
        with pytest.raises(ModelMoraError) as err:
            await as_(BOB, lambda: mm.jobs.list(None, None, owner=ALICE.owner))
        assert err.value.code is ErrorCode.FORBIDDEN
        everyone = await as_(ADMIN, lambda: mm.jobs.list(None, None))
        assert ids(everyone) == {a1["job_id"], a2["job_id"], b1["job_id"]}
        of_bob = await as_(ADMIN, lambda: mm.jobs.list("queued", None, owner=BOB.owner))
        assert ids(of_bob) == {b1["job_id"]}
        assert ids(await as_(ADMIN, lambda: mm.jobs.list(None, None, owner="nobody"))) == set()
    lines = audit_lines(caplog)
    assert [(r.action, r.target, r.details) for r in lines] == [  # type: ignore[attr-defined]
        ("jobs.list", "*", {"owners": sorted([ALICE.owner, BOB.owner]), "count": 3}),
        ("jobs.list", BOB.owner, {"owners": [BOB.owner], "count": 1}),
    ]
    # Auth off: the anonymous caller holds every scope and sees every job.
    assert ids(await as_(ANONYMOUS, lambda: mm.jobs.list(None, None))) == ids(everyone)


async def test_idempotency_keys_are_scoped_to_their_caller(mm: ModelMora) -> None:
    await mm.dispatcher.stop()
    key = f"order-{uuid.uuid4().hex}"
    mine, created = await as_(ALICE, lambda: mm.jobs.submit("fake", BODY, idempotency_key=key))
    assert created
    other_body = {"input_data": {"text": "something else"}}
    # Bob's equal key is his own: a new job, no 409, nothing of Alice's job in sight.
    theirs, created = await as_(BOB, lambda: mm.jobs.submit("fake", other_body, idempotency_key=key))
    assert created and theirs["job_id"] != mine["job_id"]
    replay, created = await as_(ALICE, lambda: mm.jobs.submit("fake", BODY, idempotency_key=key))
    assert not created and replay["job_id"] == mine["job_id"]
    with pytest.raises(ModelMoraError) as err:
        await as_(ALICE, lambda: mm.jobs.submit("fake", other_body, idempotency_key=key))
    assert err.value.code is ErrorCode.IDEMPOTENCY_CONFLICT
    assert err.value.details["job_id"] == mine["job_id"]


# -- the REST routes ----------------------------------------------------------------------------


def with_test_principals(app: Any, principals: dict[str, Principal]) -> Any:
    """Stands in for the edge's key check: `x-test-key: alice` runs the call as ALICE."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers") or [])
        who = principals.get(headers.get(b"x-test-key", b"").decode(), ANONYMOUS)
        principal, client = current_principal.set(who), current_client.set("127.0.0.1:1")
        try:
            await app(scope, receive, send)
        finally:
            current_client.reset(client)
            current_principal.reset(principal)

    return wrapped


async def test_rest_routes_apply_ownership(mm: ModelMora) -> None:
    from modelmora.api.rest import asgi_app

    await mm.dispatcher.stop()
    app = with_test_principals(asgi_app(mm), {"alice": ALICE, "bob": BOB, "admin": ADMIN})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://mm") as http:

        def as_key(name: str, key: str | None = None) -> dict[str, str]:
            return {"x-test-key": name, **({"Idempotency-Key": key} if key else {})}

        submitted = await http.post("/api/v1/infer/fake/async", json=BODY, headers=as_key("alice", "k-1"))
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["job_id"]
        for method, path in (
            ("GET", f"/api/v1/jobs/{job_id}"),
            ("GET", f"/api/v1/jobs/{job_id}/result"),
            ("DELETE", f"/api/v1/jobs/{job_id}"),
        ):
            answer = await http.request(method, path, headers=as_key("bob"))
            assert answer.status_code == 404 and answer.json()["error_code"] == "JOB_NOT_FOUND", path
        assert (await http.get(f"/api/v1/jobs/{job_id}", headers=as_key("alice"))).status_code == 200
        # Bob's equal Idempotency-Key: his own new job, not a 409 naming Alice's.
        other = {"input_data": {"text": "other"}}
        bobs = await http.post("/api/v1/infer/fake/async", json=other, headers=as_key("bob", "k-1"))
        assert bobs.status_code == 202 and bobs.json()["job_id"] != job_id
        assert "idempotent-replayed" not in bobs.headers
        listed = await http.get("/api/v1/jobs", headers=as_key("bob"))
        assert [j["job_id"] for j in listed.json()["data"]] == [bobs.json()["job_id"]]
        of_alice = await http.get("/api/v1/jobs", params={"owner": ALICE.owner}, headers=as_key("admin"))
        assert [j["job_id"] for j in of_alice.json()["data"]] == [job_id]
        refused = await http.get("/api/v1/jobs", params={"owner": ALICE.owner}, headers=as_key("bob"))
        assert refused.status_code == 403 and refused.json()["error_code"] == "FORBIDDEN"


# -- the gRPC door ------------------------------------------------------------------------------


class _TestKeys(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Stands in for the door's auth interceptor (api/grpc_auth.py): runs each unary call as
    the principal named by its `x-test-key` metadata, as that interceptor does for a key."""

    def __init__(self, principals: dict[str, Principal]) -> None:
        self.principals = principals

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        name = dict(details.invocation_metadata or ()).get("x-test-key", "")
        who = self.principals.get(name, ANONYMOUS)
        if handler is None or handler.unary_unary is None:
            return handler
        behaviour = handler.unary_unary

        async def run(request: Any, context: Any) -> Any:
            token = current_principal.set(who)
            try:
                return await behaviour(request, context)
            finally:
                current_principal.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            run,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def test_grpc_door_applies_ownership(mm: ModelMora) -> None:
    from modelmora.api.grpc_server import add_inference_service
    from modelmora.api.grpc_services import Door, InferenceServicer
    from modelmora.v1 import modelmora_pb2 as pb
    from modelmora.v1 import modelmora_pb2_grpc as pb_grpc

    await mm.dispatcher.stop()
    server = grpc.aio.server(interceptors=[_TestKeys({"alice": ALICE, "bob": BOB, "ops": ADMIN})])
    add_inference_service(InferenceServicer(Door(mm)), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InferenceServiceStub(channel)

            def key(who: str) -> tuple[tuple[str, str], ...]:
                return (("x-test-key", who),)

            request = pb.InferRequest(model="fake", input=pb.Input(text="hello"))
            job = await stub.InferAsync(
                pb.InferAsyncRequest(request=request, idempotency_key="k-1"), metadata=key("alice")
            )
            assert job.created
            for call in (stub.GetJobStatus, stub.CancelJob):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(pb.JobRef(job_id=job.job_id), metadata=key("bob"))
                assert err.value.code() is grpc.StatusCode.NOT_FOUND
                assert dict(err.value.trailing_metadata() or ())["error_code"] == "JOB_NOT_FOUND"
            other = pb.InferRequest(model="fake", input=pb.Input(text="other"))
            bobs = await stub.InferAsync(
                pb.InferAsyncRequest(request=other, idempotency_key="k-1"), metadata=key("bob")
            )
            assert bobs.created and bobs.job_id != job.job_id
            mine = await stub.ListJobs(pb.ListJobsRequest(), metadata=key("bob"))
            assert [j.job_id for j in mine.data] == [bobs.job_id]
            everyone = await stub.ListJobs(pb.ListJobsRequest(), metadata=key("ops"))
            assert {j.job_id for j in everyone.data} == {job.job_id, bobs.job_id}
            seen = await stub.GetJobStatus(pb.JobRef(job_id=job.job_id), metadata=key("alice"))
            assert seen.job_id == job.job_id
    finally:
        await server.stop(None)
