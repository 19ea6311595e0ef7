"""Per-row stop strings and streaming hold-back of tasks/generation.py (torch, no model)."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch")

from modelmora.contracts.channel import WorkItem
from modelmora.tasks.base import Emitter
from modelmora.tasks.generation import RowStopper, _first_stop, _stop_prefix, make_rows


@pytest.mark.parametrize(
    ("text", "stops", "cut", "held"),
    [
        ("hello world", [], None, 0),
        ("hello world", ["wor"], 6, 0),
        ("hello wo", ["world"], None, 2),  # "wo" may become "world": held back
        ("abc", ["x", "bc", "c"], 1, 0),
        ("ab", ["bcd", "b"], 1, 1),
    ],
)
def test_stop_strings(text: str, stops: list[str], cut: int | None, held: int) -> None:
    assert _first_stop(text, stops) == cut
    if cut is None:
        assert _stop_prefix(text, stops) == held


class FakeTokenizer:
    """Token i decodes to the character chr(ord('a') + i)."""

    def decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + t) for t in tokens)


def test_rows_stop_on_their_own_and_stream_only_settled_text() -> None:
    import torch

    events: list[tuple[str, str, dict[str, Any]]] = []
    cancelled: set[str] = set()
    items = [
        WorkItem("a", ["p"], {"max_tokens": 3, "temperature": 0.0, "stream": True}),
        WorkItem("b", ["p"], {"max_tokens": 10, "temperature": 0.0, "stop": ["cd"], "stream": True}),
        WorkItem("c", ["p"], {"max_tokens": 10, "temperature": 0.0}),
    ]
    rows = make_rows(items, [1, 1, 1], "cpu")
    stopper = RowStopper(rows, FakeTokenizer(), {25}, Emitter(lambda *e: events.append(e), cancelled))
    done = []
    for step, token in enumerate([0, 1, 2, 3]):
        if step == 2:
            cancelled.add("c")
        ids = torch.tensor([[9, token]] * 3)
        done.append(stopper(ids, None).tolist())  # type: ignore[arg-type]
    assert done[-1] == [True, True, True]
    assert [r.finish for r in rows] == ["length", "stop", "cancelled"]
    assert rows[1].text == "ab"  # cut before the stop string
    streamed_b = "".join(d["text"] for rid, _, d in events if rid == "b")
    assert streamed_b == "ab"  # "c" was held back (it begins "cd"), then dropped
    assert [d["index"] for rid, _, d in events if rid == "a"] == [0, 1, 2]
