"""Model-affinity routing (issue 17) on real `modelmora serve` replicas sharing PostgreSQL,
Redis and a model store: a request sent to a replica that lacks the model is answered by the
one that holds it, through every door, with the same answer; at most one hop; a holder that
is gone is worked around; a caller without a valid key never gets past the first replica."""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from modelmora.auth.keys import Principal, Scope
from modelmora.client import GrpcClient
from modelmora.cluster.hop import CLUSTER_KEY, HOP, PRINCIPAL, encode_principal
from tests.conftest import make_fake_model
from tests.e2e.conftest import Server, clean_env, cli, fresh_database, redis_namespace, start_server

KEY = "bootstrap-" + "k" * 40
SECRET = "cluster-" + "s" * 40
AUTH = {"authorization": f"Bearer {KEY}"}


def forwarded(server: Server, model: str, outcome: str = "forwarded") -> float:
    text = server.client.get("/metrics").text
    found = re.search(
        rf'modelmora_forwarded_requests_total{{model="{model}",outcome="{outcome}"}} (\S+)', text
    )
    return float(found.group(1)) if found else 0.0


def loaded_here(server: Server, model: str) -> bool:
    models = server.client.get("/api/v1/status", headers=AUTH).json()["models"]
    return any(m["name"] == model and m["pid"] is not None for m in models)


