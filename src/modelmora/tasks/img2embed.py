"""Image embeddings with a CLIP-style model: through transformers, or sentence-transformers
when the folder is a sentence-transformers model (`modules.json`).

pre: check each request's images against its decoded-bytes cap from their headers (before
any pixel is decoded), decode (Pillow) and, for transformers, run the slow image processor
(no torchvision); an image corrupt past its header fails alone, as INVALID_IMAGE; core:
`get_image_features` (or `SentenceTransformer.encode` of the images); post: optional L2
normalisation per request.

A long batch runs in sub-batches (`tasks/subbatch.py`; options `sub_batch_size`, default 32
images, and `sub_batch_decoded_bytes`, default 64 MiB decoded): only the first is decoded
ahead, each later one just before its forward, so the decoded pictures of one sub-batch at a
time are held, and a request cancelled or past its deadline is dropped between two of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModel

from modelmora.contracts.channel import ItemError, ItemOk, Outcome, WorkItem
from modelmora.tasks.base import EmitFn
from modelmora.tasks.images import decode_image, header_decoded_bytes
from modelmora.tasks.subbatch import DEFAULT_ROWS, Pieces, Row, option_int, split
from modelmora.tasks.torch_utils import resolve_device, resolve_dtype

DEFAULT_PIECE_BYTES = 64 << 20


def over_cap(item: WorkItem) -> ItemError | None:
    """The worker's own check of the request's decoded-bytes cap, from the headers only (the
    server checked it too: this holds for any path that reaches the worker)."""
    if item.max_decoded_bytes is None:
        return None
    try:
        total = sum(header_decoded_bytes(data) for data in item.inputs)
    except ValueError as exc:
        return invalid(str(exc))
    if total > item.max_decoded_bytes:
        return ItemError(
            "PAYLOAD_TOO_LARGE",
            f"the images decode to {total} bytes, at most {item.max_decoded_bytes} allowed per request",
            {"field": "input_data.image", "decoded_bytes": total, "limit_bytes": item.max_decoded_bytes},
        )
    return None


def decode_items(items: list[WorkItem]) -> tuple[list[Any], dict[str, str]]:
    """The decoded images of every item in order, and the items whose images are corrupt or
    over their request's decoded-bytes cap (checked from the headers first)."""
    images: list[Any] = []
    bad: dict[str, str] = {}
    for item in items:
        refused = over_cap(item)
        if refused is not None:
            bad[item.request_id] = refused.message
            continue
        try:
            decoded = [decode_image(data) for data in item.inputs]
        except ValueError as exc:
            bad[item.request_id] = str(exc)
            continue
        images.extend(decoded)
    return images, bad


def invalid(message: str) -> ItemError:
    return ItemError("INVALID_IMAGE", message, {"field": "input_data.image"})


def _weight(data: bytes) -> int:
    try:
        return header_decoded_bytes(data)
    except ValueError:
        return 0  # fails when decoded, for its request alone


@dataclass
class Prepared:
    images: list[bytes]  # the batch's image bytes, flat (items refused up front left out)
    spans: dict[str, tuple[int, int]]  # request id -> its rows in `images`
    pieces: Pieces
    bad: dict[str, ItemError]
    first: Any = None  # the first piece, decoded and processed ahead (None: not ready)


@dataclass
class Output:
    embeddings: Any
    spans: dict[str, tuple[int, int]]
    bad: dict[str, ItemError]
    dropped: set[str]


