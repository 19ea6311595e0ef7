"""Real worker processes: the MiniLM adapter, failures that must not kill a worker, crashes,
and a worker that outlives nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from modelmora.contracts.channel import Event, ItemError, ItemOk, LoadSpec, WorkItem
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.lifecycle.runners import ProcessRunner
from tests.waiting import wait_for


def _runner(exits: list[str] | None = None, events: list[Event] | None = None) -> ProcessRunner:
    on_event = events.append if events is not None else (lambda _e: None)
    return ProcessRunner("t", on_event, (exits if exits is not None else []).append)


async def _computing(events: list[Event], request_id: str) -> None:
    """The worker is inside that request's batch: the fake in stepping mode reports each step."""
    await wait_for(lambda: any(e.request_id == request_id for e in events), what=f"{request_id} computing")


async def test_minilm_matches_sentence_transformers(minilm_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    texts = ["The cat sits on the mat.", "Quantum chromodynamics", "naïve café ☕", "x"]
    long_text = " ".join(["word"] * 600)  # far over the 256-token limit: truncated, not rejected
    runner = _runner()
    loaded = await runner.start(LoadSpec(str(minilm_path), "txt2embed", device="cpu"), timeout=120)
    try:
        assert loaded.device == "cpu" and loaded.dtype == "float32" and loaded.info["dim"] == 384
        done = await runner.infer([WorkItem("a", texts), WorkItem("b", [long_text], {"normalize": True})])
    finally:
        await runner.close(grace=5)
    first, second = done.outcomes
    assert isinstance(first, ItemOk) and isinstance(second, ItemOk)
    reference = SentenceTransformer(str(minilm_path), device="cpu").encode([*texts, long_text])
    got = np.vstack([first.value, second.value])
    cos = (got * reference).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))
    assert cos.min() >= 0.9999
    np.testing.assert_allclose(
        np.linalg.norm(first.value, axis=1), np.linalg.norm(reference[:4], axis=1), rtol=1e-4
    )
    assert abs(np.linalg.norm(second.value) - 1.0) < 1e-5
    assert first.meta["truncated"] == 0 and second.meta["truncated"] == 1


async def test_bad_inputs_fail_alone_and_the_worker_lives(fake_model_dir: Path) -> None:
    runner = _runner()
    await runner.start(LoadSpec(str(fake_model_dir), "txt2embed", adapter="fake"), timeout=30)
    try:
        done = await runner.infer(
            [
                WorkItem("ok1", ["hello"]),
                WorkItem("bad", ["fail:me"]),
                WorkItem("boom", ["crash:batch"]),
                WorkItem("ok2", ["world"]),
            ]
        )
        kinds = [type(o).__name__ for o in done.outcomes]
        assert kinds == ["ItemOk", "ItemError", "ItemError", "ItemOk"]
        assert isinstance(done.outcomes[2], ItemError) and done.outcomes[2].code == "INFERENCE_FAILED"
        assert (await runner.health()).rss_bytes > 0
        again = await runner.infer([WorkItem("ok3", ["still here"])])
        assert isinstance(again.outcomes[0], ItemOk)
    finally:
        await runner.close(grace=5)


async def test_a_crash_fails_the_batch_with_worker_died(fake_model_dir: Path) -> None:
    exits: list[str] = []
    runner = _runner(exits)
    await runner.start(LoadSpec(str(fake_model_dir), "txt2embed", adapter="fake"), timeout=30)
    pid = runner.pid
    with pytest.raises(ModelMoraError) as exc:
        await runner.infer([WorkItem("a", ["ok"]), WorkItem("b", ["exit:now"])])
    assert exc.value.code is ErrorCode.WORKER_DIED
    assert exits and "status 3" in exits[0]
    assert not runner.alive
    with pytest.raises(ModelMoraError):
        await runner.infer([WorkItem("c", ["after"])])
    assert pid is not None and not _alive(pid)


async def test_sigkill_of_the_worker_is_noticed(fake_model_dir: Path) -> None:
    exits: list[str] = []
    events: list[Event] = []
    runner = _runner(exits, events)
    steps = {"steps": 500, "step_ms": 10}  # 5 s if never stopped
    await runner.start(LoadSpec(str(fake_model_dir), "txt2embed", adapter="fake", options=steps), timeout=30)
    pending = asyncio.ensure_future(runner.infer([WorkItem("slow", ["x"])]))
    await _computing(events, "slow")  # killed mid-batch
    assert runner.pid is not None
    os.kill(runner.pid, signal.SIGKILL)
    with pytest.raises(ModelMoraError) as exc:
        await asyncio.wait_for(pending, 5)
    assert exc.value.code is ErrorCode.WORKER_DIED and "SIGKILL" in exc.value.message
    assert exits == ["killed by SIGKILL"]