def sees(server: Server, holder: str, model: str, state: str = "ready") -> bool:
    """`server`'s cluster view shows replica `holder` holding `model`."""
    view = server.client.get("/api/v1/cluster", headers=AUTH).json()
    return any(
        r["id"] == holder and any(m["name"] == model and m["state"] == state for m in r["models"])
        for r in view["replicas"]
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> Iterator[dict[str, Any]]:
    with fresh_database(postgres_url, "route") as pg_url, redis_namespace("mmroute") as prefix:
        yield from _cluster(tmp_path_factory, pg_url, prefix)


def _cluster(tmp_path_factory: pytest.TempPathFactory, pg_url: str, prefix: str) -> Iterator[dict[str, Any]]:
    from tests.integration.test_job_store import REDIS_URL

    tmp = tmp_path_factory.mktemp("routing")
    shared = {
        "MODELMORA_REGISTRY__DATABASE_URL": pg_url,
        "MODELMORA_REGISTRY__MODEL_STORE": str(tmp / "store"),
        "MODELMORA_JOBS__BACKEND": "redis",
        "MODELMORA_JOBS__REDIS_URL": REDIS_URL,
        "MODELMORA_JOBS__REDIS_PREFIX": prefix,
        "MODELMORA_RESULTS__SHARED": "true",
        "MODELMORA_RESULTS__INLINE_MAX_BYTES": str(1 << 20),
        "MODELMORA_AUTH__ENABLED": "true",
        "MODELMORA_AUTH__BOOTSTRAP_KEY": KEY,
        "MODELMORA_CLUSTER__SECRET": SECRET,
        "MODELMORA_CLUSTER__TTL_SECONDS": "6",  # the SIGKILL test acts before the record expires
        "MODELMORA_CLUSTER__SATURATION_QUEUE_DEPTH": "2",
    }
    installer = clean_env(tmp / "installer", **shared)
    suffix = uuid.uuid4().hex[:6]
    names = {
        "emb": f"emb-{suffix}",
        "gen": f"gen-{suffix}",
        "other": f"other-{suffix}",
        "slow": f"slow-{suffix}",
    }
    cli(installer, "install", str(make_fake_model(tmp / "emb")), "--name", names["emb"])
    cli(installer, "install", str(make_fake_model(tmp / "gen", task_type="txt2txt")), "--name", names["gen"])
    cli(installer, "install", str(make_fake_model(tmp / "other", ndarray=True)), "--name", names["other"])
    slow = make_fake_model(tmp / "slow", ndarray=True, delay_ms=150)
    cli(installer, "install", str(slow), "--name", names["slow"])
    cli(installer, "update", names["slow"], "--set", "max_batch_size=1")
    servers: dict[str, Server] = {}

    def start(rid: str) -> Server:
        from tests.e2e.conftest import free_port

        port = free_port()
        env = {
            **shared,
            "MODELMORA_CLUSTER__REPLICA_ID": rid,
            "MODELMORA_CLUSTER__ADVERTISE_URL": f"http://127.0.0.1:{port}",
        }
        server = start_server(tmp / rid, tmp / f"{rid}.log", port=port, **env)
        servers[rid] = server
        return server

    start("a")
    start("b")
    try:
        yield {"servers": servers, "start": start, "names": names, "installer": installer}
    finally:
        for server in servers.values():
            server.stop()


def test_forwarded_requests_answer_as_direct_ones_at_every_door(cluster: dict[str, Any]) -> None:
    a, b = cluster["servers"]["a"], cluster["servers"]["b"]
    emb, gen = cluster["names"]["emb"], cluster["names"]["gen"]
    for model in (emb, gen):
        assert a.client.post(f"/api/v1/models/{model}/load", headers=AUTH).status_code == 200
        b.wait_until(lambda model=model: sees(b, "a", model), f"b sees a holding {model}")

    # REST
    body = {"input_data": {"text": ["hello", "routing"]}}
    direct = a.client.post(f"/api/v1/infer/{emb}", json=body, headers=AUTH)
    via_b = b.client.post(f"/api/v1/infer/{emb}", json=body, headers=AUTH)
    assert via_b.status_code == 200, via_b.text
    assert via_b.json()["result"] == direct.json()["result"]
    assert {k: v for k, v in via_b.json()["metadata"].items()} == direct.json()["metadata"]
    assert forwarded(b, emb) == 1
    # gRPC, unary and the generation stream
    with (
        GrpcClient(f"127.0.0.1:{a.grpc_port}", api_key=KEY) as ga,
        GrpcClient(f"127.0.0.1:{b.grpc_port}", api_key=KEY) as gb,
    ):
        grpc_direct = ga.infer(emb, {"text": ["hello", "routing"]})
        grpc_via_b = gb.infer(emb, {"text": ["hello", "routing"]})
        np.testing.assert_array_equal(grpc_via_b["result"]["embeddings"], grpc_direct["result"]["embeddings"])
        np.testing.assert_array_equal(
            np.asarray(grpc_via_b["result"]["embeddings"]),
            np.asarray(direct.json()["result"]["embeddings"], "<f4"),
        )
        tokens_a = [e for e in ga.generate_stream(gen, {"text": "once upon"}, {"seed": 3, "max_tokens": 12})]
        tokens_b = [e for e in gb.generate_stream(gen, {"text": "once upon"}, {"seed": 3, "max_tokens": 12})]

    def strip(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The events without their timing (which differs; the rest must not)."""
        return [{**e, "data": {k: v for k, v in e["data"].items() if k != "timing"}} for e in events]

    assert strip(tokens_b) == strip(tokens_a) and len(tokens_b) > 2
    # REST server-sent events
    sse = {
        "input_data": {"text": "once upon"},
        "parameters": {"seed": 3, "max_tokens": 12},
        "stream": True,
    }
    events_a = a.client.post(f"/api/v1/infer/{gen}", json=sse, headers=AUTH).text
    events_b = b.client.post(f"/api/v1/infer/{gen}", json=sse, headers=AUTH).text
    tokens = lambda text: [line for line in text.splitlines() if line.startswith('data: {"text"')]  # noqa: E731
    assert tokens(events_b) == tokens(events_a) and len(tokens(events_a)) == 12
    assert "event: done" in events_b
    # the OpenAI door too
    oa = b.client.post("/v1/embeddings", json={"model": emb, "input": "hello"}, headers=AUTH)
    assert oa.status_code == 200 and len(oa.json()["data"][0]["embedding"]) == 8
    # and b never loaded either model: the copies stayed one each
    assert not loaded_here(b, emb) and not loaded_here(b, gen)
    assert forwarded(b, gen) == 2
    # the holder's refusal of bad input reaches the caller as it is
    bad = b.client.post(f"/api/v1/infer/{emb}", json={"input_data": {"text": 5}}, headers=AUTH)
    assert bad.status_code == 422 and bad.json()["error_code"] == "VALIDATION_ERROR", bad.text
    assert set(bad.json()) == {"error_code", "message", "details", "trace_id"}
    assert forwarded(b, emb, "error") == 1


def test_a_forwarded_request_is_never_forwarded_again(cluster: dict[str, Any]) -> None:
    """b thinks a holds the model; a request that reaches b over the hop (as if from a, which
    thinks b holds it) is served by b itself: one hop at most, no loop."""
    a, b = cluster["servers"]["a"], cluster["servers"]["b"]
    other = cluster["names"]["other"]
    assert a.client.post(f"/api/v1/models/{other}/load", headers=AUTH).status_code == 200
    b.wait_until(lambda: sees(b, "a", other), "b sees a holding the model")
    caller = Principal(None, "bootstrap", frozenset(Scope))
    hop = {
        HOP.decode(): "a",
        CLUSTER_KEY.decode(): SECRET,
        PRINCIPAL.decode(): encode_principal(caller).decode(),
    }
    before = forwarded(b, other)
    answer = b.client.post(f"/api/v1/infer/{other}", json={"input_data": {"text": "x"}}, headers=hop)
    assert answer.status_code == 200, answer.text
    assert forwarded(b, other) == before  # served at b
    assert loaded_here(b, other)


def test_a_caller_without_a_valid_key_is_refused_before_forwarding(cluster: dict[str, Any]) -> None:
    a, b = cluster["servers"]["a"], cluster["servers"]["b"]
    emb = cluster["names"]["emb"]
    b.wait_until(lambda: sees(b, "a", emb), "b sees a holding the model")
    before_b = forwarded(b, emb)
    for headers in ({}, {"authorization": "Bearer mm_wrong"}):
        refused = b.client.post(f"/api/v1/infer/{emb}", json={"input_data": {"text": "x"}}, headers=headers)
        assert refused.status_code == 401 and refused.json()["error_code"] == "UNAUTHORIZED"
    assert forwarded(b, emb) == before_b
    # a forged hop (no cluster credential, or a wrong one) is refused at the holder itself
    caller = encode_principal(Principal(None, "bootstrap", frozenset(Scope))).decode()
    for key in (None, "t" * 40):
        headers = {HOP.decode(): "b", PRINCIPAL.decode(): caller}
        if key is not None:
            headers[CLUSTER_KEY.decode()] = key
        forged = a.client.post(f"/api/v1/infer/{emb}", json={"input_data": {"text": "x"}}, headers=headers)
        assert forged.status_code == 401, forged.text
    # a key with the infer scope alone is carried over the hop and accepted by the holder
    infer_key = cli(cluster["installer"], "keys", "create", "infer-only", "--scope", "infer").stdout.strip()
    ok = b.client.post(
        f"/api/v1/infer/{emb}",
        json={"input_data": {"text": "x"}},
        headers={"authorization": f"Bearer {infer_key}"},
    )
    assert ok.status_code == 200 and forwarded(b, emb) == before_b + 1


def test_copies_grow_with_demand(cluster: dict[str, Any]) -> None:
    """The holder's queue for the model reaches cluster.saturation_queue_depth (2 here): the
    replica receiving the traffic stops forwarding and loads a copy of its own."""
    a, b = cluster["servers"]["a"], cluster["servers"]["b"]
    slow = cluster["names"]["slow"]
    assert a.client.post(f"/api/v1/models/{slow}/load", headers=AUTH).status_code == 200
    b.wait_until(lambda: sees(b, "a", slow), "b sees a holding the model")
    statuses: list[int] = []
    stop = time.monotonic() + 60

    def send() -> None:
        with httpx.Client(base_url=b.url, timeout=60) as client:
            while time.monotonic() < stop and not loaded_here(b, slow):
                answer = client.post(
                    f"/api/v1/infer/{slow}", json={"input_data": {"text": "x"}}, headers=AUTH
                )
                statuses.append(answer.status_code)

    with ThreadPoolExecutor(6) as pool:  # one batch of one every 150 ms at a: a queue forms
        for _ in pool.map(lambda _: send(), range(6)):
            pass
    assert loaded_here(b, slow), "b never loaded its own copy"
    assert forwarded(b, slow) >= 1  # it forwarded first, while a had room
    assert set(statuses) == {200}


def test_an_unreachable_holder_is_worked_around(cluster: dict[str, Any]) -> None:
    """The holder is SIGKILLed: its record outlives it (up to the TTL), the first request
    finds it unreachable and is served locally, and the next ones skip it."""
    b = cluster["servers"]["b"]
    c = cluster["start"]("c")
    name = f"gone-{uuid.uuid4().hex[:6]}"
    source = make_fake_model(Path(c.env["MODELMORA_SERVER__DATA_DIR"]).parent / f"src-{name}", ndarray=True)
    cli(cluster["installer"], "install", str(source), "--name", name)
    assert c.client.post(f"/api/v1/models/{name}/load", headers=AUTH).status_code == 200
    b.wait_until(lambda: sees(b, "c", name), "b sees c holding the model")
    os.kill(c.proc.pid, signal.SIGKILL)
    c.proc.wait()
    assert sees(b, "c", name)  # still in the view: the record has not expired yet
    answers = [
        b.client.post(f"/api/v1/infer/{name}", json={"input_data": {"text": "x"}}, headers=AUTH)
        for _ in range(3)
    ]
    assert [r.status_code for r in answers] == [200, 200, 200], answers[0].text
    assert forwarded(b, name, "fallback") == 1 and forwarded(b, name) == 0
    assert loaded_here(b, name)
    b.wait_until(
        lambda: (
            not any(r["id"] == "c" for r in b.client.get("/api/v1/cluster", headers=AUTH).json()["replicas"])
        ),
        "c gone from the view",
        timeout=20,
    )
