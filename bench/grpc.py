"""gRPC against its baselines, in one run; prints a table.

    python bench/grpc.py [--seconds 5] [--mb 64] [--chunk-kb 1024]

1. Streaming a large result: GetJobResult of a 64 MB result in chunks, loopback, against a
   plain grpcio server (a generic handler, no protobuf) streaming the same chunks. Both servers
   run in one child process (grpc.aio, the same event loop setup); the client reads in this
   process. The ModelMora side is the real GrpcServer and servicer; its job service is a stub
   whose `result_chunks` hands out the same in-memory chunks, so the figure is the gRPC door's
   cost, not the job store's (when `modelmora.jobs` is present the servicer is the same code).
   Targets: >= 0.8 of the plain stream and >= 500 MB/s.
2. Unary Infer of the null model (the fake adapter: the server, scheduler and worker process,
   no model compute) at c=16 and c=64, against REST's POST /infer/null on the same server.
   One load generator for both doors: a separate Python process, asyncio, `c` concurrent
   callers on persistent connections (grpc.aio for gRPC; a minimal HTTP/1.1 keep-alive client
   on asyncio streams for REST, so neither client library dominates). Target: gRPC >= REST.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
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


def stream_bench(mb: int, chunk: int, rounds: int) -> dict[str, float]:
    import grpc

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
        results: dict[str, list[float]] = {"modelmora": [], "plain": []}
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

            for _ in range(rounds + 1):  # the first round of each warms up and is dropped
                for name, fn in (("modelmora", run_mm), ("plain", run_plain)):
                    t0 = time.perf_counter()
                    got = fn()
                    elapsed = time.perf_counter() - t0
                    assert got == total, (name, got, total)
                    results[name].append(total / elapsed / 1e6)
        return {name: sorted(v[1:])[len(v[1:]) // 2] for name, v in results.items()}  # medians
    finally:
        proc.kill()
        proc.join()


# -- 2. unary Infer vs REST -----------------------------------------------------------------------


def _load_generator(kind: str, port: int, concurrency: int, seconds: float, out: Any) -> None:
    """Runs in its own process: `concurrency` callers for `seconds`; puts (requests, errors)."""

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
    count, errors = asyncio.run(grpc_callers() if kind == "grpc" else rest_callers())
    out.put((count, errors))


def load(kind: str, port: int, concurrency: int, seconds: float) -> tuple[float, int]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_load_generator, args=(kind, port, concurrency, seconds, out))
    proc.start()
    count, errors = out.get(timeout=seconds + 120)
    proc.join()
    return count / seconds, errors


def unary_bench(seconds: float) -> dict[tuple[str, int], tuple[float, int]]:
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
    try:
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
        results = {}
        for c in (16, 64):
            load("rest", port, c, 2)  # warm both doors at this concurrency
            load("grpc", grpc_port, c, 2)
            results[("rest", c)] = load("rest", port, c, seconds)
            results[("grpc", c)] = load("grpc", grpc_port, c, seconds)
        return results
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="per unary measurement")
    parser.add_argument("--mb", type=int, default=64, help="size of the streamed result")
    parser.add_argument("--chunk-kb", type=int, default=1024, help="chunk size")
    parser.add_argument("--rounds", type=int, default=5, help="streaming rounds (median reported)")
    args = parser.parse_args()
    print(f"cpus: {os.cpu_count()}  python: {sys.version.split()[0]}")

    stream = stream_bench(args.mb, args.chunk_kb << 10, args.rounds)
    ratio = stream["modelmora"] / stream["plain"]
    print(f"\nstreaming {args.mb} MB in {args.chunk_kb} KiB chunks, loopback (median of {args.rounds})")
    print(f"{'':32} {'MB/s':>10}")
    print(f"{'GetJobResult (ModelMora)':32} {stream['modelmora']:10.1f}")
    print(f"{'plain grpcio stream':32} {stream['plain']:10.1f}")
    print(f"{'ratio (target >= 0.8)':32} {ratio:10.2f}")
    print(f"{'>= 500 MB/s':32} {'yes' if stream['modelmora'] >= 500 else 'NO':>10}")

    unary = unary_bench(args.seconds)
    print(f"\nunary Infer, null model, {args.seconds:g} s per cell")
    print(f"{'concurrency':>12} {'REST req/s':>12} {'gRPC req/s':>12} {'gRPC/REST':>10} {'errors':>8}")
    for c in (16, 64):
        rest, rest_err = unary[("rest", c)]
        grpc_rps, grpc_err = unary[("grpc", c)]
        print(f"{c:>12} {rest:12.0f} {grpc_rps:12.0f} {grpc_rps / rest:10.2f} {rest_err + grpc_err:>8}")


if __name__ == "__main__":
    main()
