"""The CUDA path of a worker process, checked on a machine with a GPU (one prepared run).

    PYTHONPATH=src python bench/gpu_check.py MODEL_DIR

Needs only what a worker needs (torch, sentence-transformers, psutil): no server packages, so
it runs on a bare GPU image. Checks and prints:
- `device: auto` picks CUDA and `dtype: auto` picks float16 there; an explicit float32 is honoured;
- embeddings from the worker match in-process `SentenceTransformer.encode` on the same GPU;
- throughput of the worker (one IPC round trip per batch) against raw `encode` at batch 128;
- GPU memory seen by the device before load, after load and after unload (the process ends).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

import numpy as np
import torch

from modelmora.contracts.channel import ItemOk, LoadSpec, WorkItem
from modelmora.lifecycle.runners import ProcessRunner

TEXTS = [f"Sentence number {i} about topic {i % 17}, with some extra words." for i in range(2048)]


def used_mib() -> float:
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


async def main(path: str) -> None:
    from sentence_transformers import SentenceTransformer

    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    before = used_mib()
    runner = ProcessRunner("gpu", lambda _e: None, lambda why: print("worker exit:", why))
    t0 = time.perf_counter()
    loaded = await runner.start(LoadSpec(path, "txt2embed", device="auto", dtype="auto"), timeout=300)
    print(
        f"auto load: device={loaded.device} dtype={loaded.dtype} in {time.perf_counter() - t0:.2f}s "
        f"(worker says {loaded.load_seconds:.2f}s), worker gpu reserved={loaded.gpu_bytes / 2**20:.0f} MiB"
    )
    after_load = used_mib()

    # Correctness against in-process encode on the same GPU and dtype.
    ref_model = SentenceTransformer(path, device="cuda", model_kwargs={"dtype": torch.float16})
    sample = TEXTS[:64]
    done = await runner.infer([WorkItem("a", sample)])
    out = done.outcomes[0]
    assert isinstance(out, ItemOk), out
    ref = ref_model.encode(sample, batch_size=64)
    got = np.asarray(out.value, dtype=np.float32)
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    print(f"cosine vs in-process encode (fp16, cuda): min={cos.min():.6f}")

    # Throughput: worker batches of 128 vs raw encode at batch 128, same texts.
    for _ in range(3):
        ref_model.encode(TEXTS[:512], batch_size=128)
        await runner.infer([WorkItem("w", TEXTS[:128])])
    raw, served = [], []
    for _ in range(3):
        t = time.perf_counter()
        ref_model.encode(TEXTS, batch_size=128)
        raw.append(len(TEXTS) / (time.perf_counter() - t))
        t = time.perf_counter()
        for i in range(0, len(TEXTS), 128):
            await runner.infer([WorkItem(f"b{i}", TEXTS[i : i + 128])])
        served.append(len(TEXTS) / (time.perf_counter() - t))
    r, s = statistics.median(raw), statistics.median(served)
    print(f"raw encode b=128: {r:,.0f} sent/s; worker b=128 (sequential batches): {s:,.0f} sent/s")
    print(f"ratio worker / raw: {s / r:.2f}")
    # Attribution: the same worker with the tokenizer's thread pool turned off.
    import os

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    serial = ProcessRunner("gpu-serial-tok", lambda _e: None, lambda why: None)
    await serial.start(LoadSpec(path, "txt2embed", device="auto", dtype="auto"), timeout=300)
    for _ in range(3):
        await serial.infer([WorkItem("w", TEXTS[:128])])
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        for i in range(0, len(TEXTS), 128):
            await serial.infer([WorkItem(f"s{i}", TEXTS[i : i + 128])])
        runs.append(len(TEXTS) / (time.perf_counter() - t))
    print(f"worker b=128 with TOKENIZERS_PARALLELISM=false: {statistics.median(runs):,.0f} sent/s")
    await serial.close(grace=10)
    del os.environ["TOKENIZERS_PARALLELISM"]
    del ref_model
    torch.cuda.empty_cache()

    await runner.close(grace=10)
    await asyncio.sleep(1.0)
    after_unload = used_mib()
    print(f"GPU used MiB: before load {before:.0f}, after load {after_load:.0f}, ", end="")
    print(f"after unload {after_unload:.0f}")

    runner32 = ProcessRunner("gpu32", lambda _e: None, lambda why: None)
    loaded32 = await runner32.start(
        LoadSpec(path, "txt2embed", device="cuda:0", dtype="float32"), timeout=300
    )
    print(f"explicit load: device={loaded32.device} dtype={loaded32.dtype}")
    await runner32.close(grace=10)
    cpu = ProcessRunner("cpu", lambda _e: None, lambda why: None)
    loaded_cpu = await cpu.start(LoadSpec(path, "txt2embed", device="cpu", dtype="auto"), timeout=300)
    print(
        f"explicit cpu: device={loaded_cpu.device} dtype={loaded_cpu.dtype} gpu_bytes={loaded_cpu.gpu_bytes}"
    )
    await cpu.close(grace=10)
    print("GPU CHECK OK")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
