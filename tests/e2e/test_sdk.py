"""The Python SDK against a real server: one suite, parametrised over both transports (REST
and gRPC), sync and async. Both must give the same answers and the same typed errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelmora.client import (
    NO_RETRY,
    ApiError,
    AsyncClient,
    AsyncGrpcClient,
    Client,
    ConflictError,
    GrpcClient,
    InferenceError,
    InvalidRequestError,
    NotFoundError,
    RetryPolicy,
    TransportError,
    UnavailableError,
)
from modelmora.client.api import AsyncApi, SyncApi
from tests.conftest import make_fake_model
from tests.e2e.conftest import Server, clean_env, cli, free_port, start_server

TRANSPORTS = ["rest", "grpc"]


@pytest.fixture(scope="module")
def sdk_server(module_tmp: Path) -> Iterator[Server]:
    data = module_tmp / "data"
    env = clean_env(data)
    cli(env, "install", str(make_fake_model(module_tmp / "fake")))
    cli(env, "install", str(make_fake_model(module_tmp / "other")))
    cli(env, "install", str(make_fake_model(module_tmp / "broken", fail_load=True)))
    srv = start_server(data, module_tmp / "server.log", MODELMORA_LIMITS__MAX_TEXT_CHARS="100")
    yield srv
    srv.stop()


def make_client(kind: str, server: Server, **options: Any) -> SyncApi:
    if kind == "rest":
        return Client(server.url, **options)
    return GrpcClient(f"127.0.0.1:{server.grpc_port}", **options)


def make_async_client(kind: str, server: Server) -> AsyncApi:
    if kind == "rest":
        return AsyncClient(server.url)
    return AsyncGrpcClient(f"127.0.0.1:{server.grpc_port}")


@pytest.fixture(params=TRANSPORTS)
def mm(request: pytest.FixtureRequest, sdk_server: Server) -> Iterator[SyncApi]:
    client = make_client(request.param, sdk_server)
    yield client
    client.close()  # type: ignore[attr-defined]


def test_embed_and_infer_agree_across_transports(mm: SyncApi, sdk_server: Server) -> None:
    vector = mm.embed("fake", "hello", normalize=True)
    assert vector.dtype == np.float32 and vector.shape == (8,)
    assert abs(float(np.linalg.norm(vector)) - 1) < 1e-5
    with Client(sdk_server.url) as rest, GrpcClient(f"127.0.0.1:{sdk_server.grpc_port}") as grpc_client:
        assert np.array_equal(rest.embed("fake", ["a", "b"]), grpc_client.embed("fake", ["a", "b"]))
    response = mm.infer("fake", {"text": ["x", "y", "z"]}, priority="high", timeout_seconds=30, keep_alive=60)
    assert response["result"]["embeddings"].shape == (3, 8)
    assert {"model", "version", "task_type", "device", "batch_size", "truncated"} <= set(response["metadata"])
    assert response["metadata"]["model"] == "fake" and response["metadata"]["task_type"] == "txt2embed"
    assert set(response["timing"]) == {"queue_time_ms", "inference_time_ms", "total_time_ms"}


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_typed_errors_carry_code_status_and_trace(kind: str, sdk_server: Server) -> None:
    with make_client(kind, sdk_server) as mm:  # type: ignore[attr-defined]
        with pytest.raises(NotFoundError) as missing:
            mm.embed("ghost", "x")
        err = missing.value
        assert err.error_code == "MODEL_NOT_FOUND" and len(err.trace_id or "") == 32 and not err.retryable
        if kind == "rest":
            assert (err.http_status, err.grpc_status) == (404, None)
        else:
            assert (err.http_status, err.grpc_status) == (None, "NOT_FOUND")
        with pytest.raises(InvalidRequestError) as too_long:
            mm.embed("fake", "x" * 101)
        assert too_long.value.error_code == "INPUT_TOO_LONG" and too_long.value.details["limit"] == 100
        with pytest.raises(InferenceError) as failed:
            mm.embed("fake", "fail: on purpose")
        assert failed.value.error_code == "INFERENCE_FAILED"
        # not retryable by the table (only after Retry-After): raised at once, Retry-After kept
        with pytest.raises(UnavailableError) as broken:
            mm.embed("broken", "x")
        assert broken.value.error_code == "MODEL_LOAD_FAILED" and (broken.value.retry_after or 0) >= 1


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_no_server_is_a_transport_error(kind: str) -> None:
    port = free_port()
    mm = (
        Client(f"http://127.0.0.1:{port}", retry=NO_RETRY)
        if kind == "rest"
        else GrpcClient(f"127.0.0.1:{port}", retry=NO_RETRY, timeout=5)
    )
    with pytest.raises(TransportError) as info:
        mm.status()
    assert info.value.retryable
    mm.close()  # type: ignore[attr-defined]


def test_registry_and_management(mm: SyncApi, module_tmp: Path) -> None:
    name = f"sdk-{type(mm).__name__.lower()}"
    folder = make_fake_model(module_tmp / name)
    model = mm.models.register(source=str(folder), name=name, version="v1", display_name="SDK")
    assert (model["name"], model["active_version"], model["display_name"]) == (name, "v1", "SDK")
    assert model["versions"][0]["size_bytes"] > 0 and "modelmora.json" in model["versions"][0]["files"]
    with pytest.raises(ConflictError) as exists:
        mm.models.register(source=str(folder), name=name, version="v1")
    assert exists.value.error_code == "MODEL_EXISTS"
    mm.models.register(source=str(folder), name=name, version="v2")
    assert mm.models.use(name, "v1")["active_version"] == "v1"
    assert mm.models.get(name)["state"] == "registered"
    listing = mm.models.list(task_type="txt2embed", page_size=1)
    assert listing["meta"]["page_size"] == 1 and listing["meta"]["total"] >= 3 and len(listing["data"]) == 1
    updated = mm.models.update(name, config={"max_batch_size": 4}, description="d")
    assert updated["config"]["max_batch_size"] == 4 and updated["description"] == "d"
    assert mm.models.download(name) == {"name": name, "version": "v1", "verified": True, "files": 1}
    assert name in {m["name"] for m in mm.lock()["models"]}

    loaded = mm.load(name)
    assert loaded["state"] == "ready" and loaded["pid"] > 0
    assert mm.warmup(name)["warmed"] is True
    status = mm.status()
    assert status["ready"] is True and name in {m["name"] for m in status["models"]}
    health = mm.health()
    assert health["ready"] is True and any(
        m["name"] == name and m["state"] == "ready" for m in health["models"]
    )
    with pytest.raises(ConflictError) as loaded_err:
        mm.models.delete(name)
    assert loaded_err.value.error_code == "MODEL_LOADED"
    assert mm.unload(name) == {"name": name, "unloaded": True}
    deleted = mm.models.delete(name)
    assert deleted["deleted"] == name and sorted(deleted["versions"]) == ["v1", "v2"]
    with pytest.raises(NotFoundError):
        mm.models.get(name)


def test_infer_stream_answers_in_completion_order(mm: SyncApi) -> None:
    mm.embed("fake", "warm")
    mm.embed("other", "warm")
    requests = [
        {"request_id": "slow", "model": "fake", "input_data": {"text": "sleep:1500"}},
        {
            "request_id": "fast",
            "model": "other",  # another worker: it is not queued behind the slow one
            "input_data": {"text": "quick"},
            "parameters": {"normalize": True},
        },
        {"request_id": "bad", "model": "ghost", "input_data": {"text": "x"}},
    ]
    answers = list(mm.infer_stream(requests))
    assert {a["request_id"] for a in answers} == {"slow", "fast", "bad"}
    assert answers[-1]["request_id"] == "slow"
    by_id = {a["request_id"]: a for a in answers}
    assert by_id["fast"]["response"]["result"]["embeddings"].shape == (8,)
    error = by_id["bad"]["error"]
    assert isinstance(error, NotFoundError) and error.error_code == "MODEL_NOT_FOUND"


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_async_clients(kind: str, sdk_server: Server) -> None:
    mm = make_async_client(kind, sdk_server)
    try:
        vectors = await mm.embed("fake", ["a", "b"])
        with Client(sdk_server.url) as rest:
            assert np.array_equal(vectors, rest.embed("fake", ["a", "b"]))
        with pytest.raises(NotFoundError):
            await mm.infer("ghost", {"text": "x"})
        answers = [
            a
            async for a in mm.infer_stream(
                [{"request_id": str(i), "model": "fake", "input_data": {"text": f"t{i}"}} for i in range(10)]
            )
        ]
        assert sorted(int(a["request_id"]) for a in answers) == list(range(10))
        assert (await mm.status())["ready"] is True
        assert (await mm.health())["ready"] is True
        assert (await mm.models.get("fake"))["name"] == "fake"
    finally:
        await mm.close()  # type: ignore[attr-defined]


# -- retries, without a server ------------------------------------------------------------------


class Flaky:
    """Stands in for a transport's `_send`: fails with the given errors, then answers."""

    def __init__(self, errors: list[ApiError]) -> None:
        self.errors = errors
        self.calls = 0

    def __call__(self, call: Any) -> Any:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return {"ok": True}


