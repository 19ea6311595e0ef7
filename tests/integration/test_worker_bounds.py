"""Worker bounds (issue 14): deadlines reach the worker, long lists run in sub-batches that a
cancel or a passed deadline stops, image bombs are refused in the worker from their headers,
and an idle worker left above its RSS high-water mark is restarted."""

from __future__ import annotations

import io
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from modelmora.config import Settings
from modelmora.contracts.channel import Infer, ItemError, ItemOk, LoadSpec, WorkItem
from modelmora.contracts.tasks import TaskType
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.lifecycle.manager import ModelManager
from modelmora.lifecycle.runners import in_process_runner_factory, process_runner_factory
from modelmora.lifecycle.worker import WorkerCore
from modelmora.registry.catalog import ModelState
from modelmora.registry.installer import InstallRequest, install
from modelmora.registry.store import RegistryStore
from modelmora.services.inference import InferenceService
from modelmora.tasks.base import SAMPLE_PNG
from tests.conftest import make_fake_model
from tests.runners import RUNNER_KINDS
from tests.waiting import wait_for


def _fake_core(tmp: Path, **options: object) -> WorkerCore:
    core = WorkerCore()
    folder = make_fake_model(tmp / "fake", **options)
    spec = LoadSpec(str(folder), TaskType.TXT2EMBED, adapter="fake", options={"dim": 8, **options})
    assert core.load(spec).__class__.__name__ == "Loaded"
    return core


# -- deadlines in the worker -------------------------------------------------------------


def test_an_item_past_its_deadline_is_dropped_before_it_runs(tmp_path: Path) -> None:
    core = _fake_core(tmp_path)
    late = WorkItem("late", ["never"], deadline=time.monotonic() - 1)
    timely = WorkItem("timely", ["yes"], deadline=time.monotonic() + 3600)
    done = core.infer(Infer(1, [late, timely]))
    assert isinstance(done.outcomes[0], ItemError) and done.outcomes[0].code == "INFERENCE_TIMEOUT"
    assert isinstance(done.outcomes[1], ItemOk)
    assert list(core.adapter.seen)[1:] == ["yes"]  # after the health check  # type: ignore[union-attr]


def test_a_long_list_stops_at_the_next_boundary_once_its_deadline_passes(tmp_path: Path) -> None:
    core = _fake_core(tmp_path, per_item_ms=50)
    adapter: Any = core.adapter
    before = adapter.computed  # the health check's text
    texts = [f"t{i}" for i in range(400)]  # 20 s of work
    done = core.infer(Infer(1, [WorkItem("long", texts, deadline=time.monotonic() + 0.3)]))
    outcome = done.outcomes[0]
    assert isinstance(outcome, ItemError) and outcome.code == "INFERENCE_TIMEOUT"
    assert adapter.computed - before < len(texts)


@pytest.fixture
def store(settings: Settings) -> RegistryStore:
    s = RegistryStore(settings.database_url)
    s.create_schema()
    return s


@pytest.fixture
async def make_manager(settings: Settings, store: RegistryStore) -> AsyncIterator[object]:
    managers: list[ModelManager] = []

    async def build(kind: str) -> tuple[ModelManager, InferenceService]:
        factory = process_runner_factory if kind == "process" else in_process_runner_factory
        manager = ModelManager(settings, store, factory)
        await manager.start()
        managers.append(manager)
        return manager, InferenceService(settings, manager)

    yield build
    for manager in managers:
        await manager.shutdown()


def _install(settings: Settings, store: RegistryStore, tmp: Path, name: str, **options: object) -> None:
    folder = make_fake_model(tmp / f"src-{name}", **options)
    install(settings, store, InstallRequest(source=str(folder), name=name))


@pytest.mark.parametrize("kind", RUNNER_KINDS)
async def test_the_worker_is_free_soon_after_a_long_request_times_out(
    settings: Settings, store: RegistryStore, tmp_path: Path, make_manager, kind: str
) -> None:  # type: ignore[no-untyped-def]
    # 256 texts of 1 s each: left to run, the worker would be busy for over four minutes.
    _install(settings, store, tmp_path, "slow", per_item_ms=1000)
    manager, svc = await make_manager(kind)
    await svc.infer("slow", {"text": "warm"})
    with pytest.raises(ModelMoraError) as err:
        await svc.infer("slow", {"text": [f"t{i}" for i in range(256)]}, timeout_seconds=1.5)
    assert err.value.code is ErrorCode.INFERENCE_TIMEOUT
    # The next request is answered once the worker drops the rest of the list: well within
    # its own deadline, which is a fraction of what the list would have taken.
    out = await svc.infer("slow", {"text": "next"}, timeout_seconds=60)
    assert len(out["result"]["embeddings"]) == 8
    if kind == "in-process":
        adapter: Any = manager.slots["slow"].runner._core.adapter  # type: ignore[union-attr]
        assert adapter.computed < 1 + 1 + 256  # health check + warm + not the whole list


# -- RSS high-water mark -------------------------------------------------------------------