class ImageEmbedder:
    def __init__(self) -> None:
        self.model: Any = None
        self.processor: Any = None
        self.st: Any = None  # a sentence-transformers image model, when the folder is one
        self.device = "cpu"
        self.dtype = "float32"
        self.torch_dtype = torch.float32
        self.rows = DEFAULT_ROWS
        self.piece_bytes = DEFAULT_PIECE_BYTES

    def load(self, path: Path, device: str, dtype: str, options: dict[str, Any]) -> None:
        self.rows = option_int(options, "sub_batch_size", DEFAULT_ROWS)
        self.piece_bytes = option_int(options, "sub_batch_decoded_bytes", DEFAULT_PIECE_BYTES)
        self.device = resolve_device(device)
        self.torch_dtype = resolve_dtype(dtype, self.device)
        self.dtype = str(self.torch_dtype).removeprefix("torch.")
        if (path / "modules.json").is_file():
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(str(path), device=self.device, local_files_only=True)
            self.st = st.to(self.torch_dtype) if self.torch_dtype != torch.float32 else st
            return
        self.processor = AutoImageProcessor.from_pretrained(str(path), use_fast=False, local_files_only=True)  # type: ignore[no-untyped-call]
        model: Any = AutoModel.from_pretrained(str(path), dtype=self.torch_dtype, local_files_only=True)
        self.model = model.to(self.device).eval()

    def preprocess(self, items: list[WorkItem]) -> Prepared:
        bad: dict[str, ItemError] = {}
        kept: list[WorkItem] = []
        for item in items:
            refused = over_cap(item)
            if refused is None:
                kept.append(item)
            else:
                bad[item.request_id] = refused
        images = [data for item in kept for data in item.inputs]
        spans: dict[str, tuple[int, int]] = {}
        start = 0
        for item in kept:
            spans[item.request_id] = (start, start + len(item.inputs))
            start += len(item.inputs)
        prepared = Prepared(images, spans, split(kept, self.rows, self.piece_bytes, _weight), bad)
        if prepared.pieces.rows:
            prepared.first = self._piece(prepared, prepared.pieces.rows[0])
        return prepared

    def _piece(self, prepared: Prepared, rows: list[Row]) -> tuple[list[Row], Any]:
        """Decode and process one piece's images: (the rows kept, the model's input). A
        corrupt image fails its request (noted in `bad`), leaving its neighbours."""
        kept: list[Row] = []
        pictures: list[Any] = []
        for row in rows:
            if row.request_id in prepared.bad:
                continue
            try:
                pictures.append(decode_image(prepared.images[row.index]))
            except ValueError as exc:
                prepared.bad[row.request_id] = invalid(str(exc))
                continue
            kept.append(row)
        bad_now = {r.request_id for r in kept} & prepared.bad.keys()
        if bad_now:  # a later image of the same request was corrupt: drop its earlier ones
            pictures = [p for p, r in zip(pictures, kept, strict=True) if r.request_id not in bad_now]
            kept = [r for r in kept if r.request_id not in bad_now]
        if not pictures or self.st is not None:
            return kept, pictures  # sentence-transformers runs its own processor in `encode`
        pixels = self.processor(images=pictures, return_tensors="pt")["pixel_values"]
        return kept, pixels.to(self.device, self.torch_dtype)

    def _features(self, inputs: Any) -> Any:
        if self.st is not None:
            vectors = self.st.encode(inputs, batch_size=len(inputs), convert_to_numpy=True)
            return np.asarray(vectors, dtype=np.float32)
        with torch.inference_mode():
            features = self.model.get_image_features(pixel_values=inputs)
            if not isinstance(features, torch.Tensor):  # some versions return an output object
                features = features.pooler_output
        return features.float().cpu().numpy()

    def forward(self, prepared: Prepared, emit: EmitFn) -> Output:
        embeddings: Any = None
        for k, piece in enumerate(prepared.pieces.rows):
            live = prepared.pieces.live(piece, emit)
            first, prepared.first = prepared.first, None  # freed once used
            if not live:
                continue
            if k == 0 and first is not None and len(live) == len(piece):
                rows, inputs = first
            else:
                rows, inputs = self._piece(prepared, live)
            rows_bad = {r.request_id for r in rows} & prepared.bad.keys()
            if rows_bad:  # failed in an earlier piece: its rows here are not computed
                keep = [i for i, r in enumerate(rows) if r.request_id not in rows_bad]
                rows = [rows[i] for i in keep]
                inputs = [inputs[i] for i in keep] if self.st is not None else inputs[keep]
            if not rows:
                continue
            out = self._features(inputs)
            del inputs
            if embeddings is None:
                embeddings = np.zeros((len(prepared.images), out.shape[1]), dtype=np.float32)
            embeddings[[r.index for r in rows]] = out
        return Output(embeddings, prepared.spans, prepared.bad, prepared.pieces.dropped)

    def postprocess(self, output: Output, items: list[WorkItem]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for item in items:
            rid = item.request_id
            if rid in output.bad:
                outcomes.append(output.bad[rid])
                continue
            if rid in output.dropped:
                outcomes.append(ItemError("CANCELLED", "cancelled while it ran"))
                continue
            start, end = output.spans[rid]
            block = np.ascontiguousarray(output.embeddings[start:end], dtype=np.float32)
            if item.params.get("normalize"):
                block = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
            outcomes.append(ItemOk(block))
        return outcomes

    def info(self) -> dict[str, Any]:
        if self.st is not None:
            dim = int(self.st.get_sentence_embedding_dimension() or 0)
            return {"dim": dim, "library": "sentence-transformers"}
        return {"dim": int(getattr(self.model.config, "projection_dim", 0) or 0)}
