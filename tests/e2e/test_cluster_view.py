"""The cluster view at every door (issue 17), against real servers: `GET /api/v1/cluster`,
gRPC `GetCluster`, the SDK's `cluster()` over both transports (sync and async) and
`modelmora status --cluster`. Routing off: the replica alone, `enabled` false, its models as
its status shows them; an `infer` key is refused as for the status. Routing on (Redis): two
replicas each list both, and one that stops leaves the other's view."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelmora import __version__
from modelmora.client import AsyncClient, AsyncGrpcClient, AuthError, Client, GrpcClient
from tests.conftest import make_fake_model
from tests.e2e.conftest import Server, clean_env, cli, free_port, start_server

REPLICA_KEYS = {
    "id", "advertise_url", "grpc_url", "heartbeat_at", "version", "started_at", "ready", "draining",
    "in_flight", "queued", "memory", "models", "age_seconds", "self",
}  # fmt: skip
MODEL_KEYS = {"name", "state", "version", "queue_depth", "in_flight", "device"}
MEMORY_KEYS = {"budget_ram_bytes", "used_ram_bytes", "free_ram_bytes"}
BUDGET_MB = 4096


@pytest.fixture(scope="module")
def keyed(module_tmp: Path) -> Iterator[tuple[Server, dict[str, str]]]:
    """One server, routing off, auth on: an admin key sees the view, an infer key does not."""
    data = module_tmp / "data"
    env = clean_env(data)
    cli(env, "install", str(make_fake_model(module_tmp / "fake")))
    cli(env, "install", str(make_fake_model(module_tmp / "other")))
    tokens = {
        scope: cli(env, "keys", "create", f"{scope}-key", "--scope", scope).stdout.strip()
        for scope in ("infer", "admin")
    }
    srv = start_server(
        data,
        module_tmp / "server.log",
        MODELMORA_AUTH__ENABLED="true",
        MODELMORA_CLUSTER__REPLICA_ID="solo",
        MODELMORA_RESOURCES__MAX_MEMORY_MB=str(BUDGET_MB),
    )
    srv.client.headers["authorization"] = f"Bearer {tokens['admin']}"
    yield srv, tokens
    srv.stop()


def _stable(view: dict[str, Any]) -> dict[str, Any]:
    """The view without what changes from one read to the next: the record's time and age,
    and the workers' memory (their RSS moves)."""
    replicas = [
        {k: v for k, v in r.items() if k not in ("heartbeat_at", "age_seconds", "memory")}
        for r in view["replicas"]
    ]
    return {**view, "replicas": replicas}


def _shape(view: dict[str, Any]) -> None:
    assert set(view) == {"enabled", "self", "replicas"}
    for replica in view["replicas"]:
        assert set(replica) == REPLICA_KEYS
        assert set(replica["memory"]) == MEMORY_KEYS
        assert all(isinstance(v, int) for v in replica["memory"].values())
        for model in replica["models"]:
            assert set(model) == MODEL_KEYS


def test_routing_off_lists_this_replica_alone_the_same_at_every_door(
    keyed: tuple[Server, dict[str, str]],
) -> None:
    srv, tokens = keyed
    assert srv.client.post("/api/v1/models/fake/load").status_code == 200
    rest = srv.client.get("/api/v1/cluster")
    assert rest.status_code == 200, rest.text
    view = rest.json()
    _shape(view)
    assert view["enabled"] is False and view["self"] == "solo"
    (me,) = view["replicas"]
    status = srv.client.get("/api/v1/status").json()
    assert me["id"] == "solo" and me["self"] is True
    assert me["advertise_url"] is None and me["grpc_url"] is None
    assert me["ready"] is True and me["draining"] is False
    assert me["version"] == __version__ and me["started_at"] == status["started_at"]
    assert me["in_flight"] == 0 and me["queued"] == 0  # the asking request left out, as in status
    assert me["age_seconds"] >= 0
    # Its models are the ones its status shows, in the same states.
    assert {m["name"]: m["state"] for m in me["models"]} == {m["name"]: m["state"] for m in status["models"]}
    (fake,) = [m for m in me["models"] if m["name"] == "fake"]
    assert fake["state"] == "ready" and fake["queue_depth"] == 0 and fake["in_flight"] == 0
    assert fake["version"] and fake["device"] == "cpu"
    memory = me["memory"]
    assert memory["budget_ram_bytes"] == BUDGET_MB * 2**20 and memory["used_ram_bytes"] > 0
    assert memory["free_ram_bytes"] == max(0, memory["budget_ram_bytes"] - memory["used_ram_bytes"])

    key = tokens["admin"]
    target = f"127.0.0.1:{srv.grpc_port}"
    with Client(srv.url, api_key=key) as sdk_rest, GrpcClient(target, api_key=key) as sdk_grpc:
        views = [sdk_rest.cluster(), sdk_grpc.cluster()]

    async def both() -> list[dict[str, Any]]:
        async with AsyncClient(srv.url, api_key=key) as a_rest, AsyncGrpcClient(target, api_key=key) as a_rpc:
            return [await a_rest.cluster(), await a_rpc.cluster()]

    views += asyncio.run(both())
    for other in views:
        _shape(other)
        assert _stable(other) == _stable(view)


