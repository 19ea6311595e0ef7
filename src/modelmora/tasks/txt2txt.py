"""Text generation with a causal language model through transformers' `generate`.

pre: prompts (or chats, through the tokenizer's chat template) tokenized together with left
padding, cut from the left to fit the model's context; core: one batched `generate` whose
rows are steered by tasks/generation.py (own sampling parameters, stop conditions, token
events, cancellation); post: the text of each row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modelmora.contracts.channel import Outcome, WorkItem
from modelmora.tasks import generation
from modelmora.tasks.base import EmitFn, RequestRejected
from modelmora.tasks.torch_utils import resolve_device, resolve_dtype


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """A chat rendered by the tokenizer's chat template (the `messages` input, and so the
    OpenAI-compatible chat route); a model without a template refuses the request alone
    (VALIDATION_ERROR, a 400 on `/v1`), never its batch."""
    if not getattr(tokenizer, "chat_template", None):
        raise RequestRejected(
            "VALIDATION_ERROR", "this model's tokenizer has no chat template: send text, not messages"
        )
    text: str = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text


class TextGenerator:
    def __init__(self) -> None:
        self.model: Any = None
        self.tokenizer: Any = None
        self.device = "cpu"
        self.dtype = "float32"
        self.context = 1024
        self.eos_ids: set[int] = set()
        self.options: dict[str, Any] = {}

    def load(self, path: Path, device: str, dtype: str, options: dict[str, Any]) -> None:
        self.device = resolve_device(device)
        self.options = dict(options)
        torch_dtype = resolve_dtype(dtype, self.device)
        self.dtype = str(torch_dtype).removeprefix("torch.")
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        tokenizer.padding_side = "left"  # generation continues each row at its right end
        tokenizer.truncation_side = "left"  # a long prompt keeps its end
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        model: Any = AutoModelForCausalLM.from_pretrained(  # type: ignore[call-arg]
            str(path), dtype=torch_dtype, local_files_only=True
        )
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        config = model.config
        self.context = int(
            getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
        )
        self.eos_ids = generation.eos_ids_of(model, tokenizer)

    def prompt(self, prompt: Any) -> str:
        if isinstance(prompt, str):
            return prompt
        return chat_prompt(self.tokenizer, prompt["messages"])

    def preprocess(self, items: list[WorkItem]) -> dict[str, Any]:
        prompts = [self.prompt(p) for item in items for p in item.inputs]
        longest = max(int(i.params.get("max_tokens", 64)) for i in items)
        room = max(1, self.context - longest)
        encoded = self.tokenizer(prompts, padding=True, truncation=True, max_length=room, return_tensors="pt")
        lengths = encoded["attention_mask"].sum(dim=1).tolist()
        per_item = [len(i.inputs) for i in items]
        rows = generation.make_rows(items, per_item, self.device)
        for row, n in zip(rows, lengths, strict=True):
            row.prompt_tokens = int(n)
        return {
            "input_ids": encoded["input_ids"].to(self.device),
            "attention_mask": encoded["attention_mask"].to(self.device),
            "rows": rows,
            "per_item": per_item,
        }

    def forward(self, prepared: dict[str, Any], emit: EmitFn) -> dict[str, Any]:
        rows = prepared["rows"]
        with torch.inference_mode():
            self.model.generate(
                input_ids=prepared["input_ids"],
                attention_mask=prepared["attention_mask"],
                pad_token_id=self.tokenizer.pad_token_id,
                **generation.controls(rows, self.tokenizer, self.eos_ids, emit),
            )
        return prepared

    def postprocess(self, output: dict[str, Any], items: list[WorkItem]) -> list[Outcome]:
        return generation.outcomes(output["rows"], output["per_item"], self.tokenizer)

    def info(self) -> dict[str, Any]:
        return {"context": self.context, "vocab_size": int(self.model.config.vocab_size)}

    def stepper(self, slots: int) -> Any:
        """The step loop of continuous batching (tasks/continuous.py) over this model, for
        at most `slots` rows and `max_batch_tokens` KV tokens (default: a full context per
        slot, i.e. only the slots bound it). Raises `continuous.Unsupported` for a model
        whose cache cannot be stepped."""
        from modelmora.tasks.continuous import Stepper

        tokens = int(self.options.get("max_batch_tokens") or slots * self.context)
        return Stepper(self, slots, tokens)
