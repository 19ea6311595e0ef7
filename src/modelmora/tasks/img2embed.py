"""Image embeddings with a CLIP-style model: through transformers, or sentence-transformers
when the folder is a sentence-transformers model (`modules.json`).

pre: decode each image (Pillow) and, for transformers, run the slow image processor (no
torchvision); an image corrupt past its header fails alone, as INVALID_IMAGE; core:
`get_image_features` (or `SentenceTransformer.encode` of the images); post: optional L2
normalisation per request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModel

from modelmora.contracts.channel import ItemError, ItemOk, Outcome, WorkItem
from modelmora.tasks.base import EmitFn
from modelmora.tasks.images import decode_image
from modelmora.tasks.torch_utils import resolve_device, resolve_dtype


def decode_items(items: list[WorkItem]) -> tuple[list[Any], dict[str, str]]:
    """The decoded images of every item in order, and the items whose images are corrupt."""
    images: list[Any] = []
    bad: dict[str, str] = {}
    for item in items:
        try:
            decoded = [decode_image(data) for data in item.inputs]
        except ValueError as exc:
            bad[item.request_id] = str(exc)
            continue
        images.extend(decoded)
    return images, bad


def invalid(message: str) -> ItemError:
    return ItemError("INVALID_IMAGE", message, {"field": "input_data.image"})


class ImageEmbedder:
    def __init__(self) -> None:
        self.model: Any = None
        self.processor: Any = None
        self.st: Any = None  # a sentence-transformers image model, when the folder is one
        self.device = "cpu"
        self.dtype = "float32"
        self.torch_dtype = torch.float32

    def load(self, path: Path, device: str, dtype: str, options: dict[str, Any]) -> None:
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

    def preprocess(self, items: list[WorkItem]) -> tuple[Any, dict[str, str]]:
        images, bad = decode_items(items)
        if not images:
            return None, bad
        if self.st is not None:
            return images, bad  # sentence-transformers runs its own processor in `encode`
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.torch_dtype), bad

    def forward(self, prepared: tuple[Any, dict[str, str]], emit: EmitFn) -> tuple[Any, dict[str, str]]:
        pixels, bad = prepared
        if pixels is None:
            return None, bad
        if self.st is not None:
            vectors = self.st.encode(pixels, batch_size=len(pixels), convert_to_numpy=True)
            return np.asarray(vectors, dtype=np.float32), bad
        with torch.inference_mode():
            features = self.model.get_image_features(pixel_values=pixels)
            if not isinstance(features, torch.Tensor):  # some versions return an output object
                features = features.pooler_output
        return features.float().cpu().numpy(), bad

    def postprocess(self, output: tuple[Any, dict[str, str]], items: list[WorkItem]) -> list[Outcome]:
        embeddings, bad = output
        outcomes: list[Outcome] = []
        start = 0
        for item in items:
            if item.request_id in bad:
                outcomes.append(invalid(bad[item.request_id]))
                continue
            end = start + len(item.inputs)
            block = np.ascontiguousarray(embeddings[start:end], dtype=np.float32)
            start = end
            if item.params.get("normalize"):
                block = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
            outcomes.append(ItemOk(block))
        return outcomes

    def info(self) -> dict[str, Any]:
        if self.st is not None:
            dim = int(self.st.get_sentence_embedding_dimension() or 0)
            return {"dim": dim, "library": "sentence-transformers"}
        return {"dim": int(getattr(self.model.config, "projection_dim", 0) or 0)}
