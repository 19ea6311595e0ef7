"""The lifecycle on a GPU, as one prepared run on a lent machine.

    PYTHONPATH=src python bench/gpu_lifecycle.py MODEL_DIR

Needs only what workers need (torch, sentence-transformers, psutil, nvidia-ml-py): this script
never initialises CUDA itself, so NVML's figures are the workers' alone. Prints:
- the warm spare: its RSS and that it holds no CUDA context (no VRAM);
- a cold load from the spare onto the GPU (device auto -> cuda, dtype auto -> float16), against
  a fresh python process that imports, loads and encodes once on the GPU;
- device memory used before load, after load, and after unload (the worker process ends).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from modelmora.contracts.channel import ItemOk, LoadSpec, WorkItem
from modelmora.lifecycle.memory import SystemProbe
from modelmora.lifecycle.spare import SparePool

MB = 2**20


def device_used_mib() -> float:
    import pynvml

    pynvml.nvmlInit()
    return float(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used) / MB


async def main(path: str) -> None:
    probe = SystemProbe()
    print(f"GPUs (NVML): { {k: round(v / MB) for k, v in probe.gpu_total_bytes().items()} } MiB")
    before = device_used_mib()
    spares = SparePool(enabled=True)
    spares.fill()
    await spares.wait_filled()
    spare_pid = spares.pid
    assert spare_pid is not None
    print(
        f"spare: pid {spare_pid}, RSS {spares.rss_bytes() / MB:.0f} MiB, "
        f"VRAM {probe.gpu_bytes_by_pid().get(spare_pid, 0) / MB:.0f} MiB (no CUDA context expected)"
    )
    await asyncio.sleep(1.0)
    runner = spares.take("minilm", lambda _e: None, lambda why: print("exit:", why))
    assert runner is not None
    t = time.perf_counter()
    loaded = await runner.start(LoadSpec(path, "txt2embed", device="auto", dtype="auto"), timeout=300)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    done = await runner.infer([WorkItem("first", ["hello from the GPU"])])
    first = time.perf_counter() - t
    assert isinstance(done.outcomes[0], ItemOk)
    worker_vram = probe.gpu_bytes_by_pid().get(runner.pid or -1, 0)
    after_load = device_used_mib()
    print(
        f"load from spare: {cold:.3f} s (device={loaded.device}, dtype={loaded.dtype}, "
        f"health check included); first request {first * 1000:.1f} ms"
    )
    print(
        f"worker: RSS {runner.rss_bytes() / MB:.0f} MiB, VRAM (NVML, per process) "
        f"{worker_vram / MB:.0f} MiB, torch reserved {loaded.gpu_bytes / MB:.0f} MiB"
    )
    await runner.close(grace=10)
    await asyncio.sleep(1.0)
    after_unload = device_used_mib()
    print(
        f"device used MiB: before load {before:.0f}, after load {after_load:.0f}, "
        f"after unload {after_unload:.0f}"
    )
    code = (
        "import torch; from sentence_transformers import SentenceTransformer;"
        f"m = SentenceTransformer({path!r}, device='cuda', model_kwargs={{'dtype': torch.float16}});"
        "m.encode(['hello from the GPU'])"
    )
    t = time.perf_counter()
    await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code], check=True, capture_output=True)
    fresh = time.perf_counter() - t
    print(
        f"fresh python import+load+encode on cuda: {fresh:.3f} s; "
        f"ratio (load from spare + first request) / fresh: {(cold + first) / fresh:.3f}"
    )
    await spares.close()
    print("GPU LIFECYCLE OK")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
