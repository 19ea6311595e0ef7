"""Image generation with a diffusers pipeline.

pre: nothing heavy (prompts stay text; the pipeline encodes them); core: one pipeline call for
the batch (the batcher groups requests of equal size, steps and guidance), one generator per
image so a seed gives the same picture whatever shares the batch, `progress` events after
every step, and an interrupt once every request of the batch is cancelled; post: PNG bytes
(the server stores them or inlines them, per `response_format`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from modelmora.contracts.channel import ItemError, ItemOk, Outcome, WorkItem
from modelmora.tasks.base import EmitFn
from modelmora.tasks.images import png_bytes
from modelmora.tasks.torch_utils import resolve_device, resolve_dtype


class ImageGenerator:
    def __init__(self) -> None:
        self.pipe: Any = None
        self.device = "cpu"
        self.dtype = "float32"

    def load(self, path: Path, device: str, dtype: str, options: dict[str, Any]) -> None:
        from diffusers import DiffusionPipeline

        self.device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, self.device)
        self.dtype = str(torch_dtype).removeprefix("torch.")
        pipe = DiffusionPipeline.from_pretrained(str(path), dtype=torch_dtype, local_files_only=True)  # type: ignore[no-untyped-call]
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)

    def preprocess(self, items: list[WorkItem]) -> list[dict[str, Any]]:
        """One entry per image to make: its prompt, negative prompt and seed."""
        images = []
        for item in items:
            p = item.params
            base = p.get("seed")
            if base is None:
                base = int.from_bytes(os.urandom(4), "little")
            item.params["seed_used"] = int(base)
            for k in range(int(p.get("num_images", 1))):
                images.append(
                    {
                        "item": item,
                        "prompt": item.inputs[0],
                        "negative": p.get("negative_prompt") or "",
                        "seed": int(base) + k,
                    }
                )
        return images

    def forward(self, prepared: list[dict[str, Any]], emit: EmitFn) -> dict[str, Any]:
        items = list({id(e["item"]): e["item"] for e in prepared}.values())
        first = items[0].params
        steps = int(first.get("steps", 25))
        cancelled: set[str] = set()

        def on_step(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            for item in items:
                if item.request_id in cancelled:
                    continue
                if emit.cancelled(item.request_id):
                    cancelled.add(item.request_id)
                else:  # always: job progress follows these too, not only streams
                    emit(item.request_id, "progress", {"step": step + 1, "total": steps})
            if len(cancelled) == len(items):
                pipe._interrupt = True  # nobody waits for this batch any more
            return kwargs

        generators = [torch.Generator(device=self.device).manual_seed(e["seed"]) for e in prepared]
        negatives = [e["negative"] for e in prepared]
        with torch.inference_mode():
            out = self.pipe(
                prompt=[e["prompt"] for e in prepared],
                negative_prompt=negatives if any(negatives) else None,
                width=first.get("width"),
                height=first.get("height"),
                num_inference_steps=steps,
                guidance_scale=float(first.get("guidance_scale", 7.5)),
                generator=generators,
                callback_on_step_end=on_step,
                output_type="pil",
            )
        return {"images": out.images, "cancelled": cancelled}

    def postprocess(self, output: dict[str, Any], items: list[WorkItem]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        start = 0
        for item in items:
            n = int(item.params.get("num_images", 1))
            mine = output["images"][start : start + n]
            start += n
            if item.request_id in output["cancelled"]:
                outcomes.append(ItemError("CANCELLED", "cancelled while it ran"))
                continue
            outcomes.append(
                ItemOk({"images": [png_bytes(img) for img in mine], "seed": item.params["seed_used"]})
            )
        return outcomes

    def info(self) -> dict[str, Any]:
        return {"pipeline": type(self.pipe).__name__}
