"""Text generation throughput: the server against raw `generate`, in one run.

    python bench/generation.py [--tokens 64] [--rounds 4] [--model PATH]

Builds the tiny random-weight GPT-2 of the tests (or takes `--model`, any causal LM folder),
then measures generated tokens per second, greedy decoding, `max_tokens` new tokens per prompt:
- raw in-process `model.generate` at batch 1 and batch 8 (left padding, as the server does);
- the server (a real `modelmora serve` subprocess, the model installed through the CLI) at
  concurrency 1 and 8: that many client threads, each sending one prompt per request.
Prints a table and the ratios the issue sets as targets: server c=8 / raw b=8 >= 0.80 and
server c=8 / server c=1 >= 3. Tokens are counted as generated (a row that meets its end of
sequence early counts fewer), the same way on both sides.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "The quick brown fox",
    "ModelMora serves many",
    "Hello world, this is",
    "A tiny model writes",
    "Images become captions and",
    "user: hi there assistant:",
    "Prompts become pictures while",
    "The lazy dog jumps over",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raw_generate(model_dir: Path, tokens: int, rounds: int) -> dict[int, float]:
    """Tokens/s of plain `generate` in this process at batch 1 and 8."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    out: dict[int, float] = {}
    for batch in (1, 8):

        def run(prompts: list[str]) -> int:
            enc = tok(prompts, return_tensors="pt", padding=True)
            with torch.inference_mode():
                gen = model.generate(
                    **enc, max_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id
                )
            new = gen[:, enc["input_ids"].shape[1] :]
            return int((new != tok.pad_token_id).sum())

        run(PROMPTS[:batch])  # warm-up
        count = 0
        started = time.perf_counter()
        for r in range(rounds * (8 // batch)):
            prompts = PROMPTS[:batch] if batch == 8 else [PROMPTS[r % len(PROMPTS)]]
            count += run(prompts)
        out[batch] = count / (time.perf_counter() - started)
    return out


def serve(model_dir: Path, data: Path) -> tuple[subprocess.Popen[bytes], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELMORA_")}
    env.update(
        MODELMORA_SERVER__DATA_DIR=str(data),
        MODELMORA_SERVER__LOG_LEVEL="warning",
        MODELMORA_RESOURCES__WARM_SPARE="false",  # no background imports competing for CPU
    )
    cli = [sys.executable, "-m", "modelmora"]
    subprocess.run(
        [*cli, "install", str(model_dir), "--name", "gen"], env=env, check=True, capture_output=True
    )
    port = free_port()
    proc = subprocess.Popen(
        [*cli, "serve", "--port", str(port), "--no-grpc"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server not ready")


def server_rate(url: str, concurrency: int, tokens: int, rounds: int) -> tuple[float, float]:
    """(tokens/s, mean batch size) with `concurrency` clients, each sending `rounds * 8 /
    concurrency` requests of one prompt."""

    def client(index: int) -> tuple[int, list[int]]:
        count, sizes = 0, []
        with httpx.Client(base_url=url, timeout=300) as http:
            for r in range(rounds * 8 // concurrency):
                body = {
                    "input_data": {"text": PROMPTS[(index + r) % len(PROMPTS)]},
                    "parameters": {"max_tokens": tokens, "temperature": 0},
                }
                reply = http.post("/api/v1/infer/gen", json=body)
                reply.raise_for_status()
                data: dict[str, Any] = reply.json()
                count += int(data["result"]["usage"]["completion_tokens"])
                sizes.append(int(data["metadata"]["batch_size"]))
        return count, sizes

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(client, range(concurrency)))
    elapsed = time.perf_counter() - started
    total = sum(c for c, _ in results)
    sizes = [s for _, batch in results for s in batch]
    return total / elapsed, sum(sizes) / len(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            sys.path.insert(0, str(ROOT))
            from tests.tiny_models import make_tiny_gpt2

            model_dir = make_tiny_gpt2(Path(tmp) / "tiny-gpt2")
        raw = raw_generate(model_dir, args.tokens, args.rounds)
        proc, url = serve(model_dir, Path(tmp) / "data")
        try:
            httpx.post(url + "/api/v1/models/gen/load", timeout=120).raise_for_status()
            server_rate(url, 1, args.tokens, 1)  # warm-up
            c1, b1 = server_rate(url, 1, args.tokens, args.rounds)
            c8, b8 = server_rate(url, 8, args.tokens, args.rounds)
        finally:
            proc.terminate()
            proc.wait(60)
    print(f"\ntext generation, greedy, {args.tokens} new tokens per prompt, model {model_dir.name}\n")
    print(f"{'path':<28}{'tokens/s':>12}{'mean batch':>12}")
    print(f"{'raw generate, batch 1':<28}{raw[1]:>12.0f}{1:>12}")
    print(f"{'raw generate, batch 8':<28}{raw[8]:>12.0f}{8:>12}")
    print(f"{'server, concurrency 1':<28}{c1:>12.0f}{b1:>12.1f}")
    print(f"{'server, concurrency 8':<28}{c8:>12.0f}{b8:>12.1f}")
    print()
    print(f"server c=8 / raw b=8:   {c8 / raw[8]:.2f}   (target >= 0.80)")
    print(f"server c=8 / server c=1: {c8 / c1:.2f}   (target >= 3)")
    print(f"server c=1 / raw b=1:   {c1 / raw[1]:.2f}")


if __name__ == "__main__":
    main()
