"""Text embeddings through sentence-transformers, split into tokenize / forward / pool.

`encode()` would do all three in one call; splitting them lets one batch carry texts of several
requests with different `normalize` settings, and is the seam where tokenizing the next batch
overlaps the model's work on the current one: the scheduler sends a full batch ahead while the
worker computes, and a pipelined worker (on a GPU, or with the model option `pipeline`; see
lifecycle/worker.py) preprocesses it in its main thread while its model thread runs forward.

A long batch runs in sub-batches (`tasks/subbatch.py`; options `sub_batch_size`, default 32
texts, and `sub_batch_chars`, default 256,000 characters): the first is tokenized ahead as
above, the others just before their forward, and a request cancelled or past its deadline is
dropped between two of them, so a timed-out list of long texts stops within one sub-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import batch_to_device

from modelmora.contracts.channel import ItemError, ItemOk, Outcome, WorkItem
from modelmora.tasks.base import EmitFn
from modelmora.tasks.subbatch import DEFAULT_ROWS, DEFAULT_TEXT_CHARS, Pieces, option_int, split
from modelmora.tasks.torch_utils import resolve_device, resolve_dtype


@dataclass
class Prepared:
    texts: list[str]
    pieces: Pieces
    first: tuple[dict[str, Any], list[bool], list[int]] | None  # the first piece, tokenized ahead


@dataclass
class Output:
    embeddings: Any  # (texts, dim) float32; rows of dropped requests are left at zero
    truncated: list[bool]
    dropped: set[str]
    tokens: list[int]  # per text, as the tokenizer made them (the request's usage)


def token_counts(features: dict[str, Any], count: int) -> list[int]:
    """Tokens per text as the model sees them (special tokens included, after truncation):
    the attention mask's row sums; zeros for inputs without one (images)."""
    mask = features.get("attention_mask")
    if mask is None:
        return [0] * count
    return [int(n) for n in mask.sum(dim=1).tolist()]


class SentenceEmbedder:
    def __init__(self) -> None:
        self.model: SentenceTransformer | None = None
        self.device = "cpu"
        self.dtype = "float32"
        self.max_tokens = 512
        self.rows = DEFAULT_ROWS
        self.chars = DEFAULT_TEXT_CHARS

    def load(self, path: Path, device: str, dtype: str, options: dict[str, Any]) -> None:
        self.rows = option_int(options, "sub_batch_size", DEFAULT_ROWS)
        self.chars = option_int(options, "sub_batch_chars", DEFAULT_TEXT_CHARS)
        self.device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, self.device)
        self.dtype = str(torch_dtype).removeprefix("torch.")
        model = SentenceTransformer(
            str(path), device=self.device, local_files_only=True, model_kwargs={"dtype": torch_dtype}
        )
        model.eval()
        self.model = model
        self.max_tokens = int(model.max_seq_length or 512)
        self._preprocess = getattr(model, "preprocess", None) or model.tokenize

    def _truncated(self, texts: list[str]) -> list[bool]:
        """Which texts exceed the model's token limit (and are cut, as sentence-transformers
        does). A text can only exceed it when it has more characters than the limit, so only
        those are tokenized a second time without truncation."""
        assert self.model is not None
        limit = self.max_tokens
        long_idx = [i for i, t in enumerate(texts) if len(t) > limit - 2]
        flags = [False] * len(texts)
        if long_idx:
            tokenizer = self.model.tokenizer
            ids = tokenizer([texts[i] for i in long_idx], add_special_tokens=True, truncation=False)[
                "input_ids"
            ]
            for i, seq in zip(long_idx, ids, strict=True):
                flags[i] = len(seq) > limit
        return flags

    def _tokenize(self, texts: list[str]) -> tuple[dict[str, Any], list[bool], list[int]]:
        features = self._preprocess(texts)
        tokens = token_counts(features, len(texts))
        return batch_to_device(features, torch.device(self.device)), self._truncated(texts), tokens

    def preprocess(self, items: list[WorkItem]) -> Prepared:
        texts = [t for item in items for t in item.inputs]
        pieces = split(items, self.rows, self.chars, len)
        first = self._tokenize([texts[r.index] for r in pieces.rows[0]]) if pieces.rows else None
        return Prepared(texts, pieces, first)

    def forward(self, prepared: Prepared, emit: EmitFn) -> Output:
        assert self.model is not None
        embeddings: Any = None
        truncated = [False] * len(prepared.texts)
        tokens = [0] * len(prepared.texts)
        for k, piece in enumerate(prepared.pieces.rows):
            live = prepared.pieces.live(piece, emit)
            first, prepared.first = prepared.first, None  # freed once used
            if not live:
                continue
            if k == 0 and first is not None and len(live) == len(piece):
                features, flags, counts = first
            else:
                features, flags, counts = self._tokenize([prepared.texts[r.index] for r in live])
            with torch.inference_mode():
                out = self.model.forward(features)["sentence_embedding"].float().cpu().numpy()
            del features
            if embeddings is None:
                embeddings = np.zeros((len(prepared.texts), out.shape[1]), dtype=np.float32)
            index = [r.index for r in live]
            embeddings[index] = out
            for i, flag, count in zip(index, flags, counts, strict=True):
                truncated[i], tokens[i] = flag, count
        return Output(embeddings, truncated, prepared.pieces.dropped, tokens)

    def postprocess(self, output: Output, items: list[WorkItem]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        start = 0
        for item in items:
            end = start + len(item.inputs)
            if item.request_id in output.dropped:
                outcomes.append(ItemError("CANCELLED", "cancelled while it ran"))
                start = end
                continue
            block = np.ascontiguousarray(output.embeddings[start:end], dtype=np.float32)
            if item.params.get("normalize"):
                norms = np.linalg.norm(block, axis=1, keepdims=True)
                block = block / np.maximum(norms, 1e-12)
            meta = {
                "truncated": int(sum(output.truncated[start:end])),
                "prompt_tokens": sum(output.tokens[start:end]),
            }
            outcomes.append(ItemOk(block, meta))
            start = end
        return outcomes

    def info(self) -> dict[str, Any]:
        assert self.model is not None
        dim = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        return {"dim": dim(), "max_tokens": self.max_tokens}
