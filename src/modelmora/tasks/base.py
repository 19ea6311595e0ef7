"""The adapter contract the worker drives, and how the worker finds an adapter.

Adapters are imported lazily by name so that a worker pays for torch only when its model
needs it, and the server process (which imports this module for `SAMPLE_INPUTS`) never does.
"""

from __future__ import annotations

import base64
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from modelmora.contracts.channel import Outcome, WorkItem


class EmitFn(Protocol):
    """What `forward` gets: send a streamed event for one request, and ask whether a request
    was cancelled meanwhile, so long work (generation, diffusion steps) can drop it between
    steps and let its batch-mates continue."""

    def __call__(self, request_id: str, kind: str, data: dict[str, Any]) -> None: ...

    def cancelled(self, request_id: str) -> bool: ...


class Emitter:
    """The worker's EmitFn: events go out through `send`; cancellations are read from the set
    that the worker's channel reader fills while the model computes (a membership test under
    the GIL, no lock needed)."""

    __slots__ = ("_cancelled", "_send")

    def __init__(self, send: Callable[[str, str, dict[str, Any]], None], cancelled: set[str]) -> None:
        self._send = send
        self._cancelled = cancelled

    def __call__(self, request_id: str, kind: str, data: dict[str, Any]) -> None:
        self._send(request_id, kind, data)

    def cancelled(self, request_id: str) -> bool:
        return request_id in self._cancelled


HEALTH_CHECK_ID = "health-check"

# A built-in sample per task for the health check after load.
# A 16x16 PNG: image tasks check themselves with it (no Pillow needed to build it here).
SAMPLE_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAGklEQVR42mOssDnBQApgYiARjGoY1TB0NAAAvMQBnP/YHNIAAAAASUVORK5CYII="
)
_GREEDY_ONE = {"max_tokens": 1, "temperature": 0.0}

SAMPLE_INPUTS: dict[str, WorkItem] = {
    "txt2embed": WorkItem(request_id=HEALTH_CHECK_ID, inputs=["ModelMora health check."]),
    "txt2txt": WorkItem(HEALTH_CHECK_ID, ["ModelMora health check."], dict(_GREEDY_ONE)),
    "img2embed": WorkItem(HEALTH_CHECK_ID, [SAMPLE_PNG], {"normalize": False}),
    "img2txt": WorkItem(HEALTH_CHECK_ID, [SAMPLE_PNG], dict(_GREEDY_ONE)),
    # One small step: proves the whole pipeline runs without the cost of a real picture.
    "txt2img": WorkItem(
        HEALTH_CHECK_ID, ["health check"], {"steps": 1, "width": 64, "height": 64, "guidance_scale": 0.0}
    ),
}


class TaskAdapter(Protocol):
    device: str
    dtype: str

    def load(self, path: Path, device: str, dtype: str, options: dict[str, Any]) -> None: ...

    def preprocess(self, items: list[WorkItem]) -> Any:
        """CPU work (tokenising, decoding) that can overlap the model's work on another batch."""

    def forward(self, prepared: Any, emit: EmitFn) -> Any:
        """The model's work."""

    def postprocess(self, output: Any, items: list[WorkItem]) -> list[Outcome]:
        """One outcome per item, in order."""

    def info(self) -> dict[str, Any]: ...


_ADAPTERS: dict[tuple[str, str | None], str] = {
    ("txt2embed", None): "modelmora.tasks.txt2embed:SentenceEmbedder",
    ("txt2embed", "fake"): "modelmora.tasks.fake:FakeEmbedder",
    ("txt2txt", None): "modelmora.tasks.txt2txt:TextGenerator",
    ("txt2txt", "fake"): "modelmora.tasks.fake:FakeGenerator",
    ("img2embed", None): "modelmora.tasks.img2embed:ImageEmbedder",
    ("img2txt", None): "modelmora.tasks.img2txt:ImageCaptioner",
    ("txt2img", None): "modelmora.tasks.txt2img:ImageGenerator",
}


# What a warm spare imports ahead of time: the libraries the real adapters load. A task whose
# adapter needs none of them (the fake one) does not use the spare.
SPARE_MODULES = [
    "torch",
    "sentence_transformers",
    "transformers",
    "modelmora.tasks.txt2embed",
    "modelmora.tasks.txt2txt",
]


def uses_spare(task_type: str, adapter: str | None) -> bool:
    return adapter != "fake"


def adapter_for(task_type: str, adapter: str | None) -> TaskAdapter:
    target = _ADAPTERS.get((task_type, adapter))
    if target is None:
        raise LookupError(f"no adapter {adapter or 'default'!r} for task {task_type!r} yet")
    module_name, _, cls_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    instance: TaskAdapter = cls()
    return instance