@pytest.mark.parametrize(
    ("options", "path", "fragment"),
    [
        ({"fail_load": True}, None, "asked to fail"),
        ({}, "/nonexistent/model", "nonexistent"),
        ({"threads": "all of them"}, None, "options.threads must be a whole number"),
        ({"threads": 0}, None, "options.threads must be a whole number"),
    ],
)
async def test_load_failures_are_reported(
    fake_model_dir: Path, minilm_path: Path, options: dict[str, object], path: str | None, fragment: str
) -> None:
    runner = _runner()
    adapter = "fake" if path is None else None
    spec = LoadSpec(path or str(fake_model_dir), "txt2embed", adapter=adapter, options=options)
    with pytest.raises(ModelMoraError) as exc:
        await runner.start(spec, timeout=120)
    assert exc.value.code is ErrorCode.MODEL_LOAD_FAILED and fragment in exc.value.message
    assert not runner.alive


async def test_options_threads_caps_the_workers_torch_threads(fake_model_dir: Path) -> None:
    runner = _runner()
    spec = LoadSpec(str(fake_model_dir), "txt2embed", adapter="fake", options={"threads": 1})
    loaded = await runner.start(spec, 60)
    try:
        assert loaded.info["threads"] == 1  # torch.get_num_threads() in the worker
    finally:
        await runner.close(5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): look at its state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_worker_exits_when_its_server_is_killed(fake_model_dir: Path, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from modelmora.lifecycle.runners import ProcessRunner
        from modelmora.contracts.channel import LoadSpec
        async def main():
            r = ProcessRunner("t", lambda e: None, lambda why: None)
            await r.start(LoadSpec({str(fake_model_dir)!r}, "txt2embed", adapter="fake"), 30)
            print(r.pid, flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
        """
    )
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        worker_pid = int(server.stdout.readline())
        assert _alive(worker_pid)
        server.kill()
        server.wait()
        deadline = time.monotonic() + 10
        while _alive(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker_pid)
    finally:
        server.kill()


async def test_a_waiting_critical_batch_runs_before_a_waiting_low_one(fake_model_dir: Path) -> None:
    events: list[Event] = []
    runner = _runner(events=events)
    # Stepping mode: each batch reports its steps, so the test sees the worker start one.
    steps = {"steps": 2, "step_ms": 150}
    await runner.start(LoadSpec(str(fake_model_dir), "txt2embed", adapter="fake", options=steps), timeout=30)
    finished: list[str] = []

    async def run(name: str, text: str, priority: int) -> None:
        await runner.infer([WorkItem(name, [text])], priority)
        finished.append(name)

    try:
        busy = asyncio.ensure_future(run("busy", "x", 3))
        await _computing(events, "busy")
        # Both wait in the worker's inbox while busy computes; sent low first.
        low = asyncio.ensure_future(run("low", "x", 4))
        critical = asyncio.ensure_future(run("critical", "y", 1))
        await asyncio.gather(busy, low, critical)
    finally:
        await runner.close(grace=5)
    assert finished == ["busy", "critical", "low"]


async def test_a_pipelined_worker_keeps_results_failures_and_priorities(tmp_path: Path) -> None:
    """The GPU layout (preprocess in one thread, model in another), forced on the CPU."""
    from tests.conftest import make_fake_model

    folder = make_fake_model(tmp_path / "piped", pipeline=True)
    events: list[Event] = []
    runner = _runner(events=events)
    # Stepping mode: each batch reports its steps, so the test sees the worker start one.
    options = {"pipeline": True, "steps": 2, "step_ms": 150}
    await runner.start(LoadSpec(str(folder), "txt2embed", adapter="fake", options=options), 30)
    finished: list[str] = []

    async def run(name: str, texts: list[str], priority: int = 3) -> object:
        done = await runner.infer([WorkItem(name, texts)], priority)
        finished.append(name)
        return done.outcomes[0]

    try:
        busy = asyncio.ensure_future(run("busy", ["x"]))
        await _computing(events, "busy")
        ahead = asyncio.ensure_future(run("ahead", ["a"]))  # prepared while busy computes
        low = asyncio.ensure_future(run("low", ["b"], 4))
        critical = asyncio.ensure_future(run("critical", ["c"], 1))
        bad = asyncio.ensure_future(run("bad", ["fail:x"]))
        outcomes = await asyncio.gather(busy, ahead, low, critical, bad)
        assert [type(o).__name__ for o in outcomes] == ["ItemOk", "ItemOk", "ItemOk", "ItemOk", "ItemError"]
        assert finished.index("critical") < finished.index("low")
        many = await asyncio.gather(*(run(f"m{i}", [f"t{i}"]) for i in range(8)))
        assert all(isinstance(o, ItemOk) for o in many)
    finally:
        await runner.close(grace=5)
    assert not runner.alive
