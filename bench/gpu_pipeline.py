"""Does tokenizing the next batch while the GPU computes the current one pay? One prepared
run on a GPU machine, worker level (no server packages needed there).

    PYTHONPATH=src python bench/gpu_pipeline.py MODEL_DIR

Raw in-process `encode` at batch 512 against a worker process fed 512-sentence batches with
two in flight, once sequential (`pipeline: false`) and once pipelined (the default on CUDA).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

from modelmora.contracts.channel import LoadSpec, WorkItem
from modelmora.lifecycle.runners import ProcessRunner

TEXTS = [f"Sentence number {i} about topic {i % 97}, with a few more words in it." for i in range(16384)]
BATCH = 512


async def worker_rate(path: str, pipeline: bool) -> float:
    runner = ProcessRunner("gpu", lambda _e: None, lambda why: print("exit:", why))
    options = {"pipeline": pipeline}
    await runner.start(LoadSpec(path, "txt2embed", device="auto", dtype="auto", options=options), 300)
    try:
        batches = [TEXTS[i : i + BATCH] for i in range(0, len(TEXTS), BATCH)]
        for b in batches[:4]:
            await runner.infer([WorkItem("warm", b)])
        rates = []
        for _ in range(3):
            in_flight = asyncio.Semaphore(2)

            async def send(i: int, texts: list[str], in_flight: asyncio.Semaphore = in_flight) -> None:
                async with in_flight:
                    await runner.infer([WorkItem(f"b{i}", texts)])

            t = time.perf_counter()
            await asyncio.gather(*(send(i, b) for i, b in enumerate(batches)))
            rates.append(len(TEXTS) / (time.perf_counter() - t))
        return statistics.median(rates)
    finally:
        await runner.close(grace=10)


def raw_rate(path: str) -> float:
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device="cuda", model_kwargs={"dtype": torch.float16})
    model.encode(TEXTS[:2048], batch_size=BATCH)
    rates = []
    for _ in range(3):
        t = time.perf_counter()
        model.encode(TEXTS, batch_size=BATCH)
        rates.append(len(TEXTS) / (time.perf_counter() - t))
    return statistics.median(rates)


async def main(path: str) -> None:
    sequential = await worker_rate(path, pipeline=False)
    pipelined = await worker_rate(path, pipeline=True)
    raw = raw_rate(path)  # last: this process then holds a CUDA context of its own
    print(f"raw encode b={BATCH}: {raw:,.0f} sentences/s")
    for label, rate in (("sequential", sequential), ("pipelined", pipelined)):
        print(f"worker, 2 batches in flight, {label}: {rate:,.0f} sentences/s ({rate / raw:.2f} of raw)")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
