"""The step loop of continuous batching on the tiny GPT-2, driven step by step (no server):
tasks/continuous.py `Stepper` and the worker's loop around it (lifecycle/stepping.py).

Greedy rows that join and leave at different steps get exactly the tokens `generate` gives
each prompt alone; a cancelled row leaves before the next forward and frees its slot; a seed
draws the same tokens beside any neighbours and in the static path; the worker's loop answers
each request on its own, reports its room in credits and holds what does not fit.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("torch")

import torch

from modelmora.contracts.channel import BatchDone, Credit, Event, Infer, ItemError, ItemOk, Stepping, WorkItem
from modelmora.lifecycle import stepping
from modelmora.tasks.base import Emitter
from modelmora.tasks.continuous import Finished, Stepper
from modelmora.tasks.txt2txt import TextGenerator

PROMPTS = ["The quick brown fox", "ModelMora serves many", "Hello world, this is", "A tiny model writes"]


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory) -> TextGenerator:
    from tests.tiny_models import make_tiny_gpt2

    folder = make_tiny_gpt2(tmp_path_factory.mktemp("stepper") / "tiny-gpt2")
    gen = TextGenerator()
    gen.load(folder, "cpu", "float32", {})
    return gen


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.cancelled: set[str] = set()
        self.emit = Emitter(lambda *e: self.events.append(e), self.cancelled)


def alone(gen: TextGenerator, prompt: str, max_tokens: int) -> list[int]:
    """`generate` on one prompt, greedy: the reference."""
    encoded = gen.tokenizer([prompt], return_tensors="pt")
    with torch.inference_mode():
        out = gen.model.generate(
            **encoded, max_new_tokens=max_tokens, do_sample=False, pad_token_id=gen.tokenizer.pad_token_id
        )
    new: list[int] = out[0, encoded["input_ids"].shape[1] :].tolist()
    return [t for t in new if t not in gen.eos_ids][:max_tokens]


def item(rid: str, prompt: str, **params: Any) -> WorkItem:
    return WorkItem(rid, [prompt], {"temperature": 0.0, **params})


def tokens_of(done: Finished, gen: TextGenerator) -> list[int]:
    assert isinstance(done.outcome, ItemOk)
    ids: list[int] = gen.tokenizer(done.outcome.value[0]["text"], add_special_tokens=False)["input_ids"]
    return ids


def test_greedy_rows_joining_and_leaving_mid_batch_equal_generate_alone(generator: TextGenerator) -> None:
    sink = Sink()
    stepper = generator.stepper(4)
    lengths = [20, 6, 14, 9]
    expected = {f"r{i}": alone(generator, p, lengths[i]) for i, p in enumerate(PROMPTS)}
    finished: dict[str, Finished] = {}
    sizes_seen: set[int] = set()
    for i, prompt in enumerate(PROMPTS):  # one joins every third step
        joining = stepper.prepare(item(f"r{i}", prompt, max_tokens=lengths[i]))
        for done in stepper.join([joining], sink.emit):
            finished[done.item.request_id] = done
        for _ in range(3):
            sizes_seen.add(stepper.active)
            for done in stepper.step(sink.emit):
                finished[done.item.request_id] = done
    while stepper.active:
        for done in stepper.step(sink.emit):
            finished[done.item.request_id] = done
    assert sizes_seen >= {1, 2, 3}  # the batch grew and shrank while it ran
    assert stepper.free_slots == 4 and stepper.free_tokens == stepper.tokens and stepper.cache is None
    for rid, done in finished.items():
        assert isinstance(done.outcome, ItemOk)
        value = done.outcome.value[0]
        assert value["completion_tokens"] == len(expected[rid])
        assert value["text"] == generator.tokenizer.decode(expected[rid], skip_special_tokens=True)


def test_a_cancelled_row_leaves_before_the_next_step_and_frees_its_slot(generator: TextGenerator) -> None:
    sink = Sink()
    stepper = generator.stepper(2)
    joins = [
        stepper.prepare(item("gone", PROMPTS[0], max_tokens=50)),
        stepper.prepare(item("stays", PROMPTS[1], max_tokens=12)),
    ]
    assert stepper.join(joins, sink.emit) == []
    stepper.step(sink.emit)
    assert stepper.free_slots == 0
    sink.cancelled.add("gone")
    (done,) = stepper.drop_cancelled(sink.emit)
    assert done.item.request_id == "gone" and isinstance(done.outcome, ItemError)
    assert done.outcome.code == "CANCELLED"
    assert stepper.free_slots == 1 and stepper.active == 1
    # The slot takes a newcomer while "stays" goes on, undisturbed.
    stepper.join([stepper.prepare(item("new", PROMPTS[2], max_tokens=5))], sink.emit)
    finished: dict[str, Finished] = {}
    while stepper.active:
        finished.update({d.item.request_id: d for d in stepper.step(sink.emit)})
    expected = alone(generator, PROMPTS[1], 12)
    stays = finished["stays"].outcome
    assert isinstance(stays, ItemOk)
    assert stays.value[0]["text"] == generator.tokenizer.decode(expected, skip_special_tokens=True)


def _run(stepper: Stepper, items: list[WorkItem], sink: Sink) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for done in stepper.join([stepper.prepare(i) for i in items], sink.emit):
        out[done.item.request_id] = done.outcome
    while stepper.active:
        out.update({d.item.request_id: d.outcome for d in stepper.step(sink.emit)})
    return {rid: o.value[0]["text"] for rid, o in out.items()}


def test_a_seed_draws_the_same_tokens_beside_any_neighbours_and_in_the_static_path(
    generator: TextGenerator,
) -> None:
    seeded = item("s", PROMPTS[0], max_tokens=16, temperature=0.9, top_k=40, top_p=0.9, seed=11)
    first = _run(generator.stepper(4), [seeded], Sink())["s"]
    crowd = [
        item(f"c{i}", p, max_tokens=10, temperature=1.0, repetition_penalty=1.3)
        for i, p in enumerate(PROMPTS[1:])
    ]
    assert _run(generator.stepper(4), [*crowd, seeded], Sink())["s"] == first
    sink = Sink()
    static = generator.postprocess(generator.forward(generator.preprocess([seeded]), sink.emit), [seeded])
    assert isinstance(static[0], ItemOk) and static[0].value[0]["text"] == first


def test_streamed_pieces_arrive_in_order_and_add_up_to_the_text(generator: TextGenerator) -> None:
    sink = Sink()
    streamed = item("s", PROMPTS[3], max_tokens=12, stream=True)
    texts = _run(generator.stepper(4), [item("other", PROMPTS[0], max_tokens=6), streamed], sink)
    mine = [d for rid, kind, d in sink.events if rid == "s" and kind == "token"]
    assert [d["index"] for d in mine] == list(range(len(mine)))
    assert "".join(d["text"] for d in mine) == texts["s"]
    assert all(rid == "s" for rid, _, _ in sink.events)  # only streaming rows send events


class FakeCore:
    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter
        self.cancelled: set[str] = set()
        self.batches = 0
        self.items = 0


def test_the_worker_loop_answers_each_request_reports_credits_and_holds_what_does_not_fit(
    generator: TextGenerator,
) -> None:
    core = FakeCore(generator)
    sent: list[object] = []
    stepper = stepping.open_stepper(core, Stepping(1), sent.append)
    assert stepper is not None and sent == [Credit(1, stepper.free_tokens, 0)]
    inbox: queue.Queue[object] = queue.Queue()
    # Two requests where one slot is free (the server sent the second before it knew): the
    # second waits in the worker and joins when the first leaves.
    loop = stepping.Loop(core, stepper, sent.append)
    loop.accept(Infer(1, [item("a", PROMPTS[0], max_tokens=5)]))
    loop.tick()  # "a" runs
    inbox.put(Infer(2, [item("b", PROMPTS[1], max_tokens=3)]))
    inbox.put(Infer(3, [item("c", PROMPTS[2], max_tokens=3)], priority=1))
    get: Callable[[bool], object] = inbox.get

    def done_ids() -> list[int]:
        return [m.batch_id for m in sent if isinstance(m, BatchDone)]

    while len(done_ids()) < 3:  # what `Loop.run` does, without blocking when idle
        for message in stepping._drain(get, block=False):
            assert isinstance(message, Infer)
            loop.accept(message)
        loop.tick()
    # One at a time, the critical one first among those that waited.
    assert done_ids() == [1, 3, 2]
    credits = [m for m in sent if isinstance(m, Credit)]
    assert all(c.free_slots == 0 for c in credits[1:-1])
    assert credits[-1] == Credit(1, stepper.free_tokens, 3) and stepper.free_tokens == stepper.tokens
    assert core.batches == 3 and core.items == 3
    assert not any(isinstance(m, Event) for m in sent)
    done = [m for m in sent if isinstance(m, BatchDone)]
    assert all(d.stats["batch_size"] == 1.0 for d in done)