def test_an_infer_key_or_none_is_refused_at_both_doors(keyed: tuple[Server, dict[str, str]]) -> None:
    srv, tokens = keyed
    bare = httpx.get(srv.url + "/api/v1/cluster", timeout=10)
    assert bare.status_code == 401 and bare.json()["error_code"] == "UNAUTHORIZED"
    refused = httpx.get(srv.url + "/api/v1/cluster", headers={"Authorization": f"Bearer {tokens['infer']}"})
    assert refused.status_code == 403
    assert refused.json()["error_code"] == "FORBIDDEN" and refused.json()["trace_id"]
    key = tokens["infer"]
    with Client(srv.url, api_key=key) as rest, GrpcClient(f"127.0.0.1:{srv.grpc_port}", api_key=key) as rpc:
        for mm in (rest, rpc):
            with pytest.raises(AuthError) as err:
                mm.cluster()
            assert err.value.error_code == "FORBIDDEN"
        assert len(rest.embed("fake", ["a"])) == 1  # the key itself works
    with GrpcClient(f"127.0.0.1:{srv.grpc_port}") as anonymous, pytest.raises(AuthError) as err:
        anonymous.cluster()
    assert err.value.error_code == "UNAUTHORIZED" and err.value.grpc_status == "UNAUTHENTICATED"


def test_the_cli_prints_the_view_as_a_table_and_as_json(keyed: tuple[Server, dict[str, str]]) -> None:
    srv, tokens = keyed
    assert srv.client.post("/api/v1/models/fake/load").status_code == 200
    env = {**srv.env, "COLUMNS": "200", "MODELMORA_API_KEY": tokens["admin"]}
    table = cli(env, "--url", srv.url, "status", "--cluster").stdout
    assert "routing off" in table and "solo *" in table and "fake: ready, queue 0" in table, table
    assert "free memory" in table and "MiB" in table  # a budget is set: what is left of it
    dumped = json.loads(cli(env, "--url", srv.url, "status", "--cluster", "--json").stdout)
    _shape(dumped)
    assert dumped["self"] == "solo" and [r["id"] for r in dumped["replicas"]] == ["solo"]
    narrow = cli({**env, "COLUMNS": "80"}, "--url", srv.url, "status", "--cluster").stdout
    assert "solo *" in narrow and "fake: ready, queue 0" in narrow  # id and models kept
    refused = cli(
        {**env, "MODELMORA_API_KEY": tokens["infer"]}, "--url", srv.url, "status", "--cluster", check=False
    )
    assert refused.returncode == 1 and "FORBIDDEN" in refused.stderr


def test_openapi_documents_the_shape_and_metrics_label_the_route(
    keyed: tuple[Server, dict[str, str]],
) -> None:
    srv, _ = keyed
    spec = srv.client.get("/openapi.json").json()
    ok = spec["paths"]["/api/v1/cluster"]["get"]["responses"]["200"]["content"]["application/json"]
    assert ok["schema"]["$ref"].endswith("/ClusterView")
    schemas = spec["components"]["schemas"]
    assert set(schemas["ClusterView"]["properties"]) == {"enabled", "self", "replicas"}
    assert set(schemas["ClusterReplica"]["properties"]) == REPLICA_KEYS
    assert set(schemas["ClusterModel"]["properties"]) == MODEL_KEYS
    assert set(schemas["ClusterMemory"]["properties"]) == MEMORY_KEYS

    def counted(handler: str) -> float:
        text = srv.client.get("/metrics").text
        pattern = rf'^modelmora_http_requests_total\{{code="200",handler="{handler}"\}} (\S+)$'
        match = re.search(pattern, text, re.M)
        return float(match.group(1)) if match else 0.0

    before = counted("status"), counted("other")
    assert srv.client.get("/api/v1/cluster").status_code == 200
    assert (counted("status"), counted("other")) == (before[0] + 1, before[1])


