"""Text generation throughput: the server against raw `generate`, in one run.

    python bench/generation.py [--tokens 64] [--rounds 5] [--prompts 32] [--seconds 4] [--model PATH]

Builds the tiny random-weight GPT-2 of the tests (or takes `--model`, any causal LM folder),
then measures generated tokens per second, greedy decoding, `max_tokens` new tokens per prompt:
- raw in-process `model.generate` at batch 1 and batch 8 (left padding, as the server does);
- the server (a real `modelmora serve` subprocess, the model installed through the CLI) at
  concurrency 1 and 8: wrk (Debian package) with that many connections, each sending its
  next one-prompt request when the last is answered; tokens counted from each answer.
Prints a table and the ratios the issue sets as targets: server c=8 / raw b=8 >= 0.80 and
server c=8 / server c=1 >= 3. Tokens are counted as generated (a row that meets its end of
sequence early counts fewer), the same way on both sides.

    python bench/generation.py --mode arrivals [--rounds 3] [--seconds 8] [--slots 8]

Static against continuous batching (`config.batching`), in one server, interleaved rounds:
the tiny GPT-2 and a larger random-weight GPT-2 (256 wide, 4 layers: a few ms per step).
For each, the capacity is measured first (requests/s of static batching with `--slots`
clients sending back to back), then Poisson arrivals at 50 % and 90 % of it, the same
arrival times for both modes within a round, each request streaming `--tokens` new tokens
(greedy). Reported: time to first token p50/p99 (from the request's scheduled arrival to its
first `token` event) and tokens/s (generated tokens over the span from the first arrival to
the last answer); median [min-max] over rounds, and the targets: at 90 %, continuous p99 <=
0.5x static, and tokens/s >= static. Every model runs with `options.threads: 1`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


class RawGenerate:
    """Plain `generate` in this process (left padding, greedy), the baseline."""

    def __init__(self, model_dir: Path, tokens: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(max(1, os.cpu_count() or 1))
        self.torch = torch
        self.tokens = tokens
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
        self.run(PROMPTS[:8])  # warm-up

    def run(self, prompts: list[str]) -> int:
        enc = self.tok(prompts, return_tensors="pt", padding=True)
        with self.torch.inference_mode():
            gen = self.model.generate(
                **enc, max_new_tokens=self.tokens, do_sample=False, pad_token_id=self.tok.pad_token_id
            )
        new = gen[:, enc["input_ids"].shape[1] :]
        return int((new != self.tok.pad_token_id).sum())

    def rate(self, batch: int, prompts_total: int) -> float:
        """Tokens/s generating `prompts_total` prompts, `batch` at a time."""
        count = 0
        started = time.perf_counter()
        for r in range(prompts_total // batch):
            count += self.run([PROMPTS[(r * batch + i) % len(PROMPTS)] for i in range(batch)])
        return count / (time.perf_counter() - started)


def serve(model_dir: Path | None, data: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A `modelmora serve` subprocess; `model_dir` installed as "gen" first when given. The
    data dir's parent is an allowed local root (installs through the API read from it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELMORA_")}
    env.update(
        MODELMORA_SERVER__DATA_DIR=str(data),
        MODELMORA_SERVER__LOG_LEVEL="warning",
        MODELMORA_RESOURCES__WARM_SPARE="false",  # no background imports competing for CPU
        MODELMORA_REGISTRY__ALLOWED_SOURCES__LOCAL_ROOTS=json.dumps([str(data.parent.resolve())]),
    )
    cli = [sys.executable, "-m", "modelmora"]
    if model_dir is not None:
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


WRK_LUA = """
local prompts = {%s}
local counter = 0
tokens, batches, answers = 0, 0, 0  -- globals: `done` reads them from each thread's state
local threads = {}
setup = function(thread) threads[#threads + 1] = thread end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
    counter = counter + 1
    local body = '{"input_data": {"text": "' .. prompts[(counter %% #prompts) + 1] .. '"}, ' ..
        '"parameters": {"max_tokens": %d, "temperature": 0}}'
    return wrk.format(nil, nil, nil, body)
end
response = function(status, headers, body)
    local t = body:match('"completion_tokens":%%s*(%%d+)')
    local b = body:match('"batch_size":%%s*(%%d+)')
    if status == 200 and t and b then
        tokens = tokens + tonumber(t)
        batches = batches + tonumber(b)
        answers = answers + 1
    end
end
done = function(summary, latency, requests)
    tokens, batches, answers = 0, 0, 0
    for _, t in ipairs(threads) do
        tokens = tokens + t:get("tokens")
        batches = batches + t:get("batches")
        answers = answers + t:get("answers")
    end
    local f = io.open(os.getenv("BENCH_OUT"), "w")
    f:write(string.format('{"tokens": %%d, "batches": %%d, "answers": %%d, ' ..
        '"duration_us": %%d, "errors": %%d}',
        tokens, batches, answers, summary.duration, summary.errors.status))
    f:close()
end
"""


def server_rate(url: str, concurrency: int, tokens: int, seconds: float) -> tuple[float, float]:
    """(tokens/s, mean batch size) with `concurrency` connections of wrk (one C thread, so
    the client costs the server's CPU almost nothing), each sending its next one-prompt
    request as soon as the last is answered. Tokens come from each answer's `usage`."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "gen.lua"
        quoted = ", ".join(f'"{p}"' for p in PROMPTS)
        script.write_text(WRK_LUA % (quoted, tokens))
        out = Path(tmp) / "out.json"
        subprocess.run(
            ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "60s",
             "-s", str(script), url + "/api/v1/infer/gen"],
            env=dict(os.environ, BENCH_OUT=str(out)), check=True, capture_output=True,
        )  # fmt: skip
        result = json.loads(out.read_text())
    if result["errors"] or not result["answers"]:
        raise RuntimeError(f"the server answered errors: {result}")
    return result["tokens"] / (result["duration_us"] / 1e6), result["batches"] / result["answers"]


def _median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["throughput", "arrivals"], default="throughput")
    parser.add_argument("--slots", type=int, default=8, help="arrivals: max_batch_size of every model")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    parser.add_argument("--prompts", type=int, default=32, help="prompts per raw cell per round")
    parser.add_argument("--seconds", type=float, default=4, help="seconds per server cell per round")
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    if args.mode == "arrivals":
        arrivals_main(args)
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    cells: dict[str, list[float]] = {k: [] for k in ("raw1", "raw8", "srv1", "srv8", "batch1", "batch8")}
    ratios: dict[str, list[float]] = {"c8/raw8": [], "c8/c1": [], "c1/raw1": []}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            sys.path.insert(0, str(ROOT))
            from tests.tiny_models import make_tiny_gpt2

            model_dir = make_tiny_gpt2(Path(tmp) / "tiny-gpt2")
        raw = RawGenerate(model_dir, args.tokens)
        proc, url = serve(model_dir, Path(tmp) / "data")
        try:
            httpx.post(url + "/api/v1/models/gen/load", timeout=120).raise_for_status()
            server_rate(url, 8, args.tokens, 2)  # warm-up
            # Interleaved, so that load from elsewhere on a shared machine hits every cell of a
            # round alike; each round's ratios are computed within the round.
            for _ in range(args.rounds):
                r1, r8 = raw.rate(1, args.prompts), raw.rate(8, args.prompts)
                s1, b1 = server_rate(url, 1, args.tokens, args.seconds)
                s8, b8 = server_rate(url, 8, args.tokens, args.seconds)
                for key, value in zip(cells, (r1, r8, s1, s8, b1, b8), strict=True):
                    cells[key].append(value)
                ratios["c8/raw8"].append(s8 / r8)
                ratios["c8/c1"].append(s8 / s1)
                ratios["c1/raw1"].append(s1 / r1)
        finally:
            proc.terminate()
            proc.wait(60)
    print(f"\ntext generation, greedy, {args.tokens} new tokens per prompt, model {model_dir.name}")
    print(
        f"{args.rounds} interleaved rounds ({args.prompts} prompts per raw cell, {args.seconds:g} s per"
        " server cell); median [min-max]\n"
    )

    def cell(values: list[float], fmt: str = ".0f") -> str:
        return f"{_median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"

    print(f"{'path':<26}{'tokens/s':>22}{'mean batch':>20}")
    print(f"{'raw generate, batch 1':<26}{cell(cells['raw1']):>22}{'1':>20}")
    print(f"{'raw generate, batch 8':<26}{cell(cells['raw8']):>22}{'8':>20}")
    print(f"{'server, concurrency 1':<26}{cell(cells['srv1']):>22}{cell(cells['batch1'], '.1f'):>20}")
    print(f"{'server, concurrency 8':<26}{cell(cells['srv8']):>22}{cell(cells['batch8'], '.1f'):>20}")
    print()
    print(f"server c=8 / raw b=8:    {cell(ratios['c8/raw8'], '.2f')}   (target >= 0.80)")
    print(f"server c=8 / server c=1: {cell(ratios['c8/c1'], '.2f')}   (target >= 3)")
    print(f"server c=1 / raw b=1:    {cell(ratios['c1/raw1'], '.2f')}")


# -- arrivals: static against continuous batching --------------------------------------


def make_larger_gpt2(folder: Path) -> Path:
    """A random-weight GPT-2 wide and deep enough that a decoding step costs a few ms."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    sys.path.insert(0, str(ROOT))
    from tests.tiny_models import _tokenizer

    torch.manual_seed(0)
    tokenizer = _tokenizer(model_max_length=512)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=512, n_embd=256, n_layer=4, n_head=8,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


async def _one(
    client: httpx.AsyncClient, url: str, body: dict[str, object], start: float
) -> tuple[float, int, float]:
    """(seconds from `start` to the first token, tokens generated, seconds to the answer)."""
    first = -1.0
    tokens = 0
    event = ""
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
                if event == "token" and first < 0:
                    first = time.perf_counter() - start
            elif line.startswith("data: ") and event == "done":
                tokens = int(json.loads(line[6:])["result"]["usage"]["completion_tokens"])
            elif line.startswith("data: ") and event == "error":
                raise RuntimeError(f"the server answered an error: {line}")
    return first, tokens, time.perf_counter() - start


def _body(i: int, tokens: int) -> dict[str, object]:
    prompt = PROMPTS[i % len(PROMPTS)]
    return {
        "input_data": {"text": prompt},
        "parameters": {"max_tokens": tokens, "temperature": 0},
        "stream": True,
    }


async def closed_loop(url: str, model: str, clients: int, tokens: int, seconds: float) -> float:
    """Requests/s with `clients` clients each sending its next request when answered."""
    target = f"{url}/api/v1/infer/{model}"
    end = time.perf_counter() + seconds
    done = 0

    async def client_loop(c: int, client: httpx.AsyncClient) -> None:
        nonlocal done
        i = c
        while time.perf_counter() < end:
            await _one(client, target, _body(i, tokens), time.perf_counter())
            done += 1
            i += clients

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*(client_loop(c, client) for c in range(clients)))
    return done / (time.perf_counter() - started)


async def open_loop(url: str, model: str, gaps: list[float], tokens: int) -> dict[str, float]:
    """Requests sent at the given gaps (Poisson arrivals), whatever the answers do."""
    target = f"{url}/api/v1/infer/{model}"
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        t0 = time.perf_counter()
        tasks = []
        at = 0.0
        for i, gap in enumerate(gaps):
            at += gap
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            # TTFT counts from the scheduled arrival, so a late client does not hide queueing.
            tasks.append(asyncio.ensure_future(_one(client, target, _body(i, tokens), t0 + at)))
        results = await asyncio.gather(*tasks)
        span = time.perf_counter() - (t0 + gaps[0])
    ttft = sorted(r[0] for r in results)
    generated = sum(r[1] for r in results)

    def pct(q: float) -> float:
        return ttft[min(len(ttft) - 1, round(q * (len(ttft) - 1)))]

    return {"p50": pct(0.50) * 1000, "p99": pct(0.99) * 1000, "tokens_s": generated / span}


def _request(url: str, method: str, path: str, body: dict[str, object] | None = None) -> None:
    response = httpx.request(method, url + path, json=body, timeout=300)
    if response.status_code >= 300:
        raise RuntimeError(f"{method} {path}: {response.status_code} {response.text}")


def arrivals_main(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.tiny_models import make_tiny_gpt2

    fracs = (0.5, 0.9)
    modes = ("static", "continuous")
    rows: dict[tuple[str, float, str], list[dict[str, float]]] = {}
    ratios: dict[tuple[str, float], list[float]] = {}
    capacity: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {
            "tiny": make_tiny_gpt2(Path(tmp) / "tiny-gpt2"),
            "larger": make_larger_gpt2(Path(tmp) / "larger-gpt2"),
        }
        proc, url = serve(None, Path(tmp) / "data")
        try:
            for size, folder in sizes.items():
                for mode in modes:
                    config = {"batching": mode, "max_batch_size": args.slots, "options": {"threads": 1},
                              "keep_alive_seconds": -1}  # fmt: skip
                    _request(
                        url,
                        "POST",
                        "/api/v1/models",
                        {"source": str(folder), "name": f"{size}-{mode}", "config": config},
                    )
                    _request(url, "POST", f"/api/v1/models/{size}-{mode}/load")
                    asyncio.run(closed_loop(url, f"{size}-{mode}", args.slots, args.tokens, 1.0))  # warm-up
            # The median of three alternating measurements: one alone is at the mercy of
            # whatever else the machine runs at that moment.
            for size in sizes:
                samples: dict[str, list[float]] = {mode: [] for mode in modes}
                for _ in range(3):
                    for mode in modes:
                        samples[mode].append(
                            asyncio.run(
                                closed_loop(url, f"{size}-{mode}", args.slots, args.tokens, args.seconds / 2)
                            )
                        )
                for mode in modes:
                    capacity[(size, mode)] = _median(samples[mode])
            rng = random.Random(21)
            for r in range(args.rounds):
                for size in sizes:
                    for frac in fracs:
                        rate = frac * capacity[(size, "static")]
                        gaps = [rng.expovariate(rate) for _ in range(max(20, round(rate * args.seconds)))]
                        order = modes if r % 2 == 0 else modes[::-1]  # neither always goes first
                        got = {
                            mode: asyncio.run(open_loop(url, f"{size}-{mode}", gaps, args.tokens))
                            for mode in order
                        }
                        for mode in modes:
                            rows.setdefault((size, frac, mode), []).append(got[mode])
                        ratios.setdefault((size, frac), []).append(
                            got["continuous"]["p99"] / got["static"]["p99"]
                        )
                        line = ", ".join(
                            f"{m} p50 {got[m]['p50']:.0f} p99 {got[m]['p99']:.0f} ms"
                            f" {got[m]['tokens_s']:.0f} tok/s"
                            for m in modes
                        )
                        print(f"round {r + 1} {size} {frac:.0%}: {line}", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)

    def cell(values: list[float], fmt: str = ".0f") -> str:
        return f"{_median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"

    print(
        f"\nPoisson arrivals, {args.tokens} new tokens each (greedy, streamed),"
        f" {args.slots} slots, threads 1;"
    )
    print(f"{args.rounds} interleaved rounds of {args.seconds:g} s; median [min-max]\n")
    for size in sizes:
        print(
            f"{size}: capacity (closed loop, {args.slots} clients):"
            f" static {capacity[(size, 'static')]:.1f} req/s,"
            f" continuous {capacity[(size, 'continuous')]:.1f} req/s"
        )
    print(f"\n{'model, load, mode':<30}{'TTFT p50 ms':>22}{'TTFT p99 ms':>22}{'tokens/s':>22}")
    for (size, frac, mode), values in rows.items():
        print(
            f"{f'{size}, {frac:.0%}, {mode}':<30}{cell([v['p50'] for v in values]):>22}"
            f"{cell([v['p99'] for v in values]):>22}{cell([v['tokens_s'] for v in values]):>22}"
        )
    print()
    for (size, frac), p99_ratios in ratios.items():
        static_tps = [v["tokens_s"] for v in rows[(size, frac, "static")]]
        cont_tps = [v["tokens_s"] for v in rows[(size, frac, "continuous")]]
        tps = [c / s for c, s in zip(cont_tps, static_tps, strict=True)]
        target = "   (target <= 0.5)" if frac == 0.9 else ""
        print(f"{size} {frac:.0%}: continuous/static p99 TTFT {cell(p99_ratios, '.2f')}{target}; "
              f"tokens/s {cell(tps, '.2f')} (target >= 1)")  # fmt: skip


if __name__ == "__main__":
    main()
