"""A target for the zygote's fork (`ZygotePool.fork_worker(..., target=PROBE)`): instead of the
worker, the forked child checks what it inherited and writes its findings, as JSON, to its
socket. Used by tests/integration/test_zygote.py to prove the fork safe."""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

PROBE = "tests.zygote_probe:main"


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


def main(fd: int, name: str) -> None:
    found: dict[str, Any] = {
        "threads_at_start": [t.name for t in threading.enumerate()],
        "tasks_at_start": _tasks(),
        "torch_preloaded": "torch" in sys.modules,
    }
    import torch

    # Both pools are created on first use: setting them fails if the zygote had used them.
    torch.set_num_interop_threads(2)
    torch.set_num_threads(2)
    found["intra_threads"] = torch.get_num_threads()
    found["interop_threads"] = torch.get_num_interop_threads()
    found["cuda_initialized"] = bool(torch.cuda.is_initialized())
    a = torch.arange(512 * 512, dtype=torch.float32).reshape(512, 512) / (512 * 512)
    product = a @ a.T  # OpenMP (intra-op) threads start here, in this process
    found["matmul_ok"] = bool(torch.allclose(product, product.T, atol=1e-3))
    futures = [torch.jit.fork(torch.mm, a, a) for _ in range(4)]  # the inter-op pool
    found["interop_ok"] = all(bool(torch.equal(torch.jit.wait(f), a @ a)) for f in futures)
    found["tasks_after_torch"] = _tasks()

    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {
        "[UNK]": 0,
        **{w: i + 1 for i, w in enumerate(["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"])},
    }
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    batch = [f"the quick brown fox {i} jumps over the lazy dog" for i in range(2000)]
    encoded = tokenizer.encode_batch(batch)  # rayon's thread pool, started here
    found["tokenizers_ok"] = len(encoded) == len(batch) and encoded[0].ids[:4] == [1, 2, 3, 4]
    found["tokenizers_parallelism"] = os.environ.get("TOKENIZERS_PARALLELISM")
    found["tasks_after_tokenizers"] = _tasks()
    body = json.dumps(found).encode()
    os.write(fd, len(body).to_bytes(4, "big") + body)
