"""Workers forked from the zygote: supervision as exact as for a fresh process, fork safety,
shared memory, and a zygote that dies or is replaced.

The crash, kill and load-failure tests of test_worker_process.py run here again, unchanged,
with their runners forked from a zygote (the `_runner` they call is swapped for one that forks,
and each test checks that its runners really were forked).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from modelmora.contracts.channel import Event, ItemOk, LoadSpec, WorkItem
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.lifecycle.runners import ProcessRunner
from modelmora.lifecycle.zygote_pool import BASE_MODULES, ZygotePool, fork_supported
from modelmora.tasks.base import SPARE_MODULES
from tests.integration import test_worker_process as wp
from tests.integration.test_worker_process import (  # noqa: F401 - collected here again, forked
    test_a_crash_fails_the_batch_with_worker_died,
    test_a_pipelined_worker_keeps_results_failures_and_priorities,
    test_a_waiting_critical_batch_runs_before_a_waiting_low_one,
    test_bad_inputs_fail_alone_and_the_worker_lives,
    test_load_failures_are_reported,
    test_options_threads_caps_the_workers_torch_threads,
    test_sigkill_of_the_worker_is_noticed,
)
from tests.zygote_probe import PROBE

pytestmark = pytest.mark.skipif(not fork_supported(), reason="the zygote needs Linux")

TORCH_MODULES = [*BASE_MODULES, *SPARE_MODULES]


async def _zygote(modules: list[str]) -> ZygotePool:
    pool = ZygotePool(True, modules=modules)
    pool.fill()
    await pool.wait_filled()
    assert pool.ready, "the zygote did not start"
    return pool


@pytest.fixture
async def zygote() -> AsyncIterator[ZygotePool]:
    """A light zygote (no torch): the worker imports what its model needs after the fork."""
    pool = await _zygote(BASE_MODULES)
    yield pool
    await pool.close()


@pytest.fixture
async def torch_zygote() -> AsyncIterator[ZygotePool]:
    pool = await _zygote(TORCH_MODULES)
    yield pool
    await pool.close()


@pytest.fixture(autouse=True)
def forked_runners(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Point test_worker_process's `_runner` at the zygote for the tests imported from there."""
    if request.function.__module__ != wp.__name__:
        yield
        return
    pool: ZygotePool = request.getfixturevalue("zygote")
    made: list[ProcessRunner] = []

    def forked_runner(exits: list[str] | None = None, events: list[Event] | None = None) -> ProcessRunner:
        on_event = events.append if events is not None else (lambda _e: None)
        runner = ProcessRunner("t", on_event, (exits if exits is not None else []).append, forker=pool)
        made.append(runner)
        return runner

    monkeypatch.setattr(wp, "_runner", forked_runner)
    yield
    assert made and all(r.forked for r in made), "a runner was not forked from the zygote"
    assert pool.ready  # no crash of a worker touched it


