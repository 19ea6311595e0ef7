"""One `TaskSpec` per task type: everything the server and the worker know about a task.

The server reads a spec to check a request (input fields, parser, image URLs), to pick its
deadline, to refuse `stream` for a task that cannot stream and to shape the worker's result;
the worker reads it to find the adapter (by module path, imported only there: the server
never imports torch) and the health-check sample it runs after a load. Adding a task type is
one `TaskType` member, one spec here and one adapter module.

This module imports nothing heavy (the parsers and shapers are pure, `LimitsSettings` is for
type checking only), since every worker imports it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from modelmora.contracts.channel import WorkItem
from modelmora.contracts.tasks import StreamKind, TaskType
from modelmora.tasks import inputs, outputs
from modelmora.tasks.base import HEALTH_CHECK_ID, SAMPLE_PNG, TaskAdapter
from modelmora.tasks.inputs import ParsedInput
from modelmora.tasks.outputs import ResultSink

if TYPE_CHECKING:
    from modelmora.config import LimitsSettings, SchedulerSettings


class Parser(Protocol):
    def __call__(
        self, input_data: dict[str, Any], params: dict[str, Any], limits: LimitsSettings
    ) -> ParsedInput: ...


class Shaper(Protocol):
    async def __call__(self, value: Any, parsed: ParsedInput, sink: ResultSink) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """Where an adapter class lives ("package.module:Class"), imported by the worker alone."""

    target: str
    # A torch adapter loads into the warm spare (a worker with torch already imported) and is
    # budgeted with torch's own memory; the fake adapters need neither.
    uses_torch: bool = True

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    def build(self) -> TaskAdapter:
        module, _, cls_name = self.target.partition(":")
        instance: TaskAdapter = getattr(importlib.import_module(module), cls_name)()
        return instance


class Request(NamedTuple):
    """A request as a client sends it (`input_data`, `parameters`)."""

    input_data: Mapping[str, Any]
    parameters: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class TaskSpec:
    task: TaskType
    # The `input_data` fields the task reads; any other is refused.
    input_fields: frozenset[str]
    # Checks `input_data` and `parameters` against the limits, before anything is queued.
    parse: Parser
    # Turns the worker's value for one request into the response's `result`.
    shape: Shaper
    # The deadline when neither the request nor the model sets one (the setting
    # `scheduler.default_timeout_seconds[task]` overrides it).
    default_timeout_seconds: float
    # The health check after a load: one request the adapter must answer without an error.
    health_inputs: tuple[Any, ...]
    health_params: Mapping[str, Any]
    # By the model's `adapter` setting: None is the real one.
    adapters: Mapping[str | None, AdapterRef]
    # What the task streams (None: it cannot be asked to).
    stream: StreamKind | None = None
    # `input_data.image` may name an allowed URL that the server fetches (tasks/image_urls.py).
    image_inputs: bool = False
    # What `warmup` sends through the request path; None: the load (and its health check)
    # is the warm-up.
    warmup: Request | None = None

    def parse_request(
        self, input_data: dict[str, Any], params: dict[str, Any], limits: LimitsSettings
    ) -> ParsedInput:
        inputs.refuse_unknown_fields(self.task.value, input_data, self.input_fields)
        return self.parse(input_data, params, limits)

    def health_item(self) -> WorkItem:
        return WorkItem(HEALTH_CHECK_ID, list(self.health_inputs), dict(self.health_params))

    def adapter(self, name: str | None) -> AdapterRef:
        ref = self.adapters.get(name)
        if ref is None:
            raise LookupError(f"no adapter {name or 'default'!r} for task {self.task.value!r}")
        return ref

    def uses_torch(self, adapter: str | None) -> bool:
        """Whether a model of this task with this `adapter` setting needs torch (and so takes
        the warm spare); an unknown adapter counts as torch, the safe side for memory."""
        ref = self.adapters.get(adapter)
        return ref is None or ref.uses_torch


HEALTH_TEXT = "ModelMora health check."
_GREEDY_ONE: Mapping[str, Any] = MappingProxyType({"max_tokens": 1, "temperature": 0.0})
_FAKE_EMBEDDER = AdapterRef("modelmora.tasks.fake:FakeEmbedder", uses_torch=False)
_FAKE_GENERATOR = AdapterRef("modelmora.tasks.fake:FakeGenerator", uses_torch=False)

ALL_SPECS: tuple[TaskSpec, ...] = (
    TaskSpec(
        task=TaskType.TXT2EMBED,
        input_fields=frozenset({"text"}),
        parse=inputs.parse_txt2embed,
        shape=outputs.embeddings,
        default_timeout_seconds=60.0,
        health_inputs=(HEALTH_TEXT,),
        health_params={},
        adapters={None: AdapterRef("modelmora.tasks.txt2embed:SentenceEmbedder"), "fake": _FAKE_EMBEDDER},
        warmup=Request({"text": [HEALTH_TEXT]}, {}),
    ),
    TaskSpec(
        task=TaskType.IMG2EMBED,
        input_fields=frozenset({"image"}),
        parse=inputs.parse_img2embed,
        shape=outputs.embeddings,
        default_timeout_seconds=60.0,
        health_inputs=(SAMPLE_PNG,),
        health_params={"normalize": False},
        adapters={None: AdapterRef("modelmora.tasks.img2embed:ImageEmbedder")},
        image_inputs=True,
    ),
    TaskSpec(
        task=TaskType.TXT2TXT,
        input_fields=frozenset({"text", "messages"}),
        parse=inputs.parse_txt2txt,
        shape=outputs.generated_text,
        default_timeout_seconds=300.0,
        health_inputs=(HEALTH_TEXT,),
        health_params=_GREEDY_ONE,
        adapters={None: AdapterRef("modelmora.tasks.txt2txt:TextGenerator"), "fake": _FAKE_GENERATOR},
        stream=StreamKind.TOKENS,
    ),
    TaskSpec(
        task=TaskType.TXT2IMG,
        input_fields=frozenset({"text"}),
        parse=inputs.parse_txt2img,
        shape=outputs.images,
        default_timeout_seconds=600.0,
        # One small step: proves the whole pipeline runs without the cost of a real picture.
        health_inputs=("health check",),
        health_params={"steps": 1, "width": 64, "height": 64, "guidance_scale": 0.0},
        adapters={None: AdapterRef("modelmora.tasks.txt2img:ImageGenerator")},
        stream=StreamKind.PROGRESS,
    ),
    TaskSpec(
        task=TaskType.IMG2TXT,
        input_fields=frozenset({"image"}),
        parse=inputs.parse_img2txt,
        shape=outputs.generated_text,
        default_timeout_seconds=300.0,
        health_inputs=(SAMPLE_PNG,),
        health_params=_GREEDY_ONE,
        adapters={None: AdapterRef("modelmora.tasks.img2txt:ImageCaptioner")},
        stream=StreamKind.TOKENS,
        image_inputs=True,
    ),
)


def _index(specs: tuple[TaskSpec, ...]) -> Mapping[TaskType, TaskSpec]:
    table: dict[TaskType, TaskSpec] = {}
    for spec in specs:
        if spec.task in table:
            raise RuntimeError(f"two specs for task {spec.task.value!r}")
        table[spec.task] = spec
    return MappingProxyType(table)


SPECS: Mapping[TaskType, TaskSpec] = _index(ALL_SPECS)


def spec_for(task: TaskType) -> TaskSpec:
    return SPECS[task]


def parse_input(
    task: TaskType | str, input_data: dict[str, Any], params: dict[str, Any], limits: LimitsSettings
) -> ParsedInput:
    """The request path's check of one request, by task name (the service holds the spec)."""
    return SPECS[TaskType(task)].parse_request(input_data, params, limits)


def default_timeout(scheduler: SchedulerSettings, task: TaskType) -> float:
    """The deadline of a request that sets none, when its model sets none either."""
    configured = scheduler.default_timeout_seconds.get(task)
    return configured if configured is not None else SPECS[task].default_timeout_seconds
