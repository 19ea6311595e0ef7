"""REST, gRPC and the CLI install a model through one and the same service method.

The real server and the real CLI run under `door_spy.py`, which records every call of
`RegistryService.install` and every catalog event in whichever process makes them. Each door
installs the same model folder; each test makes the same assertions: exactly one call of the
method, with the same request, one `installed` event, and a record identical to the one the
service gives in-process (the door's own answer agrees with it).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from modelmora.config import load_settings
from modelmora.registry.installer import InstallRequest
from modelmora.registry.store import RegistryStore
from modelmora.services.registry import RegistryService, inline
from modelmora.v1 import modelmora_pb2 as pb
from modelmora.v1 import modelmora_pb2_grpc as pb_grpc
from modelmora.v1.convert import message_to_dict
from tests.conftest import make_fake_model
from tests.e2e.conftest import Server, start_server

SPY = [sys.executable, str(Path(__file__).with_name("door_spy.py"))]
# What differs between two installs of the same files in two data dirs, or two moments.
VOLATILE = ("path", "installed_at", "created_at", "updated_at")


def projection(record: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in record.items() if k not in VOLATILE}
    out["versions"] = [{k: v for k, v in ver.items() if k not in VOLATILE} for ver in record["versions"]]
    return out


@pytest.fixture(scope="module")
def folder(module_tmp: Path) -> Path:
    return make_fake_model(module_tmp / "emb")


@pytest.fixture(scope="module")
def reference(module_tmp: Path, folder: Path) -> dict[str, Any]:
    """The record the service gives for this install, in-process, on a data dir of its own."""
    settings = load_settings(None, {"server": {"data_dir": str(module_tmp / "reference")}})
    store = RegistryStore(settings.database_url)
    store.create_schema()
    try:
        registry = RegistryService(settings, store, offload=inline)
        return asyncio.run(registry.install(InstallRequest(source=str(folder), version="v1")))
    finally:
        store.close()


@pytest.fixture(scope="module")
def spy_file(module_tmp: Path) -> Path:
    return module_tmp / "spy.jsonl"


@pytest.fixture(scope="module")
def server(module_tmp: Path, spy_file: Path) -> Iterator[Server]:
    srv = start_server(
        module_tmp / "data", module_tmp / "server.log", command=SPY, DOOR_SPY_FILE=str(spy_file)
    )
    yield srv
    srv.stop()


class Spy:
    """The lines the spied processes write from now on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def lines(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open(encoding="utf-8") as f:
            f.seek(self.offset)
            return [json.loads(line) for line in f.read().splitlines()]


@pytest.fixture
def spy(server: Server, spy_file: Path) -> Iterator[Spy]:
    yield Spy(spy_file)
    server.client.delete("/api/v1/models/emb")  # the next door installs the same model again


def assert_one_install_through_the_service(
    spy: Spy, folder: Path, reference: dict[str, Any], answer: dict[str, Any] | None
) -> dict[str, Any]:
    """The same assertions for every door (`answer`: the door's record, when it shows one)."""
    lines = spy.lines()  # exactly one event and one call of RegistryService.install
    assert [line["call"] for line in lines] == ["event", "install"], lines
    event, call = lines
    assert event == {"call": "event", "kind": "installed", "model": "emb", "version": "v1"}
    assert call["call"] == "install"
    assert call["request"] == {
        "model_id": None,
        "source": str(folder),
        "name": None,
        "version": "v1",
        "revision": None,
        "task_type": None,
        "display_name": None,
        "description": None,
        "config": {},
        "resource_requirements": {},
        "expected_files": None,
        "activate": True,
    }
    record: dict[str, Any] = call["record"]
    assert projection(record) == projection(reference)
    assert record["name"] == "emb" and record["active_version"] == "v1" and record["state"] == "registered"
    if answer is not None:
        assert answer == record
    return record


def test_rest_install_goes_through_the_service(
    server: Server, spy: Spy, folder: Path, reference: dict[str, Any]
) -> None:
    response = server.client.post("/api/v1/models", json={"source": str(folder), "version": "v1"})
    assert response.status_code == 201
    assert_one_install_through_the_service(spy, folder, reference, response.json())


def test_grpc_install_goes_through_the_service(
    server: Server, spy: Spy, folder: Path, reference: dict[str, Any]
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        model = pb_grpc.RegistryServiceStub(channel).RegisterModel(
            pb.RegisterModelRequest(source=str(folder), version="v1"), timeout=60
        )
    assert_one_install_through_the_service(spy, folder, reference, message_to_dict(model))


def test_cli_install_goes_through_the_service(
    server: Server, spy: Spy, folder: Path, reference: dict[str, Any]
) -> None:
    proc = subprocess.run(
        [*SPY, "install", str(folder), "--version", "v1"],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    record = assert_one_install_through_the_service(spy, folder, reference, None)
    files = len(record["versions"][0]["files"])
    assert f"installed emb@v1 (txt2embed, {files} files" in proc.stdout
    # The running server sees what the CLI wrote, as it would have installed it.
    assert projection(server.client.get("/api/v1/models/emb").json()) == projection(reference)


# Libraries of the server extra: a client command must work with none of them importable.
SERVER_LIBRARIES = ("fastapi", "starlette", "uvicorn", "sqlalchemy", "torch", "huggingface_hub", "grpc")


def client_cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    code = (
        f"import sys\nfor m in {SERVER_LIBRARIES!r}: sys.modules[m] = None\n"
        f"sys.argv = ['modelmora', '--url', {server.url!r}, *{list(args)!r}]\n"
        "from modelmora.cli import main\nmain()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=server.env, capture_output=True, text=True, timeout=120
    )


def test_the_client_commands_need_no_server_library(server: Server, folder: Path) -> None:
    response = server.client.post("/api/v1/models", json={"source": str(folder), "name": "side"})
    assert response.status_code == 201
    try:
        loaded = client_cli(server, "load", "side")
        assert loaded.returncode == 0, loaded.stderr
        assert loaded.stdout.startswith("side: ready")
        status = client_cli(server, "status", "--json")
        assert status.returncode == 0, status.stderr
        assert [m["name"] for m in json.loads(status.stdout)["models"]] == ["side"]
        health = client_cli(server, "health")
        assert health.returncode == 0 and "server: ready" in health.stdout
        jobs = client_cli(server, "jobs")
        assert jobs.returncode == 0 and "jobs (0 in all)" in jobs.stdout
        unloaded = client_cli(server, "unload", "side")
        assert unloaded.returncode == 0 and "side: unloaded" in unloaded.stdout
    finally:
        server.client.delete("/api/v1/models/side", params={"force": True})
