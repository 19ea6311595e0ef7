"""Per-row control of a batched `generate`: sampling, stop conditions, streaming, cancellation.

One `generate` call serves every row of a batch, but rows come from different requests with
different parameters. `RowSampler` (a logits processor) applies each row's repetition penalty,
temperature, top-k and top-p and draws the row's token with the row's own `torch.Generator`,
then leaves only that token possible, so `generate` runs in greedy mode and picks it. A seeded
row therefore gets the same tokens whatever else shares its batch. `RowStopper` (a stopping
criterion, called after every step) ends rows one by one: end of sequence, their own
`max_tokens`, a stop string, or a cancelled request; it also streams each row's new text.
Used by txt2txt and img2txt (imported in workers only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from modelmora.contracts.channel import ItemError, ItemOk, Outcome, WorkItem
from modelmora.tasks.base import EmitFn


@dataclass
class Row:
    """One prompt (or image) of one request."""

    item: WorkItem
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    stops: list[str]
    stream: bool
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far (kept only when needed: streaming or stop strings)
    streamed: int = 0  # characters of `text` already sent
    events: int = 0
    finish: str | None = None
    prompt_tokens: int = 0


def make_rows(items: list[WorkItem], per_item: list[int], device: str) -> list[Row]:
    rows: list[Row] = []
    for item, count in zip(items, per_item, strict=True):
        p = item.params
        seed = p.get("seed")
        temperature = float(p.get("temperature", 1.0))
        for k in range(count):
            generator = None
            if temperature > 0:
                generator = torch.Generator(device=device)
                # A seeded row is reproducible; the k-th prompt of a request gets seed + k.
                generator.manual_seed(
                    int(seed) + k if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
                )
            rows.append(
                Row(
                    item=item,
                    max_tokens=int(p.get("max_tokens", 64)),
                    temperature=temperature,
                    top_p=float(p.get("top_p", 1.0)),
                    top_k=int(p.get("top_k", 0)),
                    repetition_penalty=float(p.get("repetition_penalty", 1.0)),
                    stops=list(p.get("stop") or []),
                    stream=bool(p.get("stream")),
                    generator=generator,
                )
            )
    return rows


class RowSampler(LogitsProcessor):
    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows
        penalties = [r.repetition_penalty for r in rows]
        self.penalty: torch.Tensor | None = None
        if any(p != 1.0 for p in penalties):
            self.penalty = torch.tensor(penalties).unsqueeze(1)
        self.sampled = [i for i, r in enumerate(rows) if r.temperature > 0]

    def __call__(self, input_ids: torch.LongTensor, raw: torch.FloatTensor) -> torch.FloatTensor:
        scores: torch.Tensor = raw.float()
        if self.penalty is not None:
            # As transformers' RepetitionPenaltyLogitsProcessor, with one penalty per row.
            penalty = self.penalty.to(scores.device)
            seen = torch.gather(scores, 1, input_ids)
            seen = torch.where(seen < 0, seen * penalty, seen / penalty)
            scores = scores.scatter(1, input_ids, seen)
        if not self.sampled:
            return scores  # type: ignore[return-value]
        out = scores.clone()
        for i in self.sampled:
            row = self.rows[i]
            if row.finish is not None:
                continue
            token = draw(row, scores[i])
            out[i] = float("-inf")
            out[i, token] = 0.0  # the only choice left: greedy decoding takes it
        return out  # type: ignore[return-value]


def draw(row: Row, scores: torch.Tensor) -> int:
    """One sampled token for a row from its (penalized) scores: its temperature, top-k,
    top-p, and its own generator. Shared by the static path and the step loop, so a seed
    gives the same draw in either."""
    logits = scores / row.temperature
    if 0 < row.top_k < logits.shape[-1]:
        kth = torch.topk(logits, row.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if row.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > row.top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=row.generator))


def penalize(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty for one row (1-D scores, the token ids it has seen)."""
    picked = scores.gather(0, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(0, seen, picked)


class RowStopper(StoppingCriteria):
    def __init__(self, rows: list[Row], tokenizer: Any, eos_ids: set[int], emit: EmitFn) -> None:
        self.rows = rows
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.emit = emit

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, -1].tolist()
        done = []
        for row, token in zip(self.rows, new, strict=True):
            if row.finish is None:
                self._advance(row, int(token))
            done.append(row.finish is not None)
        return torch.tensor(done, device=input_ids.device)  # type: ignore[return-value]

    def _advance(self, row: Row, token: int) -> None:
        advance(row, token, self.tokenizer, self.eos_ids, self.emit)


def advance(row: Row, token: int, tokenizer: Any, eos_ids: set[int], emit: EmitFn) -> None:
    """Take a row's next token: cancellation, end of sequence, stop strings, `max_tokens`,
    and its streamed text (shared by the static path and the step loop)."""
    if emit.cancelled(row.item.request_id):
        row.finish = "cancelled"
        return
    if token in eos_ids:
        row.finish = "stop"
    else:
        row.tokens.append(token)
        if row.stream or row.stops:
            row.text = tokenizer.decode(row.tokens, skip_special_tokens=True)
            cut = _first_stop(row.text, row.stops)
            if cut is not None:
                row.text, row.finish = row.text[:cut], "stop"
        if row.finish is None and len(row.tokens) >= row.max_tokens:
            row.finish = "length"
    if row.stream:
        _send(row, emit)


def _send(row: Row, emit: EmitFn) -> None:
    end = len(row.text)
    if row.finish is None:
        if row.text.endswith("\ufffd"):
            return  # half of a multi-byte character: wait for the rest
        end -= _stop_prefix(row.text, row.stops)  # could become a stop string: hold it
    if end > row.streamed:
        emit(row.item.request_id, "token", {"text": row.text[row.streamed : end], "index": row.events})
        row.streamed, row.events = end, row.events + 1


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that begins some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def controls(rows: list[Row], tokenizer: Any, eos_ids: set[int], emit: EmitFn) -> dict[str, Any]:
    """The keyword arguments that hand a `generate` call to the rows."""
    return {
        "max_new_tokens": max(r.max_tokens for r in rows),
        "do_sample": False,
        "logits_processor": LogitsProcessorList([RowSampler(rows)]),
        "stopping_criteria": StoppingCriteriaList([RowStopper(rows, tokenizer, eos_ids, emit)]),
        # Off: every choice above is made by the rows' own processor.
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "repetition_penalty": None,
    }


def outcomes(rows: list[Row], per_item: list[int], tokenizer: Any) -> list[Outcome]:
    """One outcome per request: a list of {text, finish_reason, prompt_tokens,
    completion_tokens} (one per prompt), or CANCELLED."""
    result: list[Outcome] = []
    start = 0
    for count in per_item:
        mine = rows[start : start + count]
        start += count
        if any(r.finish == "cancelled" for r in mine):
            result.append(ItemError("CANCELLED", "cancelled while it ran"))
            continue
        values = []
        for r in mine:
            text = r.text if (r.stream or r.stops) else tokenizer.decode(r.tokens, skip_special_tokens=True)
            values.append(
                {
                    "text": text,
                    "finish_reason": r.finish or "length",
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": len(r.tokens),
                }
            )
        result.append(ItemOk(values))
    return result


def eos_ids_of(model: Any, tokenizer: Any) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list) else [eos])}
