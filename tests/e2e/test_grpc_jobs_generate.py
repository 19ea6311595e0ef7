"""Async jobs and Generate over gRPC and through the SDK (both transports), end to end."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson
import pytest

from modelmora.client import Client, ConflictError, GrpcClient, NotFoundError
from modelmora.client.api import SyncApi
from modelmora.v1 import modelmora_pb2 as pb
from modelmora.v1 import modelmora_pb2_grpc as pb_grpc
from modelmora.v1.convert import build_request
from tests.conftest import make_fake_model
from tests.e2e.conftest import Server, clean_env, cli, start_server


@pytest.fixture(scope="module")
def jobs_server(module_tmp: Path) -> Iterator[Server]:
    data = module_tmp / "data"
    env = clean_env(data)
    cli(env, "install", str(make_fake_model(module_tmp / "fake")))
    cli(env, "install", str(make_fake_model(module_tmp / "stepper", steps=4, step_ms=50)))
    cli(env, "install", str(make_fake_model(module_tmp / "gen", task_type="txt2txt")))
    srv = start_server(data, module_tmp / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(jobs_server: Server) -> Iterator[pb_grpc.InferenceServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{jobs_server.grpc_port}") as ch:
        yield pb_grpc.InferenceServiceStub(ch)


def _wait_done(stub: pb_grpc.InferenceServiceStub, job_id: str) -> pb.Job:
    deadline = time.monotonic() + 60
    while (job := stub.GetJobStatus(pb.JobRef(job_id=job_id))).status in ("queued", "processing"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def test_job_rpcs(stub: pb_grpc.InferenceServiceStub, jobs_server: Server) -> None:
    job = stub.InferAsync(
        pb.InferAsyncRequest(request=build_request("fake", {"text": ["a", "b"]}), idempotency_key="k-1")
    )
    assert job.created and job.status in ("queued", "processing", "completed") and len(job.job_id) == 36
    again = stub.InferAsync(
        pb.InferAsyncRequest(request=build_request("fake", {"text": ["a", "b"]}), idempotency_key="k-1")
    )
    assert (again.job_id, again.created) == (job.job_id, False)
    with pytest.raises(grpc.RpcError) as conflict:
        stub.InferAsync(
            pb.InferAsyncRequest(request=build_request("fake", {"text": "c"}), idempotency_key="k-1")
        )
    assert dict(conflict.value.trailing_metadata())["error_code"] == "IDEMPOTENCY_CONFLICT"  # type: ignore[attr-defined]
    done = _wait_done(stub, job.job_id)
    assert done.status == "completed" and done.completed_at
    chunks = list(stub.GetJobResult(pb.GetJobResultRequest(job_id=job.job_id, chunk_size=1024)))
    body = orjson.loads(b"".join(c.data for c in chunks))
    assert (
        chunks[0].total_bytes == sum(len(c.data) for c in chunks)
        and chunks[0].content_type == "application/json"
    )
    assert np.asarray(body["result"]["embeddings"]).shape == (2, 8)
    # The server sends the chunks pre-encoded: on the wire they must be the message's own
    # encoding, byte for byte, for clients in any language.
    request = pb.GetJobResultRequest(job_id=job.job_id, chunk_size=1024).SerializeToString()
    with grpc.insecure_channel(f"127.0.0.1:{jobs_server.grpc_port}") as channel:
        raw = channel.unary_stream("/modelmora.v1.InferenceService/GetJobResult")  # bytes, unparsed
        wire = list(raw(request))
    assert wire == [c.SerializeToString() for c in chunks]
    listing = stub.ListJobs(pb.ListJobsRequest(model="fake"))
    assert job.job_id in {j.job_id for j in listing.data} and listing.meta.total >= 1
    for bad, code in (
        ("not-a-uuid", "VALIDATION_ERROR"),
        ("00000000-0000-4000-8000-000000000000", "JOB_NOT_FOUND"),
    ):
        with pytest.raises(grpc.RpcError) as info:
            stub.GetJobStatus(pb.JobRef(job_id=bad))
        assert dict(info.value.trailing_metadata())["error_code"] == code  # type: ignore[attr-defined]


def test_cancel_job_and_result_errors(stub: pb_grpc.InferenceServiceStub) -> None:
    stub.Infer(build_request("stepper", {"text": "warm"}))
    blocker = stub.InferAsync(pb.InferAsyncRequest(request=build_request("stepper", {"text": "sleep:1000"})))
    job = stub.InferAsync(pb.InferAsyncRequest(request=build_request("stepper", {"text": "later"})))
    with pytest.raises(grpc.RpcError) as early:
        list(stub.GetJobResult(pb.GetJobResultRequest(job_id=job.job_id)))
    md: dict[str, Any] = dict(early.value.trailing_metadata())  # type: ignore[attr-defined]
    assert early.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert md["error_code"] in ("JOB_NOT_READY", "JOB_FAILED")
    cancelled = stub.CancelJob(pb.JobRef(job_id=job.job_id))
    assert cancelled.status in ("cancelled", "processing")
    assert _wait_done(stub, job.job_id).status == "cancelled"
    with pytest.raises(grpc.RpcError) as gone:
        list(stub.GetJobResult(pb.GetJobResultRequest(job_id=job.job_id)))
    assert dict(gone.value.trailing_metadata())["error_code"] == "JOB_CANCELLED"  # type: ignore[attr-defined]
    _wait_done(stub, blocker.job_id)


def test_generate_streams_tokens_then_done(stub: pb_grpc.InferenceServiceStub) -> None:
    events = list(stub.Generate(build_request("gen", {"text": "hello"}, {"max_tokens": 5})))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "done" and kinds.count("token") >= 1 and set(kinds[:-1]) == {"token"}
    text = "".join(e.token.text for e in events[:-1])
    assert events[-1].done.result.generation.text[0] == text
    with pytest.raises(grpc.RpcError) as embedding:  # streaming is for generation tasks
        list(stub.Generate(build_request("fake", {"text": "x"})))
    assert dict(embedding.value.trailing_metadata())["error_code"] == "VALIDATION_ERROR"  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(build_request("ghost", {"text": "x"})))
    assert dict(info.value.trailing_metadata())["error_code"] == "MODEL_NOT_FOUND"  # type: ignore[attr-defined]


@pytest.fixture(params=["rest", "grpc"])
def mm(request: pytest.FixtureRequest, jobs_server: Server) -> Iterator[SyncApi]:
    client: Any = (
        Client(jobs_server.url)
        if request.param == "rest"
        else GrpcClient(f"127.0.0.1:{jobs_server.grpc_port}")
    )
    yield client
    client.close()


def test_sdk_jobs_and_generate(mm: SyncApi) -> None:
    job = mm.submit("fake", {"text": ["a", "b"]})
    deadline = time.monotonic() + 60
    while mm.job(job["job_id"])["status"] in ("queued", "processing"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    result = mm.result(job["job_id"])
    assert result["result"]["embeddings"].shape == (2, 8)
    assert job["job_id"] in {j["job_id"] for j in mm.jobs(model="fake")["data"]}
    with pytest.raises(NotFoundError):
        mm.job("00000000-0000-4000-8000-000000000000")
    with pytest.raises(ConflictError):
        mm.cancel(job["job_id"])  # already completed
    events = list(mm.generate_stream("gen", {"text": "hello"}, {"max_tokens": 4}))
    assert events[-1]["event"] == "done" and {e["event"] for e in events[:-1]} == {"token"}
    assert events[-1]["data"]["result"]["text"] == "".join(e["data"]["text"] for e in events[:-1])