def _tasks(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


async def test_a_forked_worker_is_the_servers_child_and_starts_with_one_thread(
    zygote: ZygotePool, fake_model_dir: Path
) -> None:
    assert zygote.last_ready["threads"] == 1 and zygote.last_ready["cuda"] is False
    runner = ProcessRunner("t", lambda _e: None, lambda _w: None, forker=zygote)
    await runner.start(LoadSpec(str(fake_model_dir), "txt2embed", adapter="fake"), 30)
    try:
        assert runner.hello == {"pid": runner.pid, "threads": ["MainThread"], "tasks": 1}
        assert runner.pid is not None and psutil.Process(runner.pid).ppid() == os.getpid()
        memory = runner.memory()
        assert 0 < memory["uss_bytes"] < memory["pss_bytes"] < memory["rss_bytes"]
        assert 0 < runner.accounted_bytes() < memory["pss_bytes"]  # the budget counts its USS
    finally:
        await runner.close(5)
    assert zygote.pid is not None and _tasks(zygote.pid) == 1


async def test_fork_safety_threads_torch_pools_openmp_and_tokenizers(torch_zygote: ZygotePool) -> None:
    zygote_pid = torch_zygote.pid
    assert zygote_pid is not None
    assert torch_zygote.last_ready["threads"] == 1  # numpy's BLAS pool quiesced before ready
    forked = await torch_zygote.fork_worker("probe", target=PROBE)
    try:
        assert forked.hello["threads"] == ["MainThread"] and forked.hello["tasks"] == 1
        size = int.from_bytes(await asyncio.wait_for(forked.reader.readexactly(4), 120), "big")
        found = json.loads(await forked.reader.readexactly(size))
    finally:
        forked.writer.close()
    assert await asyncio.wait_for(forked.process.wait(), 30) == 0
    assert found["threads_at_start"] == ["MainThread"] and found["tasks_at_start"] == 1
    assert found["torch_preloaded"] is True and found["cuda_initialized"] is False
    assert found["intra_threads"] == 2 and found["interop_threads"] == 2  # fresh pools
    assert found["matmul_ok"] and found["interop_ok"] and found["tokenizers_ok"]
    assert found["tokenizers_parallelism"] is None  # tokenizers did not disable itself
    assert found["tasks_after_tokenizers"] > 1  # the child started its own pools
    assert torch_zygote.pid == zygote_pid and _tasks(zygote_pid) == 1


async def test_twenty_forks_in_a_row_each_run_inference(torch_zygote: ZygotePool, tmp_path: Path) -> None:
    from tests.tiny_models import make_tiny_gpt2

    gpt2 = make_tiny_gpt2(tmp_path / "tiny-gpt2")
    zygote_pid = torch_zygote.pid
    pids = set()
    for i in range(20):
        runner = ProcessRunner(f"m{i}", lambda _e: None, lambda _w: None, forker=torch_zygote)
        threads = 1 + i % 2
        loaded = await runner.start(
            LoadSpec(str(gpt2), "txt2txt", device="cpu", options={"threads": threads}), 120
        )
        try:
            assert runner.forked and runner.hello is not None and runner.hello["tasks"] == 1
            assert loaded.info["threads"] == threads
            done = await runner.infer(
                [WorkItem(f"r{i}", [f"hello world {i}"], {"max_tokens": 4, "temperature": 0})]
            )
            outcome = done.outcomes[0]
            assert isinstance(outcome, ItemOk), outcome
            pids.add(runner.pid)
        finally:
            await runner.close(5)
    assert len(pids) == 20
    assert zygote_pid is not None and torch_zygote.pid == zygote_pid and _tasks(zygote_pid) == 1


async def test_minilm_forks_share_the_zygotes_pages(torch_zygote: ZygotePool, minilm_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    texts = ["The cat sits on the mat.", "naïve café ☕"]
    reference = SentenceTransformer(str(minilm_path), device="cpu").encode(texts)
    runners = [
        ProcessRunner(f"minilm{i}", lambda _e: None, lambda _w: None, forker=torch_zygote) for i in range(2)
    ]
    try:
        for runner in runners:
            await runner.start(LoadSpec(str(minilm_path), "txt2embed", device="cpu"), 120)
            done = await runner.infer([WorkItem("a", texts)])
            outcome = done.outcomes[0]
            assert isinstance(outcome, ItemOk)
            got = np.asarray(outcome.value)
            cos = (got * reference).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))
            assert cos.min() >= 0.9999
        zygote_rss = torch_zygote.rss_bytes()
        for runner in runners:
            memory = runner.memory()
            # torch and sentence-transformers stay shared: the worker adds far less than it maps
            assert memory["uss_bytes"] < memory["rss_bytes"] - zygote_rss // 2
            assert memory["pss_bytes"] < memory["rss_bytes"]
    finally:
        for runner in runners:
            await runner.close(5)


