"""Model workers start reliably while gRPC calls are in flight. The server starts each worker
with fork and exec while grpc's threads run; with grpc's fork handlers on, they ran in the
child before exec and crashed it (killed by SIGSEGV) in many of these loads."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
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
    srv = start_server(
        data,
        module_tmp / "server.log",
        MODELMORA_RESOURCES__WARM_SPARE="false",  # every load starts a new worker
        MODELMORA_LIFECYCLE__LOAD_RETRIES="0",  # a crashed start fails the load, not hidden
    )
    yield srv
    srv.stop()


def test_loads_never_crash_while_grpc_calls_run(server: Server) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        management = pb_grpc.ManagementServiceStub(channel)
        registry = pb_grpc.RegistryServiceStub(channel)
        stop = threading.Event()

        def traffic() -> None:  # keeps the server's grpc threads busy across every fork
            while not stop.is_set():
                registry.ListModels(pb.ListModelsRequest())

        callers = [threading.Thread(target=traffic) for _ in range(2)]
        for t in callers:
            t.start()
        failures: list[str] = []
        try:
            for _ in range(LOADS):
                try:
                    management.LoadModel(pb.ModelRef(name="fake"))
                except grpc.RpcError as exc:
                    failures.append(str(exc.details()))
                management.UnloadModel(pb.UnloadModelRequest(name="fake"))
        finally:
            stop.set()
            for t in callers:
                t.join()
    assert failures == []
    log = server.log.read_text()
    assert not re.search(r"SIGSEGV|skipping fork\(\) handlers", log)