@pytest.mark.parametrize("kind", RUNNER_KINDS)
async def test_an_idle_worker_above_its_high_water_mark_is_restarted(
    settings: Settings, store: RegistryStore, tmp_path: Path, make_manager, kind: str
) -> None:  # type: ignore[no-untyped-def]
    _install(settings, store, tmp_path, "leaky", grow_mb=200)
    _install(settings, store, tmp_path, "steady")
    manager, svc = await make_manager(kind)
    await svc.infer("steady", {"text": "x"})
    # The mark: 100 MiB above what the worker held after its load (the in-process twin
    # reports its fake's own memory only).
    baseline = manager.slots["steady"].rss_baseline if kind == "process" else 0
    settings.resources.worker_rss_high_water_mb = (baseline >> 20) + 100
    await svc.infer("steady", {"text": "y"})
    await svc.infer("leaky", {"text": "x"})  # holds 200 MiB more from now on
    await wait_for(lambda: manager.slots["leaky"].state is ModelState.UNLOADED, what="leaky restarted")
    unloads = manager.metrics.unloads.labels("leaky", "memory")._value.get()
    assert unloads == 1
    assert manager.slots["steady"].state is ModelState.READY
    # Loaded again on the next demand.
    await svc.infer("leaky", {"text": "again"})
    assert manager.slots["leaky"].state is ModelState.READY


async def test_the_growth_factor_mark_follows_the_rss_after_the_load(
    settings: Settings, store: RegistryStore, tmp_path: Path, make_manager
) -> None:  # type: ignore[no-untyped-def]
    _install(settings, store, tmp_path, "m")
    manager, svc = await make_manager("process")
    await svc.infer("m", {"text": "x"})
    slot = manager.slots["m"]
    base = slot.rss_baseline
    assert base > 0
    assert manager.reaper.high_water(slot) == max(3 * base, base + (512 << 20))
    settings.resources.worker_rss_growth_factor = None
    assert manager.reaper.high_water(slot) is None


# -- image bombs in the worker, sub-batches of the real adapters ---------------------------


def _png(side: int, mode: str = "1") -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new(mode, (side, side)).save(out, format="PNG", optimize=True)
    return out.getvalue()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def _clip_core(path: Path, **options: object) -> WorkerCore:
    core = WorkerCore()
    loaded = core.load(LoadSpec(str(path), TaskType.IMG2EMBED, device="cpu", options=dict(options)))
    assert loaded.__class__.__name__ == "Loaded", loaded
    return core


def test_the_worker_refuses_image_bombs_from_their_headers(tiny_clip: Path) -> None:
    core = _clip_core(tiny_clip)
    bomb = _png(6320)
    rss = psutil.Process().memory_info().rss
    bombs = WorkItem("bombs", [bomb] * 10, max_decoded_bytes=64 << 20)
    fine = WorkItem("fine", [SAMPLE_PNG], max_decoded_bytes=64 << 20)
    done = core.infer(Infer(1, [bombs, fine]))
    refused, ok = done.outcomes
    assert isinstance(refused, ItemError) and refused.code == "PAYLOAD_TOO_LARGE"
    assert refused.details["decoded_bytes"] == 10 * 6320 * 6320 * 3
    assert isinstance(ok, ItemOk)
    # Decoding the ten would have taken well over a GB; a generous bound on the growth.
    assert psutil.Process().memory_info().rss - rss < 300 << 20


def test_image_sub_batches_give_the_same_vectors(tiny_clip: Path) -> None:
    images = [_png(40 + 8 * i, "RGB") for i in range(5)]
    whole = _clip_core(tiny_clip).infer(Infer(1, [WorkItem("a", images[:2]), WorkItem("b", images[2:])]))
    pieces = _clip_core(tiny_clip, sub_batch_size=2).infer(
        Infer(1, [WorkItem("a", images[:2]), WorkItem("b", images[2:])])
    )
    for one, other in zip(whole.outcomes, pieces.outcomes, strict=True):
        assert isinstance(one, ItemOk) and isinstance(other, ItemOk)
        np.testing.assert_allclose(one.value, other.value, rtol=1e-4, atol=1e-5)


class _CancelAfter:
    """An EmitFn whose requests count as cancelled once `calls` checks were made."""

    def __init__(self, calls: int) -> None:
        self.calls = calls

    def __call__(self, request_id: str, kind: str, data: dict[str, Any]) -> None:
        pass

    def cancelled(self, request_id: str) -> bool:
        self.calls -= 1
        return self.calls < 0


def test_text_sub_batches_match_and_stop_on_cancel(minilm_path: Path) -> None:
    from modelmora.tasks.txt2embed import SentenceEmbedder

    texts = [f"sentence number {i} about nothing much" for i in range(10)]
    whole, pieces = SentenceEmbedder(), SentenceEmbedder()
    whole.load(minilm_path, "cpu", "float32", {})
    pieces.load(minilm_path, "cpu", "float32", {"sub_batch_size": 3})
    items = [WorkItem("a", texts[:4]), WorkItem("b", texts[4:])]
    never = _CancelAfter(10**6)
    a = whole.postprocess(whole.forward(whole.preprocess(items), never), items)
    b = pieces.postprocess(pieces.forward(pieces.preprocess(items), never), items)
    for one, other in zip(a, b, strict=True):
        assert isinstance(one, ItemOk) and isinstance(other, ItemOk)
        np.testing.assert_allclose(one.value, other.value, rtol=1e-4, atol=1e-5)

    # Cancelled after the first sub-batch: the rest of the list is never computed.
    long = [WorkItem("long", texts)]
    prepared = pieces.preprocess(long)
    assert len(prepared.pieces.rows) == 4
    output = pieces.forward(prepared, _CancelAfter(1))
    assert output.dropped == {"long"}
    (outcome,) = pieces.postprocess(output, long)
    assert isinstance(outcome, ItemError) and outcome.code == "CANCELLED"
    assert not output.embeddings[3:].any()  # rows after the first sub-batch left unset