def _overloaded(retry_after: float | None = None) -> ApiError:
    from modelmora.client import OverloadedError

    return OverloadedError("QUEUE_FULL", "full", retry_after=retry_after)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_retryable_errors_are_retried_with_backoff_honouring_retry_after(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    mm = Client("http://127.0.0.1:1") if kind == "rest" else GrpcClient("127.0.0.1:1")
    mm.retry = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.002)
    slept: list[float] = []
    monkeypatch.setattr("time.sleep", slept.append)
    flaky = Flaky([_overloaded(retry_after=0.5), _overloaded()])
    monkeypatch.setattr(mm, "_send", flaky)
    assert mm.status() == {"ok": True} and flaky.calls == 3
    assert slept[0] == 0.5 and slept[1] <= 0.002  # Retry-After wins over a shorter backoff

    # the attempts run out: the last error is raised
    flaky = Flaky([_overloaded(), _overloaded(), _overloaded(), _overloaded()])
    monkeypatch.setattr(mm, "_send", flaky)
    with pytest.raises(ApiError):
        mm.status()
    assert flaky.calls == 3

    # never retried: errors the table marks non-retryable
    flaky = Flaky([NotFoundError("MODEL_NOT_FOUND", "no")])
    monkeypatch.setattr(mm, "_send", flaky)
    with pytest.raises(NotFoundError):
        mm.models.get("x")
    assert flaky.calls == 1

    # a non-idempotent call is not retried after a transport error (it may have happened)
    flaky = Flaky([TransportError(None, "reset")])
    monkeypatch.setattr(mm, "_send", flaky)
    with pytest.raises(TransportError):
        mm.models.register(source="/x")
    assert flaky.calls == 1
    mm.close()