async def test_a_workers_crash_does_not_touch_the_zygote(zygote: ZygotePool, fake_model_dir: Path) -> None:
    zygote_pid = zygote.pid
    for how in ("exit", "kill"):
        exits: list[str] = []
        runner = ProcessRunner("t", lambda _e: None, exits.append, forker=zygote)
        await runner.start(LoadSpec(str(fake_model_dir), "txt2embed", adapter="fake"), 30)
        if how == "exit":
            with pytest.raises(ModelMoraError):
                await runner.infer([WorkItem("a", ["exit:now"])])
            assert exits == ["exited with status 3"]
        else:
            pending = asyncio.ensure_future(runner.infer([WorkItem("slow", ["sleep:5000"])]))
            assert runner.pid is not None
            os.kill(runner.pid, signal.SIGKILL)
            with pytest.raises(ModelMoraError) as exc:
                await asyncio.wait_for(pending, 10)
            assert exc.value.code is ErrorCode.WORKER_DIED and exits == ["killed by SIGKILL"]
        assert zygote.ready and zygote.pid == zygote_pid


async def test_a_dead_zygote_is_restarted_and_its_workers_live_on(
    zygote: ZygotePool, fake_model_dir: Path
) -> None:
    runner = ProcessRunner("t", lambda _e: None, lambda _w: None, forker=zygote)
    await runner.start(LoadSpec(str(fake_model_dir), "txt2embed", adapter="fake"), 30)
    first = zygote.pid
    assert first is not None
    try:
        os.kill(first, signal.SIGKILL)
        for _ in range(600):
            if zygote.ready and zygote.pid != first:
                break
            await asyncio.sleep(0.05)
        assert zygote.ready and zygote.pid != first and zygote.restarts == 1
        # The worker never depended on the zygote: still the server's child, still serving.
        assert runner.alive and runner.pid is not None and psutil.Process(runner.pid).ppid() == os.getpid()
        assert isinstance((await runner.infer([WorkItem("a", ["still"])])).outcomes[0], ItemOk)
        second = ProcessRunner("u", lambda _e: None, lambda _w: None, forker=zygote)
        await second.start(LoadSpec(str(fake_model_dir), "txt2embed", adapter="fake"), 30)
        assert second.forked
        await second.close(5)
    finally:
        await runner.close(5)


async def test_a_task_the_zygote_lacks_widens_it(zygote: ZygotePool, fake_model_dir: Path) -> None:
    """A fork for a task whose libraries the zygote lacks imports them itself, and a zygote
    with them takes over; the old zygote's workers go on."""
    first = zygote.pid
    forked = await zygote.fork_worker("t", "txt2embed", None)
    forked.writer.close()
    assert await forked.process.wait() == 0
    await zygote.wait_filled()
    assert zygote.ready and zygote.pid != first
    assert "sentence_transformers" in zygote.status()["modules"]


def test_forked_workers_and_the_zygote_exit_with_their_server(fake_model_dir: Path) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio
        from modelmora.lifecycle.zygote_pool import ZygotePool
        from modelmora.lifecycle.runners import ProcessRunner
        from modelmora.contracts.channel import LoadSpec
        async def main():
            pool = ZygotePool(True, modules=["modelmora.tasks.fake"])
            pool.fill()
            await pool.wait_filled()
            r = ProcessRunner("t", lambda e: None, lambda why: None, forker=pool)
            await r.start(LoadSpec({str(fake_model_dir)!r}, "txt2embed", adapter="fake"), 30)
            print(r.pid, pool.pid, r.forked, flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
        """
    )
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        worker, zygote, forked = server.stdout.readline().split()
        assert forked == "True" and wp._alive(int(worker)) and wp._alive(int(zygote))
        server.kill()
        server.wait()
        deadline = time.monotonic() + 10
        while (wp._alive(int(worker)) or wp._alive(int(zygote))) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not wp._alive(int(worker)) and not wp._alive(int(zygote))
    finally:
        server.kill()
