"""Replicas that really share (issue 15), each problem on 2-3 real `modelmora serve` replicas
on loopback: model files from the model store (the real MiniLM), catalog changes reaching
every replica (through another replica and through the CLI), unshared results refused, fair
job claiming with deadlines from the start of the run, cluster-wide gauges exported once."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import make_fake_model, new_bucket
from tests.e2e.conftest import Server, clean_env, cli, free_port, start_server
from tests.e2e.test_jobs import submit, wait_job

MINILM = "all-MiniLM-L6-v2"


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def embed(server: Server, model: str, text: Any) -> httpx.Response:
    return server.client.post(f"/api/v1/infer/{model}", json={"input_data": {"text": text}})


def model_status(server: Server, name: str) -> dict[str, Any] | None:
    models = server.client.get("/api/v1/status").json()["models"]
    return next((m for m in models if m["name"] == name), None)


# -- 1. model files shared through the model store ------------------------------------------------


def test_minilm_installed_once_is_fetched_by_a_node_without_its_files(
    tmp_path: Path, pg_url: str, s3_endpoint: str, minilm_dir: Path
) -> None:
    bucket = new_bucket(s3_endpoint)
    shared = {
        "MODELMORA_REGISTRY__DATABASE_URL": pg_url,
        "MODELMORA_REGISTRY__MODEL_STORE": f"s3://{bucket}/models",
        "MODELMORA_REGISTRY__S3_ENDPOINT_URL": s3_endpoint,
    }
    installer = clean_env(tmp_path / "a", **shared)
    cli(installer, "install", "sentence-transformers/all-MiniLM-L6-v2", "--from", str(minilm_dir))
    cli(installer, "lock", cwd=tmp_path)
    local = tmp_path / "a" / "models" / MINILM
    b = start_server(tmp_path / "b", tmp_path / "b.log", **shared)
    try:
        assert not (tmp_path / "b" / "models").exists()
        texts = ["one", "two", "three", "four"]
        with ThreadPoolExecutor(len(texts)) as pool:  # concurrent first requests: one fetch
            answers = list(pool.map(lambda t: embed(b, MINILM, [t]), texts))
        assert [r.status_code for r in answers] == [200] * len(texts), answers[0].text
        assert all(len(r.json()["result"]["embeddings"][0]) == 384 for r in answers)
        log = b.log.read_text()
        assert log.count("model files fetched from the store") == 1
        version = next(local.iterdir()).name
        fetched = tmp_path / "b" / "models" / MINILM / version
        for path in (local / version).rglob("*"):
            if path.is_file():
                assert (fetched / path.relative_to(local / version)).read_bytes() == path.read_bytes()
    finally:
        b.stop()
    # A fresh node applying the lock fills its disk from the store, checksums verified.
    fresh = clean_env(tmp_path / "c", **shared)
    done = cli(fresh, "install", cwd=tmp_path)
    assert f"{MINILM}@{version}: fetched (checksums verified)" in done.stdout
    assert "present" in cli(fresh, "install", cwd=tmp_path).stdout


# -- 2. catalog changes reach every replica --------------------------------------------------------


def test_use_update_and_uninstall_reach_every_replica(tmp_path: Path, pg_url: str) -> None:
    shared = {
        "MODELMORA_REGISTRY__DATABASE_URL": pg_url,
        "MODELMORA_REGISTRY__MODEL_STORE": str(tmp_path / "store"),
    }
    env = clean_env(tmp_path / "a", **shared)
    cli(env, "install", str(make_fake_model(tmp_path / "v1")), "--name", "emb", "--version", "v1")
    cli(env, "install", str(make_fake_model(tmp_path / "v2", load_ms=1)), "--name", "emb", "--version", "v2")
    cli(env, "use", "emb@v1")
    replicas = [start_server(tmp_path / n, tmp_path / f"{n}.log", **shared) for n in ("a", "b", "c")]
    a, b, c = replicas
    try:
        for r in replicas:
            body = embed(r, "emb", "x").json()
            assert body["metadata"]["version"] == "v1" and len(body["result"]["embeddings"]) == 8

        cli(env, "use", "emb@v2")  # a write of the CLI, in its own process
        for r in replicas:
            wait_until(
                lambda r=r: embed(r, "emb", "x").json()["metadata"]["version"] == "v2", "v2 everywhere"
            )

        before = {r.url: (model_status(r, "emb") or {}).get("pid") for r in replicas}
        assert a.client.put("/api/v1/models/emb", json={"config": {"max_batch_size": 2}}).status_code == 200
        for r in (b, c):  # the worker was started with the old batch size: it is replaced
            wait_until(lambda r=r: (model_status(r, "emb") or {}).get("pid") != before[r.url], "reload")
        assert embed(c, "emb", "x").status_code == 200

        copy = tmp_path / "b" / "models" / "emb" / "v2"
        assert copy.is_dir()  # b fetched it from the store
        assert a.client.delete("/api/v1/models/emb", params={"force": "true"}).status_code == 200
        for r in (b, c):
            wait_until(lambda r=r: model_status(r, "emb") is None, "the model gone")
            assert embed(r, "emb", "x").json()["error_code"] == "MODEL_NOT_FOUND"
        assert not copy.exists()
        assert b.client.get("/api/v1/status").json()["catalog"]["listening"] is True
    finally:
        for r in replicas:
            r.stop()


# -- 3. results every replica can read ----------------------------------------------------------------


def test_redis_jobs_with_unshared_file_results_refuse_to_start(tmp_path: Path, redis_prefix: str) -> None:
    from tests.integration.test_job_store import REDIS_URL

    env = clean_env(
        tmp_path / "data",
        MODELMORA_JOBS__BACKEND="redis",
        MODELMORA_JOBS__REDIS_URL=REDIS_URL,
        MODELMORA_JOBS__REDIS_PREFIX=redis_prefix,
    )
    refused = cli(env, "serve", "--port", str(free_port()), "--grpc-port", str(free_port()), check=False)
    assert refused.returncode == 2
    assert "results are not shared" in refused.stderr and "results.shared" in refused.stderr


# -- 4. fair claiming, 5. cluster-wide gauges once --------------------------------------------------


def test_jobs_are_claimed_a_batch_at_a_time_timed_from_their_start_and_counted_once(
    tmp_path: Path, redis_prefix: str
) -> None:
    from tests.integration.test_job_store import REDIS_URL

    data = tmp_path / "data"  # one shared volume: registry and results
    # Loading takes longer than a job's timeout: the load must not count against it.
    cli(
        clean_env(data),
        "install",
        str(make_fake_model(tmp_path / "f", delay_ms=300, load_ms=4000)),
        "--name",
        "f",
    )
    opts = {
        "MODELMORA_JOBS__BACKEND": "redis",
        "MODELMORA_JOBS__REDIS_URL": REDIS_URL,
        "MODELMORA_JOBS__REDIS_PREFIX": redis_prefix,
        "MODELMORA_JOBS__POLL_SECONDS": "0.2",
        "MODELMORA_RESULTS__SHARED": "true",
        "MODELMORA_SCHEDULER__MAX_BATCH_SIZE": "2",
    }
    a = start_server(data, tmp_path / "a.log", **opts)
    b = start_server(data, tmp_path / "b.log", **opts)
    try:
        jobs = [submit(a.client, "f", f"t{i}", timeout_seconds=3).json()["job_id"] for i in range(24)]
        most = 0
        while not all(
            a.client.get(f"/api/v1/jobs/{j}").json()["status"] in ("completed", "failed") for j in jobs
        ):
            for r in (a, b):
                most = max(most, r.client.get("/api/v1/status").json()["jobs_running"])
            time.sleep(0.02)
        finished = [wait_job(a.client, j, {"completed", "failed"}) for j in jobs]
        assert [f["status"] for f in finished] == ["completed"] * 24, [f["error"] for f in finished]
        assert most <= 2  # one batch per replica, never two batches' worth
        done = {r.url: _metric(r, 'modelmora_jobs_processed{outcome="completed"}') for r in (a, b)}
        assert sum(done.values()) == 24 and all(done.values()), done  # both did some

        def reporters() -> int:
            return sum(
                1 for r in (a, b) if 'modelmora_jobs{status="completed"}' in r.client.get("/metrics").text
            )

        wait_until(lambda: reporters() == 1, "one replica exporting the cluster-wide job gauges")
        assert all("modelmora_jobs_running " in r.client.get("/metrics").text for r in (a, b))
    finally:
        a.stop()
        b.stop()


def _metric(server: Server, sample: str) -> float:
    text = server.client.get("/metrics").text
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_a_job_stuck_behind_a_load_waiting_for_memory_goes_to_an_idle_replica(
    tmp_path: Path, redis_prefix: str
) -> None:
    from tests.integration.test_job_store import REDIS_URL

    data = tmp_path / "data"
    env = clean_env(data)
    cli(env, "install", str(make_fake_model(tmp_path / "hog", ballast_mb=150)), "--name", "hog")
    cli(env, "install", str(make_fake_model(tmp_path / "job", ballast_mb=150)), "--name", "job")
    opts = {
        "MODELMORA_JOBS__BACKEND": "redis",
        "MODELMORA_JOBS__REDIS_URL": REDIS_URL,
        "MODELMORA_JOBS__REDIS_PREFIX": redis_prefix,
        "MODELMORA_JOBS__POLL_SECONDS": "0.2",
        "MODELMORA_JOBS__RELEASE_AFTER_SECONDS": "0.5",
        "MODELMORA_RESULTS__SHARED": "true",
        "MODELMORA_RESOURCES__WORKER_START": "fresh",
    }
    # Replica a has room for one of the two models only, and "hog" is busy with a long request.
    a = start_server(data, tmp_path / "a.log", MODELMORA_RESOURCES__MAX_MEMORY_MB="260", **opts)
    b: Server | None = None
    try:
        declared = {"resource_requirements": {"memory_mb": 200}}
        assert a.client.put("/api/v1/models/job", json=declared).status_code == 200
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(embed, a, "hog", "sleep:30000")
            wait_until(
                lambda: (
                    a.model_in_flight("hog") == 1 and (model_status(a, "hog") or {}).get("state") == "ready"
                ),
                "hog busy",
            )
            job = submit(a.client, "job", "to run elsewhere").json()["job_id"]
            wait_until(
                lambda: (model_status(a, "job") or {}).get("state") == "loading",
                "the load waiting for memory",
            )
            b = start_server(data, tmp_path / "b.log", **opts)
            done = wait_job(b.client, job, {"completed", "failed"})
            assert done["status"] == "completed" and done["attempts"] == 1
            assert _metric(a, 'modelmora_jobs_processed{outcome="released"}') == 1
            assert _metric(b, 'modelmora_jobs_processed{outcome="completed"}') == 1
            a.client.post("/api/v1/models/hog/unload", params={"force": "true"})
            busy.result(timeout=60)
    finally:
        a.stop()
        if b is not None:
            b.stop()
