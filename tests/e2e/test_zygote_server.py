"""The zygote in a server as a user starts it (the default `resources.worker_start`): loads
fork from it while gRPC calls run, the workers are the server's children, a killed worker is
reported with its exact signal, and a killed zygote is replaced without touching the models."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from modelmora.v1 import modelmora_pb2 as pb
from modelmora.v1 import modelmora_pb2_grpc as pb_grpc
from tests.conftest import make_fake_model
from tests.e2e.conftest import Server, clean_env, cli, start_server

LOADS = 25


@pytest.fixture(scope="module")
def server(module_tmp: Path) -> Iterator[Server]:
    data = module_tmp / "data"
    cli(clean_env(data), "install", str(make_fake_model(module_tmp / "fake")))
    srv = start_server(data, module_tmp / "server.log", MODELMORA_LIFECYCLE__LOAD_RETRIES="0")
    yield srv
    srv.stop()


def _zygote(server: Server) -> dict[str, Any]:
    spare: dict[str, Any] = server.client.get("/api/v1/status").json()["memory"]["spare"]
    return spare


def _wait_zygote(server: Server, other_than: int | None = None) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        spare = _zygote(server)
        if spare["ready"] and spare["pid"] != other_than:
            return int(spare["pid"])
        time.sleep(0.05)
    raise AssertionError(f"no zygote: {spare}")


def _worker_pid(server: Server) -> int:
    models = server.client.get("/health/models").json()["models"]
    return int(next(m["pid"] for m in models if m["name"] == "fake"))


def test_loads_fork_from_the_zygote_while_grpc_calls_run(server: Server) -> None:
    zygote = _wait_zygote(server)
    assert _zygote(server)["kind"] == "zygote"
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        management = pb_grpc.ManagementServiceStub(channel)
        registry = pb_grpc.RegistryServiceStub(channel)
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                registry.ListModels(pb.ListModelsRequest())

        callers = [threading.Thread(target=traffic) for _ in range(2)]
        for t in callers:
            t.start()
        failures: list[str] = []
        parents: set[int] = set()
        try:
            for _ in range(LOADS):
                try:
                    management.LoadModel(pb.ModelRef(name="fake"))
                    parents.add(psutil.Process(_worker_pid(server)).ppid())
                except grpc.RpcError as exc:
                    failures.append(str(exc.details()))
                management.UnloadModel(pb.UnloadModelRequest(name="fake"))
        finally:
            stop.set()
            for t in callers:
                t.join()
    assert failures == []
    assert parents == {server.proc.pid}  # forked by the zygote, adopted by the server
    assert _zygote(server)["pid"] == zygote  # the same zygote served every load
    log = server.log.read_text()
    assert not re.search(r"SIGSEGV|skipping fork\(\) handlers|starting a fresh worker", log)


def test_a_killed_fork_is_reported_exactly_and_a_killed_zygote_replaced(server: Server) -> None:
    zygote = _wait_zygote(server)
    assert server.client.post("/infer/fake", json={"text": "warm"}).status_code == 200
    os.kill(_worker_pid(server), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while "worker died: killed by SIGKILL" not in server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "worker died: killed by SIGKILL" in server.log.read_text()
    assert server.client.post("/infer/fake", json={"text": "again"}).status_code == 200
    worker = _worker_pid(server)
    os.kill(zygote, signal.SIGKILL)
    replacement = _wait_zygote(server, other_than=zygote)
    assert replacement != zygote and _zygote(server)["restarts"] == 1
    assert _worker_pid(server) == worker  # the model kept its worker
    assert server.client.post("/infer/fake", json={"text": "still"}).status_code == 200
