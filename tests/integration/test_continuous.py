"""Continuous batching end to end: the tiny GPT-2 in a stepped worker (in-process and a real
process), through InferenceService, against the same weights with static batching.

- greedy text equals the text of the same request run alone, and static batching's;
- a request that arrives while another generates joins it (shares its steps) and leaves
  as soon as it is done, while the other goes on;
- a seeded sampling request gives the same text alone, beside others, and in static mode;
- streamed tokens arrive in order and add up to the answer;
- a worker that cannot step a model (the fake generator) keeps static batching.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from modelmora.config import Settings
from modelmora.inference.continuous import ContinuousScheduler
from modelmora.lifecycle.manager import ModelManager
from modelmora.lifecycle.runners import in_process_runner_factory, process_runner_factory
from modelmora.registry.installer import InstallRequest, install
from modelmora.registry.store import RegistryStore
from modelmora.services.inference import InferenceService
from tests.conftest import make_fake_model

PROMPTS = ["The quick brown fox", "ModelMora serves many", "Hello world, this is", "A tiny model writes"]
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import make_tiny_gpt2

    return make_tiny_gpt2(tmp_path_factory.mktemp("cont") / "tiny-gpt2")


@pytest.fixture(params=["in-process", "process"])
async def svc(
    request: pytest.FixtureRequest, settings: Settings, tmp_path: Path, gpt2: Path
) -> AsyncIterator[InferenceService]:
    store = RegistryStore(settings.database_url)
    store.create_schema()
    for name, source, config in [
        ("cont", gpt2, {"batching": "continuous"}),
        ("static", gpt2, {"batching": "static"}),
        ("default", gpt2, {}),
        ("fakegen", make_fake_model(tmp_path / "fakegen", task_type="txt2txt"), {"batching": "continuous"}),
    ]:
        install(settings, store, InstallRequest(source=str(source), name=name, config=config))
    factory = in_process_runner_factory if request.param == "in-process" else process_runner_factory
    manager = ModelManager(settings, store, factory)
    try:
        yield InferenceService(settings, manager)
    finally:
        await manager.shutdown()
        store.close()


def text(response: dict[str, Any]) -> str:
    value: str = response["result"]["text"]
    return value


async def test_the_model_is_stepped_and_greedy_text_equals_the_text_alone(svc: InferenceService) -> None:
    alone = [text(await svc.infer("cont", {"text": p}, {"max_tokens": 24, **GREEDY})) for p in PROMPTS]
    assert isinstance(svc.manager.slots["cont"].scheduler, ContinuousScheduler)
    static = [text(await svc.infer("static", {"text": p}, {"max_tokens": 24, **GREEDY})) for p in PROMPTS]
    assert not isinstance(svc.manager.slots["static"].scheduler, ContinuousScheduler)
    assert alone == static
    # txt2txt without a setting is continuous (inference/continuous.py DEFAULT_BATCHING)
    await svc.infer("default", {"text": PROMPTS[0]}, {"max_tokens": 4, **GREEDY})
    assert isinstance(svc.manager.slots["default"].scheduler, ContinuousScheduler)
    # Together, with different lengths: rows join and leave at different steps.
    together = await asyncio.gather(
        *(svc.infer("cont", {"text": p}, {"max_tokens": 24 - 4 * i, **GREEDY}) for i, p in enumerate(PROMPTS))
    )
    for i, response in enumerate(together):
        assert response["result"]["usage"]["completion_tokens"] <= 24 - 4 * i
        assert alone[i].startswith(text(response))


async def test_a_request_joins_a_running_generation_and_leaves_before_it(svc: InferenceService) -> None:
    await svc.infer("cont", {"text": "warm"}, {"max_tokens": 1})
    stream = svc.stream("cont", {"text": PROMPTS[0]}, {"max_tokens": 200, **GREEDY})
    first = await anext(stream)  # the long one is running
    assert first["event"] == "token"
    short = await svc.infer("cont", {"text": PROMPTS[1]}, {"max_tokens": 3, **GREEDY})
    # It shared the running batch's steps, and came back while the long one still runs.
    assert short["metadata"]["batch_size"] == 2
    assert short["result"]["usage"]["completion_tokens"] == 3
    rest = [e async for e in stream]
    assert rest[-1]["event"] == "done"
    long_tokens = rest[-1]["data"]["result"]["usage"]["completion_tokens"]
    assert long_tokens > 3
    # Streaming order: indices 0..n-1, and the pieces add up to the answer.
    tokens = [first, *rest[:-1]]
    assert [e["data"]["index"] for e in tokens] == list(range(len(tokens)))
    assert "".join(e["data"]["text"] for e in tokens) == rest[-1]["data"]["result"]["text"]


async def test_seeded_sampling_is_reproducible_alone_beside_others_and_in_static_mode(
    svc: InferenceService,
) -> None:
    seeded = {"max_tokens": 16, "temperature": 0.9, "top_k": 50, "top_p": 0.95, "seed": 7}
    first = text(await svc.infer("cont", {"text": PROMPTS[2]}, seeded))
    crowd = [
        svc.infer("cont", {"text": p}, {"max_tokens": 16, "temperature": 1.0, "seed": 100 + i})
        for i, p in enumerate(PROMPTS)
    ]
    again, *_ = await asyncio.gather(svc.infer("cont", {"text": PROMPTS[2]}, seeded), *crowd)
    assert text(again) == first
    assert text(await svc.infer("static", {"text": PROMPTS[2]}, seeded)) == first


async def test_a_model_the_worker_cannot_step_keeps_static_batching(svc: InferenceService) -> None:
    response = await svc.infer("fakegen", {"text": "hello"}, {"max_tokens": 3})
    assert response["result"]["usage"]["completion_tokens"] == 3
    scheduler = svc.manager.slots["fakegen"].scheduler
    assert scheduler is not None and not isinstance(scheduler, ContinuousScheduler)
