"""Async jobs over HTTP against a real `modelmora serve`, including SIGKILL and restart."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelmora.tasks.fake import fake_vector
from tests.conftest import make_fake_model
from tests.e2e.conftest import Server, clean_env, cli, start_server


def wait_job(client: httpx.Client, job_id: str, until: set[str], timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.get(f"/api/v1/jobs/{job_id}").json()
        if body["status"] in until:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {body['status']} after {timeout} s: {body}")
        time.sleep(0.05)


def submit(client: httpx.Client, model: str, text: Any, **extra: Any) -> httpx.Response:
    headers = extra.pop("headers", None)
    return client.post(
        f"/api/v1/infer/{model}/async", json={"input_data": {"text": text}, **extra}, headers=headers
    )


@pytest.fixture(scope="module")
def jobs_server(module_tmp: Path) -> Iterator[Server]:
    data = module_tmp / "data"
    env = clean_env(data)
    cli(env, "install", str(make_fake_model(module_tmp / "fake")), "--name", "fake")
    srv = start_server(
        data,
        module_tmp / "server.log",
        # One request per batch, so at most two jobs of a model run at once and the rest
        # wait in the store: queued jobs stay observable.
        MODELMORA_SCHEDULER__MAX_BATCH_SIZE="1",
        MODELMORA_RESULTS__INLINE_MAX_BYTES="4000",
    )
    yield srv
    srv.stop()


def test_submit_poll_and_result_match_the_synchronous_answer(jobs_server: Server) -> None:
    c = jobs_server.client
    r = submit(c, "fake", ["one", "two"], priority="high")
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert set(accepted) == {"job_id", "status", "created_at"}
    assert r.headers["location"] == f"/api/v1/jobs/{accepted['job_id']}"
    assert str(uuid.UUID(accepted["job_id"])) == accepted["job_id"]
    done = wait_job(c, accepted["job_id"], {"completed", "failed"})
    assert done["status"] == "completed" and done["attempts"] == 1 and done["progress"] == 1.0
    assert done["priority"] == 2 and done["started_at"] and done["completed_at"] and done["error"] is None
    result = c.get(f"/api/v1/jobs/{accepted['job_id']}/result")
    assert result.status_code == 200
    body = result.json()
    assert body["result"]["embeddings"] == [fake_vector("one", 8), fake_vector("two", 8)]
    assert body["metadata"]["model"] == "fake" and body["metadata"]["batch_size"] == 2
    assert set(body["timing"]) == {"queue_time_ms", "inference_time_ms", "total_time_ms"}
    sync = c.post("/api/v1/infer/fake", json={"input_data": {"text": ["one", "two"]}}).json()
    assert sync["result"] == body["result"]


def test_idempotency_key_gives_the_same_job_and_refuses_another_body(jobs_server: Server) -> None:
    c = jobs_server.client
    key = {"Idempotency-Key": f"order-{uuid.uuid4().hex}"}
    first = submit(c, "fake", "same", headers=key)
    again = submit(c, "fake", "same", headers=key)
    assert first.status_code == again.status_code == 202
    assert first.json()["job_id"] == again.json()["job_id"]
    assert again.headers["idempotent-replayed"] == "true"
    other = submit(c, "fake", "different", headers=key)
    assert other.status_code == 409
    assert other.json()["error_code"] == "IDEMPOTENCY_CONFLICT"
    assert other.json()["details"]["job_id"] == first.json()["job_id"]


def test_cli_lists_jobs(jobs_server: Server) -> None:
    c = jobs_server.client
    job = submit(c, "fake", "from the cli").json()["job_id"]
    wait_job(c, job, {"completed"})
    wide = {**jobs_server.env, "COLUMNS": "200"}
    shown = cli(wide, "--url", jobs_server.url, "jobs", "--status", "completed", "--limit", "1000")
    assert job in shown.stdout and "completed" in shown.stdout
    none = cli(jobs_server.env, "--url", jobs_server.url, "jobs", "--status", "cancelled", "--model", "nope")
    assert "0 in all" in none.stdout
    bad = cli(jobs_server.env, "--url", jobs_server.url, "jobs", "--status", "sleeping", check=False)
    assert bad.returncode != 0 and "VALIDATION_ERROR" in bad.stdout + bad.stderr


def test_bad_requests_get_clear_errors(jobs_server: Server) -> None:
    c = jobs_server.client
    missing = c.get(f"/api/v1/jobs/{uuid.uuid4()}")
    assert missing.status_code == 404 and missing.json()["error_code"] == "JOB_NOT_FOUND"
    assert missing.json()["trace_id"]
    for path in ("/api/v1/jobs/not-a-uuid", "/api/v1/jobs/not-a-uuid/result"):
        bad = c.get(path)
        assert bad.status_code == 422 and bad.json()["error_code"] == "VALIDATION_ERROR", path
    assert c.delete("/api/v1/jobs/12345").status_code == 422
    unknown_model = submit(c, "no-such-model", "x")
    assert unknown_model.status_code == 404 and unknown_model.json()["error_code"] == "MODEL_NOT_FOUND"
    # The input is checked at submission: a bad one never becomes a failed job.
    empty = c.post("/api/v1/infer/fake/async", json={"input_data": {}})
    assert empty.status_code == 422 and empty.json()["error_code"] == "VALIDATION_ERROR"
    streaming = submit(c, "fake", "x", stream=True)
    assert streaming.status_code == 422 and streaming.json()["details"]["errors"][0]["field"] == "stream"
    bad_status = c.get("/api/v1/jobs", params={"status": "sleeping"})
    assert bad_status.status_code == 422
    bad_key = submit(c, "fake", "x", headers={"Idempotency-Key": "x" * 300})
    assert bad_key.status_code == 422


def test_result_codes_while_running_after_failure_and_cancel(jobs_server: Server) -> None:
    c = jobs_server.client
    slow = submit(c, "fake", "sleep:1500").json()["job_id"]
    wait_job(c, slow, {"processing"})
    not_ready = c.get(f"/api/v1/jobs/{slow}/result")
    assert not_ready.status_code == 409 and not_ready.json()["error_code"] == "JOB_NOT_READY"
    assert not_ready.json()["details"]["status"] == "processing"
    # Cancelling a running job ends it at once for the client (the worker drops its share).
    cancelled = c.delete(f"/api/v1/jobs/{slow}")
    assert cancelled.status_code == 200
    final = wait_job(c, slow, {"cancelled", "completed"})
    assert final["status"] == "cancelled" and final["error"]["error_code"] == "CANCELLED"
    gone = c.get(f"/api/v1/jobs/{slow}/result")
    assert gone.status_code == 409 and gone.json()["error_code"] == "JOB_CANCELLED"
    assert c.delete(f"/api/v1/jobs/{slow}").status_code == 200  # cancelling twice is harmless

    failing = submit(c, "fake", "fail:on purpose").json()["job_id"]
    failed = wait_job(c, failing, {"failed", "completed"})
    assert failed["status"] == "failed" and failed["error"]["error_code"] == "INFERENCE_FAILED"
    assert failed["attempts"] == 1  # a model error is the job's answer, not a reason to re-run
    res = c.get(f"/api/v1/jobs/{failing}/result")
    assert res.status_code == 409 and res.json()["error_code"] == "JOB_FAILED"
    assert res.json()["details"]["error"]["error_code"] == "INFERENCE_FAILED"
    finished = c.delete(f"/api/v1/jobs/{failing}")
    assert finished.status_code == 409 and finished.json()["error_code"] == "JOB_FINISHED"
    assert finished.json()["details"]["status"] == "failed"


def test_a_cancelled_queued_job_never_runs(jobs_server: Server) -> None:
    c = jobs_server.client
    # max_batch_size 1: two jobs of a model run at once, the third waits in the store.
    blockers = [submit(c, "fake", f"sleep:{800 + i}").json()["job_id"] for i in range(2)]
    for b in blockers:
        wait_job(c, b, {"processing"})
    waiting = submit(c, "fake", "never-run").json()["job_id"]
    assert c.get(f"/api/v1/jobs/{waiting}").json()["status"] == "queued"
    listed = c.get("/api/v1/jobs", params={"status": "queued", "model": "fake"}).json()
    assert waiting in [j["job_id"] for j in listed["data"]]
    body = c.delete(f"/api/v1/jobs/{waiting}").json()
    assert body["status"] == "cancelled"
    for b in blockers:
        assert wait_job(c, b, {"completed"})["status"] == "completed"
    after = c.get(f"/api/v1/jobs/{waiting}").json()
    assert after["status"] == "cancelled" and after["attempts"] == 0 and after["started_at"] is None


def test_a_large_result_goes_to_the_result_store(jobs_server: Server) -> None:
    c = jobs_server.client
    texts = [f"text {i}" for i in range(60)]  # ~60 x 8 floats: over the 4,000-byte inline limit
    job = submit(c, "fake", texts).json()["job_id"]
    wait_job(c, job, {"completed"})
    body = c.get(f"/api/v1/jobs/{job}/result").json()
    ref = body["result"]
    assert ref["content_type"] == "application/json" and ref["size_bytes"] > 4000
    assert ref["url"].startswith("/api/v1/results/")
    assert body["metadata"]["batch_size"] == 60
    stored = c.get(ref["url"])
    assert stored.status_code == 200 and stored.headers["content-type"] == "application/json"
    assert int(stored.headers["content-length"]) == ref["size_bytes"]
    assert stored.json()["embeddings"] == [fake_vector(t, 8) for t in texts]
    assert c.get("/api/v1/results/../../etc/passwd").status_code == 404
    assert c.get("/api/v1/results/nothing-here.json").status_code == 404


def test_an_unwritable_result_store_fails_the_job_and_the_server_keeps_serving(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = clean_env(data)
    cli(env, "install", str(make_fake_model(tmp_path / "fake")), "--name", "fake")
    (data / "results").write_text("a file where the result directory should be")
    srv = start_server(data, tmp_path / "server.log", MODELMORA_RESULTS__INLINE_MAX_BYTES="1000")
    try:
        c = srv.client
        job = submit(c, "fake", [f"t{i}" for i in range(60)]).json()["job_id"]
        failed = wait_job(c, job, {"failed", "completed"})
        assert failed["status"] == "failed"
        assert failed["error"]["error_code"] == "INTERNAL_ERROR"
        assert "result store" in failed["error"]["message"]
        small = submit(c, "fake", "tiny").json()["job_id"]  # fits inline: unaffected
        assert wait_job(c, small, {"failed", "completed"})["status"] == "completed"
        assert c.post("/infer/fake", json={"text": "still serving"}).status_code == 200
    finally:
        srv.stop()


def test_a_burst_larger_than_the_model_queue_is_accepted_and_runs(tmp_path: Path) -> None:
    """Jobs wait in the store: 60 of them against a model queue of 4 are all accepted (no
    429) and all complete, while synchronous requests still find room in the queue."""
    data = tmp_path / "data"
    env = clean_env(data)
    cli(env, "install", str(make_fake_model(tmp_path / "fake", delay_ms=20)), "--name", "fake")
    srv = start_server(
        data, tmp_path / "server.log", MODELMORA_SCHEDULER__QUEUE_SIZE_PER_MODEL="4",
        MODELMORA_SCHEDULER__CRITICAL_RESERVE="0",
    )  # fmt: skip
    try:
        c = srv.client
        jobs = _submit_many(c, 60)
        sync = c.post("/infer/fake", json={"text": "a synchronous request meanwhile"})
        assert sync.status_code == 200, sync.text
        assert _check_all_completed(c, jobs, timeout=120) == 0
    finally:
        srv.stop()


def _submit_many(c: httpx.Client, n: int) -> dict[str, str]:
    jobs: dict[str, str] = {}
    for i in range(n):
        r = submit(c, "fake", f"job {i}")
        assert r.status_code == 202, r.text
        jobs[r.json()["job_id"]] = f"job {i}"
    return jobs


def _check_all_completed(c: httpx.Client, jobs: dict[str, str], timeout: float) -> int:
    """Every job completed with the in-process answer; returns how many ran more than once."""
    deadline = time.monotonic() + timeout
    twice = 0
    for job_id, text in jobs.items():
        left = max(1.0, deadline - time.monotonic())
        status = wait_job(c, job_id, {"completed", "failed", "cancelled"}, left)
        assert status["status"] == "completed", status
        twice += status["attempts"] > 1
        body = c.get(f"/api/v1/jobs/{job_id}/result").json()
        assert body["result"]["embeddings"] == fake_vector(text, 8)
    return twice


def test_sigkill_mid_run_loses_no_accepted_job(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = clean_env(data)
    cli(env, "install", str(make_fake_model(tmp_path / "fake", delay_ms=100)), "--name", "fake")
    opts = {"MODELMORA_SCHEDULER__MAX_BATCH_SIZE": "4"}
    srv = start_server(data, tmp_path / "first.log", **opts)
    jobs = _submit_many(srv.client, 200)
    # Kill while some have finished and most have not.
    deadline = time.monotonic() + 30
    while srv.client.get("/api/v1/jobs", params={"status": "completed"}).json()["meta"]["total"] < 20:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait()
    srv.client.close()
    again = start_server(data, tmp_path / "second.log", **opts)
    try:
        twice = _check_all_completed(again.client, jobs, timeout=120)
        print(f"\nSQLite store: 200 jobs, SIGKILL mid-run, restart: all completed, {twice} ran twice")
    finally:
        again.stop()


def test_redis_store_two_replicas_one_killed(tmp_path: Path) -> None:
    from tests.integration.test_job_store import REDIS_URL, redis_or_skip

    redis_or_skip()
    prefix = f"mmtest-{uuid.uuid4().hex[:8]}:"
    data = tmp_path / "data"  # a shared volume: one registry and result store for both
    env = clean_env(data)
    cli(env, "install", str(make_fake_model(tmp_path / "fake", delay_ms=100)), "--name", "fake")
    opts = {
        "MODELMORA_JOBS__BACKEND": "redis",
        "MODELMORA_JOBS__REDIS_URL": REDIS_URL,
        "MODELMORA_JOBS__REDIS_PREFIX": prefix,
        "MODELMORA_JOBS__LEASE_SECONDS": "2",
        "MODELMORA_JOBS__POLL_SECONDS": "0.2",
        "MODELMORA_SCHEDULER__MAX_BATCH_SIZE": "4",
        # One data dir for both, so one result directory: the operator says it is shared.
        "MODELMORA_RESULTS__SHARED": "true",
    }
    a = start_server(data, tmp_path / "a.log", **opts)
    b = start_server(data, tmp_path / "b.log", **opts)
    try:
        jobs = _submit_many(a.client, 100)
        jobs |= _submit_many(b.client, 100)
        deadline = time.monotonic() + 30
        while a.client.get("/api/v1/jobs", params={"status": "completed"}).json()["meta"]["total"] < 20:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait()
        twice = _check_all_completed(b.client, jobs, timeout=120)
        print(f"\nRedis store: 200 jobs on 2 replicas, one SIGKILLed: all completed, {twice} ran twice")
    finally:
        a.client.close()
        b.stop()
        import redis

        r = redis.Redis.from_url(REDIS_URL)
        for key in r.scan_iter(match=f"{prefix}*"):
            r.delete(key)


def test_large_results_in_an_s3_bucket_come_back_by_presigned_url(tmp_path: Path, s3_endpoint: str) -> None:
    from tests.conftest import new_bucket

    bucket = new_bucket(s3_endpoint)
    data = tmp_path / "data"
    env = clean_env(data)
    cli(env, "install", str(make_fake_model(tmp_path / "fake")), "--name", "fake")
    srv = start_server(
        data,
        tmp_path / "server.log",
        MODELMORA_RESULTS__BACKEND="s3",
        MODELMORA_RESULTS__S3__ENDPOINT_URL=s3_endpoint,
        MODELMORA_RESULTS__S3__BUCKET=bucket,
        MODELMORA_RESULTS__INLINE_MAX_BYTES="1000",
    )
    try:
        texts = [f"s3 text {i}" for i in range(40)]
        job = submit(srv.client, "fake", texts).json()["job_id"]
        assert wait_job(srv.client, job, {"completed", "failed"})["status"] == "completed"
        ref = srv.client.get(f"/api/v1/jobs/{job}/result").json()["result"]
        assert ref["url"].startswith(f"{s3_endpoint}/{bucket}/modelmora/") and "Signature=" in ref["url"]
        fetched = httpx.get(ref["url"])
        assert fetched.status_code == 200
        assert fetched.json()["embeddings"] == [fake_vector(t, 8) for t in texts]
    finally:
        srv.stop()


def test_progress_moves_and_a_running_job_cancelled_stops_between_steps(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = clean_env(data)
    stepper = make_fake_model(tmp_path / "stepper", steps=20, step_ms=100)
    cli(env, "install", str(stepper), "--name", "stepper")
    srv = start_server(data, tmp_path / "server.log", MODELMORA_JOBS__POLL_SECONDS="0.1")
    try:
        c = srv.client
        job = submit(c, "stepper", "progressing").json()["job_id"]
        seen: list[float] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            body = c.get(f"/api/v1/jobs/{job}").json()
            if body["status"] == "completed":
                break
            if body["progress"] is not None:
                seen.append(body["progress"])
            time.sleep(0.1)
        assert body["status"] == "completed" and body["progress"] == 1.0
        assert len(set(seen)) >= 3 and seen == sorted(seen)  # it moved, forwards only
        assert all(0 < p < 1 for p in seen)

        # Cancel one mid-run: it ends cancelled where it was (the worker drops it between
        # steps: tests/integration cover that at the worker), and the model serves on.
        doomed = submit(c, "stepper", "doomed").json()["job_id"]
        deadline = time.monotonic() + 30
        while (c.get(f"/api/v1/jobs/{doomed}").json()["progress"] or 0) < 0.2:
            assert time.monotonic() < deadline, "the doomed job never progressed"
            time.sleep(0.05)
        assert c.delete(f"/api/v1/jobs/{doomed}").json()["status"] in {"processing", "cancelled"}
        final = wait_job(c, doomed, {"cancelled", "completed"})
        assert final["status"] == "cancelled" and final["progress"] < 1
        after = submit(c, "stepper", "after").json()["job_id"]
        assert wait_job(c, after, {"completed", "failed"})["status"] == "completed"
    finally:
        srv.stop()
