"""A fake embedding adapter: no torch, deterministic vectors, speed and failures on demand.

Installed like any model from a folder whose `modelmora.json` says
`{"task_type": "txt2embed", "adapter": "fake", "dim": 8}`. Options (from that file or the
model config): `dim`, `delay_ms` per batch, `per_item_ms`, `ndarray` (float32 numpy rows, as
the real adapter sends them, in place of lists). Inputs steer it in tests: a text
starting with `fail:` fails that item, `crash:` fails the whole batch, `exit:` ends the worker
process abruptly (a crash), `sleep:<ms>` sleeps before the batch. Options simulate loads:
`ballast_mb` (real memory held, for budget tests), `fail_load`, `load_ms`, and `fail_health`
or `fail_health_if_exists: PATH` (the health check after load fails). Worker bounds:
`grow_mb` (real memory added by every batch and kept, as a leak would), `nan` (every vector is
NaN, as damaged weights give); with `per_item_ms` a request cancelled or past its deadline is
dropped between two of its texts (the sub-batch boundary of the real adapters).

Stepping mode (for progress and cancellation tests): `steps` and `step_ms` make `forward` run
that many steps per batch, sleeping `step_ms` each, emit `progress` {"step": i, "total": n}
for every live request after each step, and drop a request cancelled meanwhile (it ends with
CANCELLED while its batch-mates go on).

`FakeGenerator` is the txt2txt twin: deterministic words, one `token` event per word for a
request that streams, `step_ms` per token, cancellation between tokens.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from modelmora.contracts.channel import ItemError, ItemOk, Outcome, WorkItem
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
        self.ndarray = False
        self.steps = 0
        self.step_s = 0.0
        self.delay_s = 0.0
        self.per_item_s = 0.0
        self.fail_load = False
        self.ballast = bytearray()
        self.grown: list[bytearray] = []
        self.grow_mb = 0
        self.nan = False
        self.fail_health = False
        self.computed = 0  # texts that went through per_item_ms (the rest were dropped)
        self.seen: deque[str] = deque(maxlen=10_000)  # what reached the model, for tests

    def load(self, path: Path, device: str, dtype: str, options: dict[str, Any]) -> None:
        self.dim = int(options.get("dim", 8))
        self.ndarray = bool(options.get("ndarray", False))
        self.delay_s = float(options.get("delay_ms", 0)) / 1000
        self.per_item_s = float(options.get("per_item_ms", 0)) / 1000
        self.steps = int(options.get("steps", 0))
        self.step_s = float(options.get("step_ms", 0)) / 1000
        self.grow_mb = int(options.get("grow_mb", 0))
        self.nan = bool(options.get("nan"))
        if options.get("fail_load"):
            raise RuntimeError("fake adapter asked to fail its load")
        marker = options.get("fail_health_if_exists")
        self.fail_health = bool(options.get("fail_health")) or (bool(marker) and Path(str(marker)).exists())
        # Real memory, touched page by page, so budgets can be tested with real processes.
        ballast_mb = int(options.get("ballast_mb", 0))
        if ballast_mb:
            self.ballast = _touched(ballast_mb)
        load_ms = float(options.get("load_ms", 0))
        if load_ms:
            time.sleep(load_ms / 1000)

    def preprocess(self, items: list[WorkItem]) -> list[WorkItem]:
        return items

    def forward(self, prepared: list[WorkItem], emit: EmitFn) -> tuple[list[WorkItem], set[str]]:
        texts = [t for item in prepared for t in item.inputs]
        self.seen.extend(texts)
        for text in texts:
            if isinstance(text, str) and text.startswith("exit:"):
                os._exit(3)
            if isinstance(text, str) and text.startswith("crash:"):
                raise RuntimeError(f"fake batch failure on {text!r}")
            if isinstance(text, str) and text.startswith("sleep:"):
                time.sleep(float(text.split(":", 1)[1].split()[0]) / 1000)
        time.sleep(self.delay_s)
        dropped = self._per_item(prepared, emit)
        if self.grow_mb and not any(i.request_id == HEALTH_CHECK_ID for i in prepared):
            self.grown.append(_touched(self.grow_mb))
        return prepared, dropped | self._step([i for i in prepared if i.request_id not in dropped], emit)

    def _per_item(self, items: list[WorkItem], emit: EmitFn) -> set[str]:
        """`per_item_ms` per text, one text at a time: a request given up meanwhile is
        dropped before its next text."""
        dropped: set[str] = set()
        if not self.per_item_s:
            return dropped
        for item in items:
            for _ in item.inputs:
                if emit.cancelled(item.request_id):
                    dropped.add(item.request_id)
                    break
                time.sleep(self.per_item_s)
                self.computed += 1
        return dropped

    def _step(self, items: list[WorkItem], emit: EmitFn) -> set[str]:
        """Stepping mode: the request ids dropped because they were cancelled between steps."""
        dropped: set[str] = set()
        if any(i.request_id == HEALTH_CHECK_ID for i in items):
            return dropped  # the check after load need not sit through the steps
        live = list(items)
        for step in range(1, self.steps + 1):
            dropped.update(i.request_id for i in live if emit.cancelled(i.request_id))
            live = [i for i in live if i.request_id not in dropped]
            if not live:
                break
            time.sleep(self.step_s)
            for item in live:
                emit(item.request_id, "progress", {"step": step, "total": self.steps})
        return dropped

    def postprocess(self, output: tuple[list[WorkItem], set[str]], items: list[WorkItem]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        prepared, dropped = output
        for item in prepared:
            if item.request_id in dropped:
                outcomes.append(ItemError("CANCELLED", "cancelled while it ran"))
                continue
            if self.fail_health and item.request_id == HEALTH_CHECK_ID:
                outcomes.append(ItemError("INFERENCE_FAILED", "fake adapter asked to fail its health check"))
                continue
            bad = [t for t in item.inputs if t.startswith("fail:")]
            if bad:
                outcomes.append(ItemError("INFERENCE_FAILED", f"fake failure on {bad[0]!r}"))
                continue
            tokens = sum(len(t.split()) for t in item.inputs)  # a word is a token here
            if self.ndarray:
                outcomes.append(ItemOk(self._matrix(item), {"truncated": 0, "prompt_tokens": tokens}))
                continue
            vectors = [fake_vector(t, self.dim) for t in item.inputs]
            if self.nan:
                vectors = [[math.nan] * self.dim for _ in item.inputs]
            if item.params.get("normalize"):
                vectors = [_unit(v) for v in vectors]
            outcomes.append(ItemOk(vectors, {"truncated": 0, "prompt_tokens": tokens}))
        return outcomes

    def _matrix(self, item: WorkItem) -> Any:
        """float32 rows as the real adapter sends them (a numpy array, not lists), drawn from a
        generator seeded by each text: the null model of the benchmarks at any `dim`."""
        rows = [
            np.random.default_rng(int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")).random(
                self.dim, dtype=np.float32
            )
            for t in item.inputs
        ]
        matrix = np.stack(rows) - np.float32(0.5)
        if item.params.get("normalize"):
            matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
        return matrix

    def info(self) -> dict[str, Any]:
        # rss_bytes: what the in-process runner reports for this "worker" (its ballast).
        grown = sum(len(b) for b in self.grown)
        return {"dim": self.dim, "adapter": "fake", "rss_bytes": len(self.ballast) + grown}


def _touched(mb: int) -> bytearray:
    """Real memory, touched page by page (resident, not just reserved)."""
    block = bytearray(mb << 20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    return block


def _unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


class FakeGenerator:
    """txt2txt without torch: the same result shape as tasks/txt2txt.py, deterministic words
    (a function of the prompt and the seed), streamed one `token` event per word."""

    device = "cpu"
    dtype = "float32"

    def __init__(self) -> None:
        self.step_s = 0.0

    def load(self, path: Path, device: str, dtype: str, options: dict[str, Any]) -> None:
        self.step_s = float(options.get("step_ms", 0)) / 1000

    def preprocess(self, items: list[WorkItem]) -> list[WorkItem]:
        return items

    def forward(self, prepared: list[WorkItem], emit: EmitFn) -> dict[str, Any]:
        # One row per prompt, all advanced in lockstep as a batched generate would be.
        rows = [(item, prompt_text(p)) for item in prepared for p in item.inputs]
        words: list[list[str]] = [[] for _ in rows]
        # A "fail:" prompt fails before its first token (postprocess reports it).
        finish: list[str | None] = ["error" if p.startswith("fail:") else None for _, p in rows]
        cancelled: set[str] = set()
        longest = max((int(item.params.get("max_tokens", 16)) for item, _ in rows), default=0)
        for step in range(longest):
            cancelled.update(i.request_id for i in prepared if emit.cancelled(i.request_id))
            live = [
                r
                for r, (item, _) in enumerate(rows)
                if finish[r] is None and item.request_id not in cancelled
            ]
            if not live:
                break
            time.sleep(self.step_s)
            for r in live:
                item, prompt = rows[r]
                word = fake_word(prompt, item.params.get("seed"), step)
                words[r].append(word)
                if item.params.get("stream"):
                    emit(item.request_id, "token", {"text": word, "index": step})
                stops = item.params.get("stop") or []
                if any(s in "".join(words[r]) for s in stops):
                    finish[r] = "stop"
                elif len(words[r]) >= int(item.params.get("max_tokens", 16)):
                    finish[r] = "length"
        return {"rows": rows, "words": words, "finish": finish, "cancelled": cancelled}

    def postprocess(self, output: dict[str, Any], items: list[WorkItem]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        r = 0
        for item in items:
            n = len(item.inputs)
            if item.request_id in output["cancelled"]:
                outcomes.append(ItemError("CANCELLED", "cancelled while it ran"))
            elif any(prompt_text(p).startswith("fail:") for p in item.inputs):
                outcomes.append(ItemError("INFERENCE_FAILED", "fake failure"))
            else:
                outcomes.append(
                    ItemOk(
                        [
                            {
                                "text": "".join(output["words"][r + k]),
                                "finish_reason": output["finish"][r + k] or "length",
                                "prompt_tokens": len(prompt_text(item.inputs[k]).split()),
                                "completion_tokens": len(output["words"][r + k]),
                            }
                            for k in range(n)
                        ]
                    )
                )
            r += n
        return outcomes

    def info(self) -> dict[str, Any]:
        return {"adapter": "fake"}


def prompt_text(prompt: Any) -> str:
    """A prompt string, or a chat (`{"messages": [...]}`) flattened for the fake."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt["messages"])


def fake_word(prompt: str, seed: object, step: int) -> str:
    digest = hashlib.sha256(f"{prompt}|{seed}|{step}".encode()).hexdigest()
    return f" w{int(digest[:4], 16) % 1000}"
