"""End to end over a real gRPC channel to `modelmora serve`: every RPC of modelmora.v1, the
error table's mapping, deadlines, cancellation, InferStream, health, reflection and drain."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from modelmora.v1 import modelmora_pb2 as pb
from modelmora.v1 import modelmora_pb2_grpc as pb_grpc
from modelmora.v1.convert import build_request, struct_to_dict
from tests.conftest import make_fake_model
from tests.e2e.conftest import CLI, Server, clean_env, cli, free_port, start_server


@pytest.fixture(scope="module")
def grpc_server(module_tmp: Path) -> Iterator[Server]:
    data = module_tmp / "data"
    env = clean_env(data)
    cli(env, "install", str(make_fake_model(module_tmp / "fake")))
    cli(env, "install", str(make_fake_model(module_tmp / "slow")))
    cli(env, "install", str(make_fake_model(module_tmp / "crashy")))
    cli(env, "install", str(make_fake_model(module_tmp / "broken", fail_load=True)))
    srv = start_server(
        data,
        module_tmp / "server.log",
        MODELMORA_LIMITS__MAX_TEXT_CHARS="5000",
        MODELMORA_LIMITS__MAX_ITEMS="64",
        MODELMORA_LIMITS__MAX_REQUEST_BYTES=str(1 << 20),
        MODELMORA_SCHEDULER__QUEUE_SIZE_PER_MODEL="64",
        MODELMORA_LIFECYCLE__LOAD_RETRIES="1",
        MODELMORA_LIFECYCLE__LOAD_BACKOFF_SECONDS="0.2",
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(grpc_server: Server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{grpc_server.grpc_port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def infer(channel: grpc.Channel) -> pb_grpc.InferenceServiceStub:
    return pb_grpc.InferenceServiceStub(channel)


@pytest.fixture(scope="module")
def registry(channel: grpc.Channel) -> pb_grpc.RegistryServiceStub:
    return pb_grpc.RegistryServiceStub(channel)


@pytest.fixture(scope="module")
def management(channel: grpc.Channel) -> pb_grpc.ManagementServiceStub:
    return pb_grpc.ManagementServiceStub(channel)


def trailers(error: grpc.RpcError) -> dict[str, Any]:
    return dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]


def expect_error(call: Callable[[], Any], status: grpc.StatusCode, error_code: str) -> dict[str, Any]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err: Any = info.value
    md = trailers(err)
    assert (err.code(), md.get("error_code")) == (status, error_code), err.details()
    assert len(md["trace_id"]) == 32
    return md


def embeddings(response: pb.InferResponse) -> np.ndarray:
    e = response.result.embeddings
    return np.frombuffer(e.data, dtype="<f4").reshape(e.count, e.dim)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def model_status(management: pb_grpc.ManagementServiceStub, name: str) -> pb.ModelStatus | None:
    health = management.GetModelHealth(pb.GetModelHealthRequest())
    return next((m for m in health.models if m.name == name), None)


# -- inference ----------------------------------------------------------------------------------


def test_infer_matches_rest_bit_for_bit(grpc_server: Server, infer: pb_grpc.InferenceServiceStub) -> None:
    one = infer.Infer(build_request("fake", {"text": "hello"}, {"normalize": True}, priority="high"))
    e = one.result.embeddings
    assert (e.single, e.dim, e.count, len(e.data)) == (True, 8, 1, 32)
    rest = grpc_server.client.post("/infer/fake", json={"text": "hello", "parameters": {"normalize": True}})
    assert np.array_equal(embeddings(one)[0], np.asarray(rest.json()["result"]["embeddings"], dtype="<f4"))
    assert (one.metadata.model, one.metadata.task_type, one.metadata.device) == ("fake", "txt2embed", "cpu")
    assert one.timing.total_time_ms > 0
    many = infer.Infer(build_request("fake", {"text": ["a", "b", "c"]}, priority=2, keep_alive=-1))
    assert (many.result.embeddings.single, embeddings(many).shape) == (False, (3, 8))
    assert np.array_equal(
        embeddings(many)[0], embeddings(infer.Infer(build_request("fake", {"text": "a"})))[0]
    )


def test_trace_id_comes_from_traceparent(infer: pb_grpc.InferenceServiceStub) -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    _, call = infer.Infer.with_call(
        build_request("fake", {"text": "x"}), metadata=(("traceparent", f"00-{trace}-00f067aa0ba902b7-01"),)
    )
    assert dict(call.trailing_metadata())["trace_id"] == trace
    with pytest.raises(grpc.RpcError) as info:
        infer.Infer(
            build_request("nope", {"text": "x"}),
            metadata=(("traceparent", f"00-{trace}-00f067aa0ba902b7-01"),),
        )
    assert trailers(info.value)["trace_id"] == trace


@pytest.mark.parametrize(
    ("request_", "status", "code"),
    [
        (pb.InferRequest(model="fake"), grpc.StatusCode.INVALID_ARGUMENT, "VALIDATION_ERROR"),
        (build_request("fake@v1", {"text": "x"}), grpc.StatusCode.INVALID_ARGUMENT, "VALIDATION_ERROR"),
        (
            build_request("fake", {"text": "x"}, {"bogus": 1}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "VALIDATION_ERROR",
        ),
        (build_request("fake", {"text": "x" * 5001}), grpc.StatusCode.INVALID_ARGUMENT, "INPUT_TOO_LONG"),
        (build_request("fake", {"text": ["x"] * 65}), grpc.StatusCode.INVALID_ARGUMENT, "TOO_MANY_INPUTS"),
        (
            build_request("fake", {"text": ["y" * 4000] * 300}),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "PAYLOAD_TOO_LARGE",
        ),
        (build_request("ghost", {"text": "x"}), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        (build_request("fake", {"text": "fail: me"}), grpc.StatusCode.INTERNAL, "INFERENCE_FAILED"),
    ],
)
def test_bad_requests_map_to_the_error_table(
    infer: pb_grpc.InferenceServiceStub, request_: pb.InferRequest, status: grpc.StatusCode, code: str
) -> None:
    md = expect_error(lambda: infer.Infer(request_), status, code)
    if code in ("VALIDATION_ERROR", "INPUT_TOO_LONG", "TOO_MANY_INPUTS", "PAYLOAD_TOO_LARGE"):
        assert orjson.loads(md["error-details-bin"])  # the REST body's `details`, as JSON


def test_a_model_that_fails_to_load_is_unavailable(infer: pb_grpc.InferenceServiceStub) -> None:
    md = expect_error(
        lambda: infer.Infer(build_request("broken", {"text": "x"})),
        grpc.StatusCode.UNAVAILABLE,
        "MODEL_LOAD_FAILED",
    )
    assert int(md["retry-after"]) >= 1


def test_a_dying_worker_is_unavailable(infer: pb_grpc.InferenceServiceStub) -> None:
    infer.Infer(build_request("crashy", {"text": "warm"}))
    expect_error(
        lambda: infer.Infer(build_request("crashy", {"text": "exit: now"})),
        grpc.StatusCode.UNAVAILABLE,
        "WORKER_DIED",
    )


def test_timeouts_deadlines_and_cancellation_drop_queued_work(
    infer: pb_grpc.InferenceServiceStub, management: pb_grpc.ManagementServiceStub
) -> None:
    infer.Infer(build_request("slow", {"text": "warm"}))
    # timeout_seconds: the service's own INFERENCE_TIMEOUT
    expect_error(
        lambda: infer.Infer(build_request("slow", {"text": "sleep:600"}, timeout_seconds=0.2)),
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "INFERENCE_TIMEOUT",
    )
    # the call's deadline: whichever side notices first, the status is DEADLINE_EXCEEDED
    with pytest.raises(grpc.RpcError) as info:
        infer.Infer(build_request("slow", {"text": "sleep:600"}), timeout=0.2)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    wait_for(lambda: (s := model_status(management, "slow")) is not None and s.in_flight == 0, "slow idle")

    # cancellation: a request queued behind a busy worker is dropped when its call is cancelled
    blocker = infer.Infer.future(build_request("slow", {"text": "sleep:1500"}))
    wait_for(lambda: _load(management, "slow") == (1, 0), "blocker running, nothing queued")
    queued = infer.Infer.future(build_request("slow", {"text": "cancel me"}))
    wait_for(lambda: _load(management, "slow") == (2, 1), "second queued")
    queued.cancel()
    wait_for(lambda: _load(management, "slow") == (1, 0), "queue emptied")
    assert not blocker.done()  # dropped while the blocker still runs: it never reached the worker
    assert embeddings(blocker.result()).shape == (1, 8)


def _load(management: pb_grpc.ManagementServiceStub, name: str) -> tuple[int, int]:
    """(requests in flight, requests queued) of one model."""
    status = model_status(management, name)
    return (status.in_flight, status.queued) if status is not None else (-1, -1)


def test_a_full_queue_is_resource_exhausted_with_retry_after(
    infer: pb_grpc.InferenceServiceStub, management: pb_grpc.ManagementServiceStub
) -> None:
    infer.Infer(build_request("slow", {"text": "warm"}))
    blocker = infer.Infer.future(build_request("slow", {"text": "sleep:1500"}))
    wait_for(lambda: _load(management, "slow") == (1, 0), "blocker running")
    calls = [infer.Infer.future(build_request("slow", {"text": f"q{i}"})) for i in range(100)]
    refused = [c.exception() for c in calls if c.exception() is not None]
    assert 0 < len(refused) < 100  # some fit (a batch sent ahead, the queue less the critical reserve)
    md = trailers(refused[0])  # type: ignore[arg-type]
    assert refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[union-attr]
    assert md["error_code"] == "QUEUE_FULL" and int(md["retry-after"]) >= 1
    blocker.result()


def test_infer_stream_answers_in_completion_order(infer: pb_grpc.InferenceServiceStub) -> None:
    infer.Infer(build_request("slow", {"text": "warm"}))
    infer.Infer(build_request("fake", {"text": "warm"}))
    sent = threading.Event()

    def requests() -> Iterator[pb.InferRequest]:
        yield build_request("slow", {"text": "sleep:1500"}, request_id="slow-1")
        yield build_request("fake", {"text": "quick"}, request_id="fast-2")
        yield build_request("fake", {"text": "fail: this one"}, request_id="bad-3")
        yield build_request("ghost", {"text": "x"}, request_id="missing-4")
        yield build_request("fake", {"text": ["a", "b"]})  # no request_id
        sent.set()

    answers = list(infer.InferStream(requests()))
    assert sent.is_set()
    by_id = {a.request_id: a for a in answers}
    assert len(answers) == 5 and answers[-1].request_id == "slow-1"  # completion order
    assert embeddings(by_id["fast-2"].response).shape == (1, 8)
    assert embeddings(by_id["slow-1"].response).shape == (1, 8)
    assert by_id["bad-3"].error.error_code == "INFERENCE_FAILED"
    assert by_id["missing-4"].error.error_code == "MODEL_NOT_FOUND"
    assert by_id[""].error.error_code == "VALIDATION_ERROR"
    assert len(by_id["bad-3"].error.trace_id) == 32


def test_infer_stream_many_on_one_stream(infer: pb_grpc.InferenceServiceStub) -> None:
    reqs = [build_request("fake", {"text": f"t{i}"}, request_id=str(i)) for i in range(30)]
    answers = list(infer.InferStream(iter(reqs)))
    assert sorted(int(a.request_id) for a in answers) == list(range(30))
    for a in answers:
        single = infer.Infer(build_request("fake", {"text": f"t{a.request_id}"}))
        assert np.array_equal(embeddings(a.response), embeddings(single))


# -- registry and management ----------------------------------------------------------------------


def test_registry_rpcs(
    registry: pb_grpc.RegistryServiceStub, management: pb_grpc.ManagementServiceStub, module_tmp: Path
) -> None:
    folder = make_fake_model(module_tmp / "extra-src", dim=4)
    model = registry.RegisterModel(
        pb.RegisterModelRequest(source=str(folder), name="extra", version="v1", display_name="Extra")
    )
    assert (model.name, model.task_type, model.active_version, model.display_name) == (
        "extra",
        "txt2embed",
        "v1",
        "Extra",
    )
    assert "modelmora.json" in model.versions[0].files and model.versions[0].size_bytes > 0
    expect_error(
        lambda: registry.RegisterModel(
            pb.RegisterModelRequest(source=str(folder), name="extra", version="v1")
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "MODEL_EXISTS",
    )
    expect_error(
        lambda: registry.RegisterModel(
            pb.RegisterModelRequest(source=str(module_tmp / "does-not-exist"), name="ghost")
        ),
        grpc.StatusCode.UNAVAILABLE,
        "SOURCE_UNAVAILABLE",
    )
    registry.RegisterModel(pb.RegisterModelRequest(source=str(folder), name="extra", version="v2"))
    assert registry.GetModel(pb.ModelRef(name="extra")).active_version == "v2"
    assert (
        registry.SetActiveVersion(pb.SetActiveVersionRequest(name="extra", version="v1")).active_version
        == "v1"
    )
    expect_error(
        lambda: registry.SetActiveVersion(pb.SetActiveVersionRequest(name="extra", version="v9")),
        grpc.StatusCode.NOT_FOUND,
        "MODEL_NOT_FOUND",
    )

    listing = registry.ListModels(pb.ListModelsRequest(task_type="txt2embed", page_size=2))
    assert (listing.meta.total, listing.meta.total_pages, len(listing.data)) == (5, 3, 2)
    failed = registry.ListModels(pb.ListModelsRequest(status="failed"))
    assert "broken" in {m.name for m in failed.data} and "fake" not in {m.name for m in failed.data}

    updated = registry.UpdateModel(
        pb.UpdateModelRequest(name="extra", description="d", config=_struct({"max_batch_size": 4}))
    )
    assert updated.description == "d" and struct_to_dict(updated.config)["max_batch_size"] == 4
    expect_error(
        lambda: registry.UpdateModel(
            pb.UpdateModelRequest(name="extra", config=_struct({"max_batch_sise": 4}))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "VALIDATION_ERROR",
    )

    lock = struct_to_dict(registry.GenerateLock(pb.GenerateLockRequest()).lock)
    assert {"extra", "fake", "slow"} <= {m["name"] for m in lock["models"]}

    verified = registry.DownloadModel(pb.DownloadModelRequest(name="extra"))
    assert (verified.verified, verified.version, verified.files) == (True, "v1", 1)
    Path(model.versions[0].path, "modelmora.json").write_text('{"tampered": true}')
    expect_error(
        lambda: registry.DownloadModel(pb.DownloadModelRequest(name="extra", version="v1")),
        grpc.StatusCode.DATA_LOSS,
        "CHECKSUM_MISMATCH",
    )

    registry.SetActiveVersion(pb.SetActiveVersionRequest(name="extra", version="v2"))
    management.LoadModel(pb.ModelRef(name="extra"))
    expect_error(
        lambda: registry.DeleteModel(pb.DeleteModelRequest(name="extra")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "MODEL_LOADED",
    )
    deleted = registry.DeleteModel(pb.DeleteModelRequest(name="extra", force=True))
    assert (deleted.deleted, sorted(deleted.versions)) == ("extra", ["v1", "v2"])
    expect_error(
        lambda: registry.GetModel(pb.ModelRef(name="extra")), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"
    )


def _struct(data: dict[str, Any]) -> Any:
    from modelmora.v1.convert import dict_to_struct

    return dict_to_struct(data)


def test_management_rpcs(
    management: pb_grpc.ManagementServiceStub, infer: pb_grpc.InferenceServiceStub
) -> None:
    loaded = management.LoadModel(pb.ModelRef(name="fake"))
    assert loaded.state == "ready" and loaded.pid > 0 and loaded.task_type == "txt2embed"
    warm = management.WarmupModel(pb.ModelRef(name="fake"))
    assert warm.warmed and warm.timing.total_time_ms > 0
    status = management.GetSystemStatus(pb.GetSystemStatusRequest())
    assert status.ready and not status.draining and status.version
    assert "fake" in {m.name for m in status.models} and status.counters["loads"] >= 1
    unloaded = management.UnloadModel(pb.UnloadModelRequest(name="fake"))
    assert (unloaded.name, unloaded.unloaded) == ("fake", True)
    state = model_status(management, "fake")
    assert state is not None and state.state == "unloaded" and not state.HasField("pid")
    expect_error(
        lambda: management.UnloadModel(pb.UnloadModelRequest(name="ghost")),
        grpc.StatusCode.NOT_FOUND,
        "MODEL_NOT_FOUND",
    )
    expect_error(
        lambda: management.LoadModel(pb.ModelRef(name="bad name!")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "VALIDATION_ERROR",
    )
    infer.Infer(build_request("fake", {"text": "loads it again"}))


# -- health, reflection -------------------------------------------------------------------------


def test_health_service(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in (
        "",
        "modelmora.v1.InferenceService",
        "modelmora.v1.RegistryService",
        "modelmora.v1.ManagementService",
    ):
        assert (
            stub.Check(health_pb2.HealthCheckRequest(service=service)).status
            == health_pb2.HealthCheckResponse.SERVING
        )
    with pytest.raises(grpc.RpcError) as info:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_server_reflection(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    [listing] = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in listing.list_services_response.service}
    assert {
        "modelmora.v1.InferenceService",
        "modelmora.v1.RegistryService",
        "modelmora.v1.ManagementService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    [found] = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="modelmora.v1.InferenceService")])
    )
    proto = descriptor_pb2.FileDescriptorProto.FromString(
        found.file_descriptor_response.file_descriptor_proto[0]
    )
    assert proto.package == "modelmora.v1"
    rpcs = {m.name for s in proto.service for m in s.method}
    assert {"Infer", "InferStream", "Generate", "GetJobResult", "RegisterModel", "GetSystemStatus"} <= rpcs


# -- lifecycle: drain, gRPC only ----------------------------------------------------------------


def test_sigterm_drains_grpc_calls(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cli(clean_env(data), "install", str(make_fake_model(tmp_path / "slow")))
    server = start_server(data, tmp_path / "server.log", MODELMORA_SERVER__DRAIN_SECONDS="10")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
            stub = pb_grpc.InferenceServiceStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            stub.Infer(build_request("slow", {"text": "warm"}))
            slow = stub.Infer.future(build_request("slow", {"text": "sleep:1500"}))
            wait_for(lambda: server.model_in_flight("slow") == 1, "the slow call in flight")
            server.proc.send_signal(signal.SIGTERM)
            wait_for(
                lambda: (
                    health.Check(health_pb2.HealthCheckRequest()).status
                    == health_pb2.HealthCheckResponse.NOT_SERVING
                ),
                "NOT_SERVING",
            )
            md = expect_error(
                lambda: stub.Infer(build_request("slow", {"text": "new"})),
                grpc.StatusCode.UNAVAILABLE,
                "SHUTTING_DOWN",
            )
            assert md["retry-after"] == "5"
            assert embeddings(slow.result(10)).shape == (1, 8)  # the call in flight finished
        assert server.proc.wait(15) == 0
    finally:
        server.stop()


def test_serve_grpc_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = clean_env(data)
    cli(env, "install", str(make_fake_model(tmp_path / "fake")))
    rest_port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen(
        [*CLI, "serve", "--no-rest", "--port", str(rest_port), "--grpc-port", str(grpc_port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=60)
            health = health_pb2_grpc.HealthStub(ch)
            wait_for(
                lambda: (
                    health.Check(health_pb2.HealthCheckRequest()).status
                    == health_pb2.HealthCheckResponse.SERVING
                ),
                "SERVING",
            )
            answer = pb_grpc.InferenceServiceStub(ch).Infer(build_request("fake", {"text": "x"}))
            assert embeddings(answer).shape == (1, 8)
        import socket

        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", rest_port)) != 0  # REST is off
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_busy_grpc_port_fails_the_start(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = cli(
            clean_env(tmp_path / "data"),
            "serve",
            "--port",
            str(free_port()),
            "--grpc-port",
            str(port),
            check=False,
        )
    assert proc.returncode != 0 and "cannot bind gRPC" in proc.stdout + proc.stderr
