"""Image captioning: BLIP, or any VisionEncoderDecoder model, through `generate`.

pre: decode the images and run the (slow) image processor; core: one batched `generate` over
pixel values, its rows steered by tasks/generation.py like txt2txt (own sampling, stops,
streamed tokens, cancellation); post: the caption of each image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

from modelmora.contracts.channel import Outcome, WorkItem
from modelmora.tasks import generation
from modelmora.tasks.base import EmitFn
from modelmora.tasks.img2embed import decode_items, invalid
from modelmora.tasks.torch_utils import resolve_device, resolve_dtype


class ImageCaptioner:
    def __init__(self) -> None:
        self.model: Any = None
        self.tokenizer: Any = None
        self.image_processor: Any = None
        self.device = "cpu"
        self.dtype = "float32"
        self.torch_dtype = torch.float32
        self.eos_ids: set[int] = set()

    def load(self, path: Path, device: str, dtype: str, options: dict[str, Any]) -> None:
        self.device = resolve_device(device)
        self.torch_dtype = resolve_dtype(dtype, self.device)
        self.dtype = str(self.torch_dtype).removeprefix("torch.")
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if config.get("model_type") == "blip":
            from transformers import BlipForConditionalGeneration

            processor = AutoProcessor.from_pretrained(str(path), use_fast=False, local_files_only=True)  # type: ignore[no-untyped-call]
            self.tokenizer, self.image_processor = processor.tokenizer, processor.image_processor
            model: Any = BlipForConditionalGeneration.from_pretrained(
                str(path), dtype=self.torch_dtype, local_files_only=True
            )
        else:
            from transformers import VisionEncoderDecoderModel

            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.image_processor = AutoImageProcessor.from_pretrained(  # type: ignore[no-untyped-call]
                str(path), use_fast=False, local_files_only=True
            )
            model = VisionEncoderDecoderModel.from_pretrained(
                str(path), dtype=self.torch_dtype, local_files_only=True
            )
        self.model = model.to(self.device).eval()
        self.eos_ids = generation.eos_ids_of(self.model, self.tokenizer)

    def preprocess(self, items: list[WorkItem]) -> dict[str, Any]:
        images, bad = decode_items(items)
        good = [i for i in items if i.request_id not in bad]
        per_item = [len(i.inputs) for i in good]
        pixels = None
        if images:
            pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
            pixels = pixels.to(self.device, self.torch_dtype)
        rows = generation.make_rows(good, per_item, self.device)
        return {"pixels": pixels, "rows": rows, "per_item": per_item, "good": good, "bad": bad}

    def forward(self, prepared: dict[str, Any], emit: EmitFn) -> dict[str, Any]:
        if prepared["pixels"] is not None:
            pad = self.tokenizer.pad_token_id
            with torch.inference_mode():
                self.model.generate(
                    pixel_values=prepared["pixels"],
                    pad_token_id=pad if pad is not None else next(iter(self.eos_ids), 0),
                    **generation.controls(prepared["rows"], self.tokenizer, self.eos_ids, emit),
                )
        return prepared

    def postprocess(self, output: dict[str, Any], items: list[WorkItem]) -> list[Outcome]:
        done = generation.outcomes(output["rows"], output["per_item"], self.tokenizer)
        by_id = {item.request_id: o for item, o in zip(output["good"], done, strict=True)}
        bad = output["bad"]
        return [by_id[i.request_id] if i.request_id in by_id else invalid(bad[i.request_id]) for i in items]

    def info(self) -> dict[str, Any]:
        return {"model_type": str(self.model.config.model_type)}
