"""Iteration-level (continuous) batching for causal language models: a step loop over the
model's own forward.

`Stepper` holds the running batch: one row per prompt, one batched KV cache (transformers'
`DynamicCache`) in which every row's tokens are right-aligned, an attention mask marking each
row's real positions, and each row's own position counter. A joining request is prefilled on
its own (its prompts left-padded together), sampled once (its first token goes out at once),
and its cache is appended to the running one: the shorter of the two is padded on the left to
the other's length. A finished row leaves at the end of the step that finished it (its cache
rows are dropped, and leading columns no row uses any more are cut), so its slot is free for
the next join. Cancelled rows leave before the next forward. This is what `generate` does
with left padding, except that the batch changes between steps; greedy rows therefore get the
tokens they would get alone.

Each row keeps what the static path gives it (tasks/generation.py): its own sampling
parameters and generator (a seed draws the same tokens), stop strings, `max_tokens`, streamed
text. transformers' own continuous batching (`generate_batch`) measured ~200x slower than
`generate` on CPU here; this loop costs one batched forward per step plus a copy of the cache
when rows join or leave.

Only models whose cache is made of plain full-attention layers (`DynamicLayer`) are stepped;
for any other (sliding windows, recurrent state, encoder-decoder), `stepper()` raises
`Unsupported` and the model keeps static batching.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from modelmora.contracts.channel import ItemError, Outcome, WorkItem
from modelmora.tasks import generation
from modelmora.tasks.base import EmitFn
from modelmora.tasks.generation import Row


class Unsupported(Exception):
    """This model cannot be stepped (its cache is not a plain one): keep static batching."""


@dataclass
class Joining:
    """A request tokenized and waiting for room: its rows and the prompt of each."""

    item: WorkItem
    rows: list[Row]
    prompts: list[list[int]]
    reserve: int  # KV tokens its rows may grow to (prompt + max_tokens each)
    received: float = field(default_factory=time.perf_counter)


@dataclass
class Member:
    """A request in the running batch: done when its last row is."""

    item: WorkItem
    rows: list[Row]
    reserve: int
    started: float
    steps: int = 0
    row_steps: int = 0  # rows in the batch summed over its steps: their mean is its batch size


@dataclass
class Finished:
    item: WorkItem
    outcome: Outcome
    seconds: float  # from its prefill to its end
    batch_size: float  # mean rows per step while it ran


class Stepper:
    """The running batch of one worker. Not thread-safe: one loop drives it."""

    def __init__(self, generator: Any, slots: int, tokens: int) -> None:
        self.model = generator.model
        self.tokenizer = generator.tokenizer
        self.eos_ids: set[int] = generator.eos_ids
        self.device: str = generator.device
        self.context: int = generator.context
        self._prompt = generator.prompt
        self.slots = max(1, slots)
        self.tokens = max(1, tokens)
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        params = inspect.signature(self.model.forward).parameters
        # transformers 5 renamed `past_key_values` to `cache`.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_arg = "logits_to_keep" in params
        probe = DynamicCache(config=self.model.config)
        if getattr(self.model.config, "is_encoder_decoder", False) or any(
            type(layer) is not DynamicLayer for layer in probe.layers
        ):
            raise Unsupported("this model's cache is not made of plain full-attention layers")
        self.rows: list[Row] = []
        self.owners: list[Member] = []  # per row: its request
        self.prompts: list[list[int]] = []  # per row: its prompt (for the repetition penalty)
        self.members: dict[str, Member] = {}
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [rows, columns]: 1 where a row has a token
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # next position per row
        self.last = torch.zeros(0, dtype=torch.long, device=self.device)  # each row's newest token
        self.reserved = 0

    # -- room --------------------------------------------------------------------------

    @property
    def active(self) -> int:
        return len(self.rows)

    @property
    def free_slots(self) -> int:
        return max(0, self.slots - len(self.rows))

    @property
    def free_tokens(self) -> int:
        return max(0, self.tokens - self.reserved)

    def fits(self, joining: Joining) -> bool:
        """Whether it can join now. A request larger than the whole batch joins an empty one
        (as a static batch takes an oversized request alone) rather than never."""
        if not self.rows:
            return True
        return len(joining.rows) <= self.free_slots and joining.reserve <= self.free_tokens

    # -- join ----------------------------------------------------------------------------

    def prepare(self, item: WorkItem) -> Joining:
        """Tokenize one request (CPU work, before it may join); a chat goes through the
        tokenizer's template, as in the static path."""
        max_tokens = int(item.params.get("max_tokens", 64))
        room = max(1, self.context - max_tokens)
        texts = [self._prompt(p) for p in item.inputs]
        encoded = self.tokenizer(texts, truncation=True, max_length=room)
        prompts = [list(ids) or [self.pad_id] for ids in encoded["input_ids"]]
        rows = generation.make_rows([item], [len(texts)], self.device)
        for row, ids in zip(rows, prompts, strict=True):
            row.prompt_tokens = len(ids)
        reserve = sum(len(ids) + max_tokens for ids in prompts)
        return Joining(item, rows, prompts, reserve)

    def join(self, joinings: list[Joining], emit: EmitFn) -> list[Finished]:
        """Prefill the newcomers together, sample their first tokens and add them to the
        running batch; those already done (one token, an immediate stop) leave at once."""
        if not joinings:
            return []
        now = time.perf_counter()
        rows = [r for j in joinings for r in j.rows]
        prompts = [p for j in joinings for p in j.prompts]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {self._cache_arg: DynamicCache(config=self.model.config)}
        if self._keep_arg:
            kwargs["logits_to_keep"] = 1
        with torch.inference_mode():
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs
            )
        cache = out.cache if self._cache_arg == "cache" else out.past_key_values
        logits = out.logits[:, -1, :]
        # Registered only now: a prefill that raised leaves the running batch as it was.
        owners: list[Member] = []
        for j in joinings:
            member = Member(j.item, j.rows, j.reserve, now)
            self.members[j.item.request_id] = member
            self.reserved += j.reserve
            owners.extend([member] * len(j.rows))
        tokens = self._choose(logits, rows, prompts, owners)
        self._append(rows, owners, prompts, cache, mask, positions[:, -1] + 1, tokens)
        self._take(rows, tokens, emit)
        return self._leave()

    def _append(
        self,
        rows: list[Row],
        owners: list[Member],
        prompts: list[list[int]],
        cache: Any,
        mask: torch.Tensor,
        positions: torch.Tensor,
        tokens: torch.Tensor,
    ) -> None:
        if self.cache is None or self.mask is None:
            self.cache, self.mask = cache, mask
        else:
            ours, theirs = self.mask.shape[1], mask.shape[1]
            width = max(ours, theirs)
            for mine, new in zip(self.cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(new.keys, width)])
                mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(new.values, width)])
            self.mask = torch.cat([F.pad(self.mask, (width - ours, 0)), F.pad(mask, (width - theirs, 0))])
        self.rows.extend(rows)
        self.owners.extend(owners)
        self.prompts.extend(prompts)
        self.positions = torch.cat([self.positions, positions])
        self.last = torch.cat([self.last, tokens])

    # -- step ----------------------------------------------------------------------------

    def drop_cancelled(self, emit: EmitFn) -> list[Finished]:
        """Rows of cancelled requests leave before the next forward, freeing their slots."""
        hit = False
        for row in self.rows:
            if row.finish is None and emit.cancelled(row.item.request_id):
                row.finish, hit = "cancelled", True
        return self._leave() if hit else []

    def step(self, emit: EmitFn) -> list[Finished]:
        """One token for every running row; the rows it finishes leave."""
        if not self.rows or self.mask is None:
            return []
        count = len(self.rows)
        mask = torch.cat([self.mask, torch.ones((count, 1), dtype=self.mask.dtype, device=self.device)], 1)
        kwargs: dict[str, Any] = {self._cache_arg: self.cache}
        with torch.inference_mode():
            out = self.model(
                input_ids=self.last[:, None],
                attention_mask=mask,
                position_ids=self.positions[:, None],
                use_cache=True,
                **kwargs,
            )
        self.mask = mask
        self.positions = self.positions + 1
        tokens = self._choose(out.logits[:, -1, :], self.rows, self.prompts, self.owners)
        self.last = tokens
        for member in self.members.values():
            member.steps += 1
            member.row_steps += count
        self._take(self.rows, tokens, emit)
        return self._leave()

    def _choose(
        self, logits: torch.Tensor, rows: list[Row], prompts: list[list[int]], owners: list[Member]
    ) -> torch.Tensor:
        """Each row's next token: greedy rows by one argmax over the batch, the others with
        their own penalty, filters and generator."""
        scores = logits.float()
        tokens = scores.argmax(-1)
        special = [i for i, r in enumerate(rows) if r.temperature > 0 or r.repetition_penalty != 1.0]
        if not special:
            return tokens
        picked = tokens.tolist()
        for i in special:
            row = rows[i]
            row_scores = scores[i]
            if row.repetition_penalty != 1.0:
                seen = torch.tensor(prompts[i] + row.tokens, dtype=torch.long, device=scores.device)
                row_scores = generation.penalize(row_scores, seen, row.repetition_penalty)
            if row.temperature > 0:
                picked[i] = generation.draw(row, row_scores)
            else:
                picked[i] = int(row_scores.argmax())
        return torch.tensor(picked, dtype=torch.long, device=logits.device)

    def _take(self, rows: list[Row], tokens: torch.Tensor, emit: EmitFn) -> None:
        for row, token in zip(rows, tokens.tolist(), strict=True):
            if row.finish is None:
                generation.advance(row, int(token), self.tokenizer, self.eos_ids, emit)

    # -- leave ---------------------------------------------------------------------------

    def _leave(self) -> list[Finished]:
        """Drop finished rows from the batch and report the requests whose rows are all done."""
        done: list[Finished] = []
        now = time.perf_counter()
        for member in list(self.members.values()):
            if all(r.finish is not None for r in member.rows):
                del self.members[member.item.request_id]
                self.reserved -= member.reserve
                done.append(self._finished(member, now))
        keep = [i for i, r in enumerate(self.rows) if r.finish is None]
        if len(keep) == len(self.rows):
            return done
        if not keep:
            self._reset()
            return done
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        assert self.mask is not None
        mask = self.mask.index_select(0, index)
        used = mask.any(0).nonzero()
        start = int(used[0]) if len(used) else 0  # columns no remaining row uses: cut them
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self.mask = mask[:, start:]
        self.positions = self.positions.index_select(0, index)
        self.last = self.last.index_select(0, index)
        self.rows = [self.rows[i] for i in keep]
        self.owners = [self.owners[i] for i in keep]
        self.prompts = [self.prompts[i] for i in keep]
        return done

    def _finished(self, member: Member, now: float) -> Finished:
        if any(r.finish == "cancelled" for r in member.rows):
            outcome: Outcome = ItemError("CANCELLED", "cancelled while it ran")
        else:
            outcome = generation.outcomes(member.rows, [len(member.rows)], self.tokenizer)[0]
        size = member.row_steps / member.steps if member.steps else float(len(member.rows))
        return Finished(member.item, outcome, now - member.started, size)

    def _reset(self) -> None:
        self.rows, self.owners, self.prompts = [], [], []
        self.cache, self.mask = None, None
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)
        self.last = torch.zeros(0, dtype=torch.long, device=self.device)

    def fail_all(self, error: ItemError) -> list[Finished]:
        """A forward raised: every running request gets the error and the batch starts over
        empty (the worker itself stays)."""
        now = time.perf_counter()
        done = [Finished(m.item, error, now - m.started, float(len(m.rows))) for m in self.members.values()]
        self.members.clear()
        self.reserved = 0
        self._reset()
        return done


def _pad_left(states: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, heads, columns, dim] padded with zeros on the left to `width` columns (masked)."""
    missing = width - states.shape[2]
    return F.pad(states, (0, 0, missing, 0)) if missing else states
