"""Events, streaming and cancellation with the fake adapters, in-process and in real workers.

- `InferenceService.infer(on_event=...)` sees a request's progress events in order.
- `InferenceService.stream()` yields token / progress events then `done` (or `error`), and
  raises before the first event for errors found up front.
- Closing a stream or a client leaving cancels the request in the worker, between steps; its
  batch-mates go on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from modelmora.config import Settings
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.lifecycle.manager import ModelManager
from modelmora.lifecycle.runners import in_process_runner_factory, process_runner_factory
from modelmora.registry.installer import InstallRequest, install
from modelmora.registry.store import RegistryStore
from modelmora.services.inference import InferenceService
from tests.conftest import make_fake_model
from tests.waiting import wait_for


@pytest.fixture(params=["in-process", "process"])
async def svc(
    request: pytest.FixtureRequest, settings: Settings, tmp_path: Path
) -> AsyncIterator[InferenceService]:
    store = RegistryStore(settings.database_url)
    store.create_schema()
    for name, folder in {
        "stepper": make_fake_model(tmp_path / "stepper", steps=4, step_ms=20),
        "slowstep": make_fake_model(tmp_path / "slowstep", steps=1000, step_ms=20),
        "gen": make_fake_model(tmp_path / "gen", task_type="txt2txt", step_ms=5),
        "slowgen": make_fake_model(tmp_path / "slowgen", task_type="txt2txt", step_ms=20),
        "embed": make_fake_model(tmp_path / "embed"),
    }.items():
        install(settings, store, InstallRequest(source=str(folder), name=name))
    factory = in_process_runner_factory if request.param == "in-process" else process_runner_factory
    manager = ModelManager(settings, store, factory)
    try:
        yield InferenceService(settings, manager)
    finally:
        await manager.shutdown()
        store.close()


async def test_on_event_sees_every_progress_step_in_order(svc: InferenceService) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    response = await svc.infer("stepper", {"text": "x"}, on_event=lambda k, d: seen.append((k, d)))
    assert seen == [("progress", {"step": i, "total": 4}) for i in range(1, 5)]
    assert len(response["result"]["embeddings"]) == 8
    # The handler is gone once the call returns: nothing leaks per request.
    manager = svc.manager
    assert manager.slots["stepper"].event_handlers == {}


async def test_stream_yields_tokens_then_done(svc: InferenceService) -> None:
    events = [e async for e in svc.stream("gen", {"text": "hello"}, {"max_tokens": 5, "seed": 1})]
    kinds = [e["event"] for e in events]
    assert kinds == ["token"] * 5 + ["done"]
    assert [e["data"]["index"] for e in events[:5]] == list(range(5))
    done = events[-1]["data"]
    assert done["result"]["text"] == "".join(e["data"]["text"] for e in events[:5])
    assert done["result"]["finish_reason"] == "length"
    assert done["result"]["usage"]["completion_tokens"] == 5
    # Not streamed: the same text, no events needed.
    plain = await svc.infer("gen", {"text": "hello"}, {"max_tokens": 5, "seed": 1})
    assert plain["result"]["text"] == done["result"]["text"]


async def test_stream_is_refused_for_embedding_tasks(svc: InferenceService) -> None:
    with pytest.raises(ModelMoraError) as info:
        await anext(svc.stream("stepper", {"text": "x"}))
    assert info.value.code is ErrorCode.VALIDATION_ERROR


async def test_stream_errors_before_the_first_event_are_raised(svc: InferenceService) -> None:
    with pytest.raises(ModelMoraError) as info:
        await anext(svc.stream("nope", {"text": "x"}))
    assert info.value.code is ErrorCode.MODEL_NOT_FOUND
    with pytest.raises(ModelMoraError) as info:
        await anext(svc.stream("gen", {"text": "x"}, {"max_tokens": 0}))
    assert info.value.code is ErrorCode.VALIDATION_ERROR
    # A failure after nothing was streamed is raised too (the fake fails "fail:" prompts).
    with pytest.raises(ModelMoraError) as info:
        await anext(svc.stream("gen", {"text": "fail: please"}, {"max_tokens": 1}))
    assert info.value.code is ErrorCode.INFERENCE_FAILED


async def test_closing_a_stream_cancels_it_and_its_batch_mate_goes_on(svc: InferenceService) -> None:
    await svc.infer("slowgen", {"text": "warm"}, {"max_tokens": 1})
    # A batch-mate that must finish: both start together, in one batch.
    mate = asyncio.ensure_future(svc.infer("slowgen", {"text": "mate"}, {"max_tokens": 8}))
    stream = svc.stream("slowgen", {"text": "long"}, {"max_tokens": 4000})  # ~80 s if never stopped
    first = await anext(stream)
    assert first["event"] == "token"
    await stream.aclose()
    response = await mate
    assert response["result"]["usage"]["completion_tokens"] == 8
    assert response["metadata"]["batch_size"] == 2
    # The worker stopped the cancelled generation: a request after it is served (it would
    # wait behind ~80 s of tokens otherwise, past this test's timeout).
    after = await asyncio.wait_for(svc.infer("slowgen", {"text": "after"}, {"max_tokens": 2}), 30)
    assert after["result"]["usage"]["completion_tokens"] == 2


async def test_a_client_leaving_cancels_stepping_work_between_steps(svc: InferenceService) -> None:
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    steps: list[int] = []

    def on_event(kind: str, data: dict[str, Any]) -> None:
        steps.append(data["step"])
        if len(steps) == 2 and not gone.done():
            gone.set_result(None)

    # ~20 s of steps if never stopped; the client leaves after two.
    with pytest.raises(ModelMoraError) as info:
        await svc.infer("slowstep", {"text": "x"}, disconnected=gone, on_event=on_event)
    assert info.value.code is ErrorCode.CANCELLED
    assert steps[:2] == [1, 2]
    # The worker dropped it between steps: its batch comes back long before its 1000 steps.
    scheduler = svc.manager.slots["slowstep"].scheduler
    assert scheduler is not None
    await wait_for(lambda: scheduler.inflight == 0, timeout=10, what="the batch back")


async def test_stream_error_event_after_tokens(svc: InferenceService) -> None:
    """A deadline that passes mid-stream ends it with an `error` event, not an exception."""
    # Loaded first: the deadline covers a load too, and a slow start on a busy machine would
    # end the request before its first token (a plain error, tested elsewhere).
    await svc.infer("slowgen", {"text": "warm"}, {"max_tokens": 1})
    events = [e async for e in svc.stream("slowgen", {"text": "x"}, {"max_tokens": 4000}, timeout_seconds=2)]
    assert events[0]["event"] == "token"
    assert events[-1]["event"] == "error"
    assert events[-1]["data"]["error_code"] == "INFERENCE_TIMEOUT"
    assert {e["event"] for e in events[:-1]} == {"token"}
