"""A fake embedding adapter: no torch, deterministic vectors, speed and failures on demand.

Installed like any model from a folder whose `modelmora.json` says
`{"task_type": "txt2embed", "adapter": "fake", "dim": 8}`. Options (from that file or the
model config): `dim`, `delay_ms` per batch, `per_item_ms`. Inputs steer it in tests: a text
starting with `fail:` fails that item, `crash:` fails the whole batch, `exit:` ends the worker
process abruptly (a crash), `sleep:<ms>` sleeps before the batch. Options simulate loads:
`ballast_mb` (real memory held, for budget tests), `fail_load`, `load_ms`, and `fail_health`
or `fail_health_if_exists: PATH` (the health check after load fails).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from modelmora.lifecycle.channel import ItemError, ItemOk, Outcome, WorkItem
from modelmora.tasks.base import HEALTH_CHECK_ID, EmitFn


def fake_vector(text: str, dim: int) -> list[float]:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    raw = [((digest[i % len(digest)] + i) % 251) / 250.0 - 0.5 for i in range(dim)]
    return raw


class FakeEmbedder:
    device = "cpu"
    dtype = "float32"

    def __init__(self) -> None:
        self.dim = 8
        self.delay_s = 0.0
        self.per_item_s = 0.0
        self.fail_load = False
        self.ballast = bytearray()
        self.fail_health = False
        self.seen: deque[str] = deque(maxlen=10_000)  # what reached the model, for tests

    def load(self, path: Path, device: str, dtype: str, options: dict[str, Any]) -> None:
        self.dim = int(options.get("dim", 8))
        self.delay_s = float(options.get("delay_ms", 0)) / 1000
        self.per_item_s = float(options.get("per_item_ms", 0)) / 1000
        if options.get("fail_load"):
            raise RuntimeError("fake adapter asked to fail its load")
        marker = options.get("fail_health_if_exists")
        self.fail_health = bool(options.get("fail_health")) or (bool(marker) and Path(str(marker)).exists())
        # Real memory, touched page by page, so budgets can be tested with real processes.
        ballast_mb = int(options.get("ballast_mb", 0))
        if ballast_mb:
            self.ballast = bytearray(ballast_mb << 20)
            for i in range(0, len(self.ballast), 4096):
                self.ballast[i] = 1
        load_ms = float(options.get("load_ms", 0))
        if load_ms:
            time.sleep(load_ms / 1000)

    def preprocess(self, items: list[WorkItem]) -> list[WorkItem]:
        return items

    def forward(self, prepared: list[WorkItem], emit: EmitFn) -> list[WorkItem]:
        texts = [t for item in prepared for t in item.inputs]
        self.seen.extend(texts)
        for text in texts:
            if isinstance(text, str) and text.startswith("exit:"):
                os._exit(3)
            if isinstance(text, str) and text.startswith("crash:"):
                raise RuntimeError(f"fake batch failure on {text!r}")
            if isinstance(text, str) and text.startswith("sleep:"):
                time.sleep(float(text.split(":", 1)[1].split()[0]) / 1000)
        time.sleep(self.delay_s + self.per_item_s * len(texts))
        return prepared

    def postprocess(self, output: list[WorkItem], items: list[WorkItem]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for item in output:
            if self.fail_health and item.request_id == HEALTH_CHECK_ID:
                outcomes.append(ItemError("INFERENCE_FAILED", "fake adapter asked to fail its health check"))
                continue
            bad = [t for t in item.inputs if t.startswith("fail:")]
            if bad:
                outcomes.append(ItemError("INFERENCE_FAILED", f"fake failure on {bad[0]!r}"))
                continue
            vectors = [fake_vector(t, self.dim) for t in item.inputs]
            if item.params.get("normalize"):
                vectors = [_unit(v) for v in vectors]
            outcomes.append(ItemOk(vectors, {"truncated": 0}))
        return outcomes

    def info(self) -> dict[str, Any]:
        # rss_bytes: what the in-process runner reports for this "worker" (its ballast).
        return {"dim": self.dim, "adapter": "fake", "rss_bytes": len(self.ballast)}


def _unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]
