"""The cluster view's pure parts: the gRPC message round-trips to REST's dict, the documented
response model accepts what the service returns, both doors' policies ask `admin` for it, and
`modelmora status --cluster` renders one row per replica that fits a narrow terminal."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from modelmora.api.schemas import ClusterView
from modelmora.auth.keys import Scope
from modelmora.auth.policy import grpc_scope, rest_scope
from modelmora.cluster.view import ModelPresence, ReplicaInfo, view_document
from modelmora.status_view import cluster_table, render_cluster
from modelmora.v1.convert import cluster_to_dict, cluster_to_proto

GIB = 2**30


def _view(enabled: bool = True) -> dict[str, Any]:
    here = ReplicaInfo(
        id="pod-a-17-abc123",
        advertise_url="http://10.0.0.1:8000",
        grpc_url="10.0.0.1:50051",
        heartbeat_at=1000.0,
        version="1.2.3",
        started_at=900.0,
        in_flight=2,
        queued=1,
        memory={"budget_ram_bytes": 4 * GIB, "used_ram_bytes": GIB, "free_ram_bytes": 3 * GIB},
        models=(
            ModelPresence("all-MiniLM-L6-v2", "ready", "v1", queue_depth=0, in_flight=2, device="cpu"),
            ModelPresence("slow", "loading", None, queue_depth=3, in_flight=3),
        ),
    )
    peer = ReplicaInfo(
        id="pod-b-9-def456",
        advertise_url="http://10.0.0.2:8000",
        heartbeat_at=999.2,
        ready=False,
        draining=True,
        memory={"budget_ram_bytes": 0, "used_ram_bytes": 5, "free_ram_bytes": 0},
    )
    return view_document("pod-a-17-abc123", enabled, [peer, here] if enabled else [here], now=1000.5)


def test_the_message_round_trips_to_the_rest_dict() -> None:
    for enabled in (True, False):
        body = _view(enabled)
        message = cluster_to_proto(body)
        assert message.self_id == "pod-a-17-abc123" and message.enabled is enabled
        assert [r.is_self for r in message.replicas] == [r["self"] for r in body["replicas"]]
        assert cluster_to_dict(message) == body  # None, 0 and False included
    body = _view()
    assert [r["id"] for r in body["replicas"]] == ["pod-a-17-abc123", "pod-b-9-def456"]
    assert body["replicas"][1]["grpc_url"] is None and body["replicas"][1]["age_seconds"] == 1.3


def test_the_documented_model_takes_the_service_dict_as_is() -> None:
    body = _view()
    parsed = ClusterView.model_validate(body)
    assert parsed.self_id == body["self"] and parsed.replicas[0].is_self is True
    assert parsed.model_dump(by_alias=True) == body  # every key documented, none missing


def test_both_doors_ask_admin_for_the_view_as_for_the_status() -> None:
    assert rest_scope("GET", "/api/v1/cluster", metrics_public=True) is Scope.ADMIN
    assert rest_scope("GET", "/api/v1/status", metrics_public=True) is Scope.ADMIN
    assert grpc_scope("/modelmora.v1.ManagementService/GetCluster") is Scope.ADMIN
    assert grpc_scope("/modelmora.v1.ManagementService/GetSystemStatus") is Scope.ADMIN


def _text(renderables: list[Any], width: int) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    for item in renderables:
        console.print(item)
    return console.export_text()


def test_the_table_has_a_row_per_replica_with_its_models_one_per_line() -> None:
    text = _text(render_cluster(_view(), 200), 200)
    assert text.startswith("cluster: routing on, 2 replica(s); * = pod-a-17-abc123, which answered")
    lines = text.splitlines()
    (mine,) = [line for line in lines if "pod-a-17-abc123 *" in line]
    assert "all-MiniLM-L6-v2: ready, queue 0, 2 in flight" in mine
    assert "ready" in mine and "http://10.0.0.1:8000" in mine and "3,072 MiB" in mine and "0.5 s" in mine
    # The second model on the next line of the same row.
    following = lines[lines.index(mine) + 1]
    assert "slow: loading, queue 3, 3 in flight" in following and "pod-b" not in following
    (peer,) = [line for line in lines if "pod-b-9-def456" in line]
    assert "pod-b-9-def456 *" not in peer
    assert "draining" in peer and "no budget" in peer and "1.3 s" in peer and "│ -" in peer
    assert "narrow terminal" not in text


def test_routing_off_says_so_and_a_narrow_terminal_keeps_ids_and_models() -> None:
    off = _text(render_cluster(_view(enabled=False), 120), 120)
    assert off.startswith("cluster: routing off (cluster.advertise_url not set), this replica alone")
    narrow = _text([cluster_table(_view(), 80)], 80)
    assert max(len(line) for line in narrow.splitlines()) <= 80
    assert "pod-a-17-abc123 *" in narrow and "pod-b-9-def456" in narrow
    assert "all-MiniLM-L6-v2: ready, queue 0, 2 in flight" in narrow  # one line: not folded
    assert "slow: loading, queue 3, 3 in flight" in narrow
    caption = narrow[narrow.index("(narrow terminal:") :]
    assert "url" in caption and "age" in caption and "models" not in caption
