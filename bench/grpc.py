"""gRPC against its baselines, in one run; prints a table.

    python bench/grpc.py [--seconds 3] [--rounds 3] [--mb 64] [--chunk-kb 1024] [--stream-rounds 15]

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
   One load generator for both doors: a separate Python process, asyncio, `c` concurrent
   callers on persistent connections (grpc.aio for gRPC; a minimal HTTP/1.1 keep-alive client
   on asyncio streams for REST). Target: gRPC >= REST.
   The doors are measured in interleaved rounds (medians, [min-max] spread). On a small machine
   the load generator competes with the server for the same cores, and the grpc.aio client
   costs several times the hand-written HTTP/1.1 client per request (both are printed), so
   req/s alone favours REST; the fair figure is the server process's CPU per request (psutil,
   all its threads, not the model worker), printed beside it. A third row, a bare grpc.aio
   server answering Infer with a canned reply, is the framework's own floor: what no servicer
   change can go below.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
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


def _load_generator(kind: str, port: int, concurrency: int, seconds: float, out: Any) -> None:
    """Runs in its own process: `concurrency` callers for `seconds`; puts (requests, errors,
    this process's CPU seconds while calling)."""

    async def grpc_callers() -> tuple[int, int]:
        import grpc

        from modelmora.api.grpc_convert import build_request
        from modelmora.v1 import modelmora_pb2_grpc as pb_grpc

        request = build_request("null", {"text": "hello world"})
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            await stub.Infer(request)
            count = errors = 0
            deadline = time.perf_counter() + seconds

            async def caller() -> None:
                nonlocal count, errors
                while time.perf_counter() < deadline:
                    try:
                        await stub.Infer(request)
                        count += 1
                    except grpc.RpcError:
                        errors += 1

            await asyncio.gather(*(caller() for _ in range(concurrency)))
            return count, errors

    async def rest_callers() -> tuple[int, int]:
        body = b'{"text": "hello world"}'
        head = (
            f"POST /infer/null HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        request = head + body
        count = errors = 0
        deadline = time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal count, errors
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                while time.perf_counter() < deadline:
                    writer.write(request)
                    status_line = await reader.readline()
                    length = 0
                    while (line := await reader.readline()) not in (b"\r\n", b""):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":", 1)[1])
                    await reader.readexactly(length)
                    if b" 200 " in status_line:
                        count += 1
                    else:
                        errors += 1
            finally:
                writer.close()

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return count, errors

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    cpu0 = time.process_time()
    count, errors = asyncio.run(grpc_callers() if kind == "grpc" else rest_callers())
    out.put((count, errors, time.process_time() - cpu0))


class Cell:
    """One door at one concurrency, over the rounds."""

    def __init__(self) -> None:
        self.rps: list[float] = []
        self.server_us: list[float] = []  # server process CPU per request
        self.client_us: list[float] = []  # load generator CPU per request
        self.errors = 0


def load(
    kind: str, port: int, concurrency: int, seconds: float, server: Any, cell: Cell | None = None
) -> None:
    """One measurement; `server` is the psutil.Process whose CPU is charged to the requests."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_load_generator, args=(kind, port, concurrency, seconds, out))
    cpu0 = _cpu(server)
    proc.start()
    count, errors, client_cpu = out.get(timeout=seconds + 120)
    server_cpu = _cpu(server) - cpu0  # includes the load generator's start-up: the server idles
    proc.join()
    if cell is not None and count:
        cell.rps.append(count / seconds)
        cell.server_us.append(server_cpu / count * 1e6)
        cell.client_us.append(client_cpu / count * 1e6)
        cell.errors += errors


def _floor_server(port: Any, ready: Any) -> None:
    """A bare grpc.aio server on uvloop (as `serve` runs) answering Infer with a canned reply:
    the framework's cost per call, without protobuf work, servicer or service layer."""
    import grpc
    import uvloop

    from modelmora.api.grpc_convert import response_to_proto

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


