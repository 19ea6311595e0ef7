"""The replicated compose stack with its host-network override: two replicas of the built image
on this machine's PostgreSQL and Redis, sharing one volume, behind nginx. Both answer, through
the load balancer too, a job submitted to one is readable, result included, from the other, each
lists both in its cluster view, and a request for a model loaded on one is answered through the
other by forwarding. Runs when MODELMORA_IMAGE is set (.ci/run; MODELMORA_LB_IMAGE names a local
nginx image)."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelmora.client import GrpcClient
from tests.conftest import make_fake_model
from tests.deploy.conftest import BOOTSTRAP_KEY, DOCKER, IMAGE, auth_headers, docker, until

pytestmark = [pytest.mark.container, pytest.mark.postgres]
COMPOSE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "compose"
# the ports replicated.host.yml and nginx.host.conf give the replicas and the load balancer
REPLICAS = ("http://127.0.0.1:18001", "http://127.0.0.1:18002")
REPLICAS_GRPC = dict(zip(REPLICAS, ("127.0.0.1:18051", "127.0.0.1:18052"), strict=True))
LB_REST, LB_GRPC = "http://127.0.0.1:18000", "127.0.0.1:18050"
CLUSTER_SECRET = "deploy-check-cluster-secret-0123456789abcdef"
# installed for the routing test alone: no replica has loaded it before that test
ROUTED = "fake-routed"


@pytest.fixture(scope="module")
def stack(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    tmp = tmp_path_factory.mktemp("compose")
    env_file = tmp / "modelmora.env"
    # inline_max_bytes 0: every job result goes to the shared files, not into Redis
    # the cluster secret: the credential of the requests one replica forwards to the other
    env_file.write_text(
        f"MODELMORA_AUTH__BOOTSTRAP_KEY={BOOTSTRAP_KEY}\nMODELMORA_RESULTS__INLINE_MAX_BYTES=0\n"
        f"MODELMORA_CLUSTER__SECRET={CLUSTER_SECRET}\n",
        encoding="utf-8",
    )
    project = f"mmcheck{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "MODELMORA_IMAGE": IMAGE,
        "MODELMORA_ENV_FILE": str(env_file),
        "MODELMORA_LB_IMAGE": os.environ.get("MODELMORA_LB_IMAGE", "nginx:1.27"),
        "MODELMORA_DATABASE_URL": postgres_url.replace("@localhost", "@127.0.0.1"),
        "MODELMORA_REDIS_URL": "redis://127.0.0.1:6379/0",
        "MODELMORA_REDIS_PREFIX": f"{project}:",
    }
    base = ["docker-compose", "-p", project, "-f", "replicated.yml", "-f", "replicated.host.yml"]

    def compose(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*base, *args], cwd=COMPOSE_DIR, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
        return result

    try:
        compose("up", "-d", "--no-deps", "modelmora-1", "modelmora-2", "lb-host")
        for url in REPLICAS:
            until(
                lambda url=url: httpx.get(f"{url}/health/ready", timeout=5).status_code == 200,
                timeout=120,
                what=f"{url} is ready",
            )
        # a model on the shared volume, installed through replica 1 (catalog in PostgreSQL)
        container_1 = compose("ps", "-q", "modelmora-1").stdout.strip()
        docker("exec", container_1, "mkdir", "-p", "/data/sources")
        for name in ("fake-embed", ROUTED):
            docker("cp", str(make_fake_model(tmp / name)), f"{container_1}:/data/sources/")
            docker("exec", container_1, "modelmora", "install", f"/data/sources/{name}")
        yield [DOCKER, project]
    finally:
        logs = subprocess.run([*base, "logs", "--tail", "30"], cwd=COMPOSE_DIR, env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        print(logs.stdout[-6000:])
        subprocess.run([*base, "down", "-v", "--timeout", "45"], cwd=COMPOSE_DIR, env=env,
                       capture_output=True, text=True, timeout=180)  # fmt: skip


def test_both_replicas_and_the_load_balancer_answer(stack: list[str]) -> None:
    for url in (*REPLICAS, LB_REST):
        response = httpx.post(
            f"{url}/infer/fake-embed", json={"text": "hello"}, headers=auth_headers(), timeout=60
        )
        assert response.status_code == 200, (url, response.text)
        assert len(response.json()["result"]["embeddings"]) == 8
    client = GrpcClient(LB_GRPC, metadata=(("authorization", f"Bearer {BOOTSTRAP_KEY}"),), timeout=60)
    try:
        assert client.health()["ready"] is True
        assert client.embed("fake-embed", "hello").shape == (8,)
    finally:
        client.close()


def test_a_job_submitted_to_one_replica_is_read_from_the_other(stack: list[str]) -> None:
    first, second = REPLICAS
    submitted = httpx.post(
        f"{first}/api/v1/infer/fake-embed/async",
        json={"input_data": {"text": ["a", "b", "c"]}},
        headers=auth_headers(),
        timeout=60,
    )
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["job_id"]

    def completed() -> bool:
        job = httpx.get(f"{second}/api/v1/jobs/{job_id}", headers=auth_headers(), timeout=10)
        assert job.status_code == 200, job.text
        assert job.json()["status"] not in ("failed", "cancelled", "expired"), job.text
        return bool(job.json()["status"] == "completed")

    until(completed, timeout=120, what="the job is completed, seen from the other replica")
    result = httpx.get(f"{second}/api/v1/jobs/{job_id}/result", headers=auth_headers(), timeout=30)
    assert result.status_code == 200, result.text
    # inline_max_bytes 0: the result is a file in the shared volume, served by this replica too
    stored = result.json()["result"]
    assert stored["url"].startswith("/api/v1/results/"), stored
    body = httpx.get(f"{second}{stored['url']}", headers=auth_headers(), timeout=30)
    assert body.status_code == 200, body.text
    assert len(body.json()["embeddings"]) == 3, body.text[:300]


def cluster_view(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/api/v1/cluster", headers=auth_headers(), timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_each_replica_lists_both_in_the_cluster_view(stack: list[str]) -> None:
    for url in REPLICAS:

        def both(url: str = url) -> dict[str, Any] | None:
            view = cluster_view(url)
            return view if {r["advertise_url"] for r in view["replicas"]} == set(REPLICAS) else None

        # each replica reads the other's record within a heartbeat or two
        view = until(both, timeout=30, what=f"{url} lists both replicas")
        assert view["enabled"] is True
        (me,) = (r for r in view["replicas"] if r["self"])
        assert me["advertise_url"] == url and me["id"] == view["self"]
        assert me["grpc_url"] == REPLICAS_GRPC[url]


def forwarded(url: str, model: str) -> float:
    """modelmora_forwarded_requests{outcome="forwarded"} of one replica for one model."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            wanted = sample.name == "modelmora_forwarded_requests_total"
            if wanted and sample.labels == {"model": model, "outcome": "forwarded"}:
                return float(sample.value)
    return 0.0


def test_a_model_loaded_on_one_replica_is_served_through_the_other(stack: list[str]) -> None:
    first, second = REPLICAS
    body = {"text": "where is the model?"}
    # nobody holds the model yet: replica 1 serves it itself, loading it
    direct = httpx.post(f"{first}/infer/{ROUTED}", json=body, headers=auth_headers(), timeout=60)
    assert direct.status_code == 200, direct.text

    def holders() -> set[str]:
        return {
            replica["advertise_url"]
            for replica in cluster_view(second)["replicas"]
            for model in replica["models"]
            if model["name"] == ROUTED and model["state"] == "ready"
        }

    until(lambda: holders() == {first}, timeout=30, what="replica 2 sees the model ready on replica 1")
    before = forwarded(second, ROUTED)
    routed = httpx.post(f"{second}/infer/{ROUTED}", json=body, headers=auth_headers(), timeout=60)
    assert routed.status_code == 200, routed.text
    assert routed.json()["result"]["embeddings"] == direct.json()["result"]["embeddings"]
    # replica 2 forwarded it to replica 1 and loaded no copy of its own
    assert forwarded(second, ROUTED) == before + 1
    assert holders() == {first}