# -- routing on: two replicas sharing Redis ----------------------------------------------------------


def start_advertised(data: Path, log: Path, replica_id: str, **env_extra: str) -> Server:
    """`start_server`, on ports chosen first so that the replica can advertise them."""
    port, grpc_port = free_port(), free_port()
    return start_server(
        data,
        log,
        port=port,
        grpc_port=grpc_port,
        MODELMORA_CLUSTER__ADVERTISE_URL=f"http://127.0.0.1:{port}",
        MODELMORA_CLUSTER__GRPC_ADVERTISE_URL=f"127.0.0.1:{grpc_port}",
        MODELMORA_CLUSTER__REPLICA_ID=replica_id,
        **env_extra,
    )


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _models(view: dict[str, Any], replica: str) -> dict[str, str]:
    row = next((r for r in view["replicas"] if r["id"] == replica), None)
    return {m["name"]: m["state"] for m in row["models"]} if row else {}


def test_routing_on_two_replicas_each_list_both(tmp_path: Path, redis_prefix: str) -> None:
    from tests.integration.test_job_store import REDIS_URL

    data = tmp_path / "data"  # one shared volume: registry and results
    env = clean_env(data)
    cli(env, "install", str(make_fake_model(tmp_path / "fake")), "--name", "fake")
    cli(env, "install", str(make_fake_model(tmp_path / "other")), "--name", "other")
    opts = {
        "MODELMORA_JOBS__BACKEND": "redis",
        "MODELMORA_JOBS__REDIS_URL": REDIS_URL,
        "MODELMORA_JOBS__REDIS_PREFIX": redis_prefix,
        "MODELMORA_RESULTS__SHARED": "true",
        "MODELMORA_CLUSTER__HEARTBEAT_SECONDS": "0.2",
        "MODELMORA_CLUSTER__TTL_SECONDS": "3",
    }
    a = start_advertised(data, tmp_path / "a.log", "rep-a", **opts)
    b: Server | None = None
    try:
        b = start_advertised(data, tmp_path / "b.log", "rep-b", **opts)
        assert a.client.post("/api/v1/models/fake/load").status_code == 200
        assert b.client.post("/api/v1/models/other/load").status_code == 200
        servers = {"rep-a": a, "rep-b": b}

        def settled(server: Server) -> bool:
            view = server.client.get("/api/v1/cluster").json()
            return (
                _models(view, "rep-a").get("fake") == "ready"
                and _models(view, "rep-b").get("other") == "ready"
            )

        for server in servers.values():
            _wait(lambda s=server: settled(s), "both replicas in the view with their models")
        for name, server in servers.items():
            view = server.client.get("/api/v1/cluster").json()
            _shape(view)
            assert view["enabled"] is True and view["self"] == name
            assert [r["id"] for r in view["replicas"]] == ["rep-a", "rep-b"]
            assert [r["id"] for r in view["replicas"] if r["self"]] == [name]
            for row in view["replicas"]:
                peer = servers[row["id"]]
                assert row["advertise_url"] == peer.url and row["grpc_url"] == f"127.0.0.1:{peer.grpc_port}"
                assert row["ready"] is True and row["version"] == __version__
            # The peer's row is what it heartbeated: its model there, not this replica's.
            assert "other" not in _models(view, "rep-a") and "fake" not in _models(view, "rep-b")
            with GrpcClient(f"127.0.0.1:{server.grpc_port}") as rpc:
                over_grpc = rpc.cluster()
            assert over_grpc["self"] == name and over_grpc["enabled"] is True
            assert [(r["id"], r["advertise_url"], r["self"]) for r in over_grpc["replicas"]] == [
                (r["id"], r["advertise_url"], r["self"]) for r in view["replicas"]
            ]
            assert (
                _models(over_grpc, "rep-a")["fake"] == "ready"
                and _models(over_grpc, "rep-b")["other"] == "ready"
            )
        table = cli({**a.env, "COLUMNS": "200"}, "--url", a.url, "status", "--cluster").stdout
        assert "routing on, 2 replica(s)" in table and "rep-a *" in table and "rep-b" in table
        assert b.url in table and "other: ready" in table

        b.stop()
        _wait(lambda: [r["id"] for r in a.client.get("/api/v1/cluster").json()["replicas"]] == ["rep-a"],
              "the stopped replica gone from the view")  # fmt: skip
    finally:
        a.stop()
        if b is not None:
            b.stop()
