"""Server-level throughput on a GPU: `modelmora serve` with MiniLM fed 32-sentence requests
at concurrency 64 (four client processes of 16), against raw `encode` on the same GPU; once
with embeddings as JSON floats, once in the binary form (`parameters.encoding: base64`), the
form that spares the one server process the float formatting.

    PYTHONPATH=src python bench/gpu_server.py MODEL_DIR [seconds]

Uses the registry API to install (no CLI needed) and a Python client (the GPU machine has
cores to spare, so the client does not compete with the model as it would on 2 CPUs).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

PER_REQUEST = 32
TEXTS = [f"Sentence number {i} about topic {i % 97}, with a few more words in it." for i in range(8192)]


ENCODINGS = ("float", "base64")


async def client(url: str, concurrency: int, seconds: float, encoding: str = "float") -> int:
    done = 0
    stop = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as c:

        async def loop(k: int) -> None:
            nonlocal done
            i = k * PER_REQUEST
            while time.monotonic() < stop:
                chunk = [TEXTS[(i + j) % len(TEXTS)] for j in range(PER_REQUEST)]
                body = {"input_data": {"text": chunk}, "parameters": {"encoding": encoding}}
                r = await c.post(url, json=body)
                r.raise_for_status()
                done += PER_REQUEST
                i += PER_REQUEST * concurrency

        await asyncio.gather(*(loop(k) for k in range(concurrency)))
    return done


def serve_and_load(path: str, seconds: float) -> tuple[dict[str, float], dict[str, object]]:
    from modelmora.config import load_settings
    from modelmora.registry.installer import InstallRequest, install
    from modelmora.registry.store import RegistryStore

    data = tempfile.mkdtemp()
    settings = load_settings(overrides={"server": {"data_dir": data}})
    store = RegistryStore(settings.database_url)
    store.create_schema()
    install(settings, store, InstallRequest(source=path, name="minilm", task_type="txt2embed"))
    store.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        MODELMORA_SERVER__DATA_DIR=data,
        MODELMORA_SERVER__PORT=str(port),
        MODELMORA_SERVER__LOG_LEVEL="warning",
        MODELMORA_RESOURCES__WARM_SPARE="false",
        MODELMORA_SCHEDULER__MAX_BATCH_SIZE="512",
        MODELMORA_SERVER__GRPC_ENABLED="false",
    )
    code = (
        "from modelmora.config import load_settings; from modelmora.app import serve; serve(load_settings())"
    )
    server = subprocess.Popen([sys.executable, "-c", code], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError("the server exited before it was ready")
            try:
                if httpx.get(base + "/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        url = base + "/api/v1/infer/minilm"
        first = httpx.post(url, json={"input_data": {"text": TEXTS[:PER_REQUEST]}}, timeout=300).json()
        subprocess.run([sys.executable, __file__, "--client", url, "2"], check=True)  # warm up
        rates: dict[str, float] = {}
        for encoding in ENCODINGS:
            clients = [
                subprocess.Popen(
                    [sys.executable, __file__, "--client", url, str(seconds), encoding],
                    stdout=subprocess.PIPE,
                )
                for _ in range(4)
            ]
            rates[encoding] = sum(int(p.communicate()[0]) for p in clients) / seconds
        return rates, first["metadata"]
    finally:
        server.terminate()
        server.wait(60)


def raw_rate(path: str) -> float:
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device="cuda", model_kwargs={"dtype": torch.float16})
    model.encode(TEXTS[:2048], batch_size=512)
    rates = []
    for _ in range(3):
        t = time.perf_counter()
        model.encode(TEXTS, batch_size=512)
        rates.append(len(TEXTS) / (time.perf_counter() - t))
    return statistics.median(rates)


def main() -> None:
    if sys.argv[1] == "--client":
        encoding = sys.argv[4] if len(sys.argv) > 4 else "float"
        print(asyncio.run(client(sys.argv[2], 16, float(sys.argv[3]), encoding)))
        return
    path, seconds = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    served, meta = serve_and_load(path, seconds)
    raw = raw_rate(path)
    print(f"first response metadata: {json.dumps(meta)}")
    print(f"raw encode b=512: {raw:,.0f} sentences/s")
    for encoding, rate in served.items():
        print(
            f"server, 32-sentence requests at c=64, encoding {encoding}: {rate:,.0f} sentences/s "
            f"({rate / raw:.2f} of raw)"
        )


if __name__ == "__main__":
    main()