def unary_bench(seconds: float, rounds: int) -> dict[tuple[str, int], Cell]:
    import psutil

    work = Path(tempfile.mkdtemp())
    null = work / "null"
    null.mkdir()
    (null / "modelmora.json").write_text(json.dumps({"task_type": "txt2embed", "adapter": "fake", "dim": 8}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELMORA_")}
    env["MODELMORA_SERVER__DATA_DIR"] = str(work / "data")
    env["MODELMORA_SERVER__LOG_LEVEL"] = "warning"
    subprocess.run(
        [sys.executable, "-m", "modelmora", "install", str(null)], env=env, check=True, capture_output=True
    )
    port, grpc_port = _free_port(), _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "modelmora", "serve", "--port", str(port), "--grpc-port", str(grpc_port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ctx = mp.get_context("spawn")
    floor_port, floor_ready = ctx.Value("i", 0), ctx.Event()
    floor = ctx.Process(target=_floor_server, args=(floor_port, floor_ready), daemon=True)
    floor.start()
    try:
        if not floor_ready.wait(120):
            raise RuntimeError("floor server did not start")
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server not ready")
            time.sleep(0.1)
        httpx.post(f"http://127.0.0.1:{port}/infer/null", json={"text": "warm"}, timeout=60)
        time.sleep(1)
        proc = psutil.Process(server.pid)
        targets = {"rest": ("rest", port, proc), "grpc": ("grpc", grpc_port, proc)}
        targets["floor"] = ("grpc", floor_port.value, psutil.Process(floor.pid))
        results = {(door, c): Cell() for door in DOORS for c in CONCURRENCY}
        for c in CONCURRENCY:
            for door in DOORS:  # warm every door at this concurrency
                kind, p, charged = targets[door]
                load(kind, p, c, 2, charged)
        for _ in range(rounds):  # interleaved, so the machine's other load spreads over all
            for c in CONCURRENCY:
                for door in DOORS:
                    kind, p, charged = targets[door]
                    load(kind, p, c, seconds, charged, results[(door, c)])
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
    args = parser.parse_args()
    print(f"cpus: {os.cpu_count()}  python: {sys.version.split()[0]}  (medians, [min-max] over rounds)")

    stream = stream_bench(args.mb, args.chunk_kb << 10, args.stream_rounds)
    (mm_mbs, mm_cpu), (plain_mbs, plain_cpu) = stream["modelmora"], stream["plain"]
    ratio = _median(mm_mbs) / _median(plain_mbs)
    print(f"\nstreaming {args.mb} MB in {args.chunk_kb} KiB chunks, loopback ({args.stream_rounds} rounds)")
    print(f"{'':28} {'MB/s':>18} {'server CPU ms':>18}")
    print(f"{'GetJobResult (ModelMora)':28} {_spread(mm_mbs):>18} {_spread(mm_cpu):>18}")
    print(f"{'plain grpcio stream':28} {_spread(plain_mbs):>18} {_spread(plain_cpu):>18}")
    print(f"{'ratio (target >= 0.8)':28} {ratio:>18.2f}")
    print(f"{'>= 500 MB/s':28} {'yes' if _median(mm_mbs) >= 500 else 'NO':>18}")

    unary = unary_bench(args.seconds, args.rounds)
    print(f"\nunary Infer, null model, {args.seconds:g} s per measurement, {args.rounds} rounds")
    print("server us/req: the server process's CPU per request; client us/req: the load generator's")
    print(f"{'c':>4} {'door':<24} {'req/s':>18} {'server us/req':>16} {'client us/req':>14} {'errors':>7}")
    labels = {"rest": "REST", "grpc": "gRPC", "floor": "grpc.aio floor (canned)"}
    for c in CONCURRENCY:
        for door in DOORS:
            cell = unary[(door, c)]
            print(
                f"{c:>4} {labels[door]:<24} {_spread(cell.rps):>18} {_spread(cell.server_us):>16}"
                f" {_median(cell.client_us):>14.0f} {cell.errors:>7}"
            )
    print("\ntarget gRPC >= REST (capacity: requests per server CPU second, from server us/req)")
    print(f"{'c':>4} {'req/s gRPC/REST':>16} {'capacity gRPC/REST':>19} {'capacity floor/REST':>20}")
    for c in CONCURRENCY:
        rest, grpc_cell, floor = (unary[(d, c)] for d in DOORS)
        rps_ratio = _median(grpc_cell.rps) / _median(rest.rps)
        capacity = _median(rest.server_us) / _median(grpc_cell.server_us)
        floor_capacity = _median(rest.server_us) / _median(floor.server_us)
        print(f"{c:>4} {rps_ratio:>16.2f} {capacity:>19.2f} {floor_capacity:>20.2f}")


if __name__ == "__main__":
    main()
