"""The task specs: one per task type, each adapter importable where it runs (a worker), and the
specs themselves light enough for the server (no torch) and every worker (no pydantic)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from modelmora.config import LimitsSettings
from modelmora.contracts.channel import Infer, ItemOk, Loaded, LoadSpec
from modelmora.contracts.tasks import TaskType
from modelmora.lifecycle.worker import WorkerCore
from modelmora.tasks.base import HEALTH_CHECK_ID
from modelmora.tasks.specs import ALL_SPECS, SPECS, TaskSpec, spec_for
from tests.conftest import make_fake_model

SRC = Path(__file__).resolve().parents[2] / "src"


def _python(code: str) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_task_type_has_exactly_one_spec() -> None:
    counts = Counter(spec.task for spec in ALL_SPECS)
    assert set(counts) == set(TaskType)
    assert set(counts.values()) == {1}
    assert all(spec_for(task).task is task for task in TaskType)
    assert set(SPECS) == set(TaskType)


def test_every_adapter_imports_and_builds_in_a_fresh_worker_interpreter() -> None:
    """What a worker does with a spec's adapter path, for every path of every spec, in a new
    interpreter (the real adapters import torch, transformers or diffusers)."""
    out = _python(
        "import json\n"
        "from modelmora.tasks.specs import ALL_SPECS\n"
        "built = {}\n"
        "for spec in ALL_SPECS:\n"
        "    for name, ref in spec.adapters.items():\n"
        "        adapter = ref.build()\n"
        "        methods = ('load', 'preprocess', 'forward', 'postprocess', 'info')\n"
        "        built[f'{spec.task.value}/{name}'] = all(callable(getattr(adapter, m)) for m in methods)\n"
        "print(json.dumps(built))\n"
    )
    built = json.loads(out)
    expected = {f"{spec.task.value}/{name}" for spec in ALL_SPECS for name in spec.adapters}
    assert set(built) == expected and all(built.values())
    assert {f"{task.value}/None" for task in TaskType} <= set(built)  # every task has a real adapter


def test_the_server_side_imports_no_torch_and_the_worker_side_no_pydantic() -> None:
    out = _python(
        "import sys, json\n"
        "import modelmora.lifecycle.worker\n"
        "worker = {m: m in sys.modules for m in ('torch', 'pydantic')}\n"
        "import modelmora.services.inference, modelmora.lifecycle.manager\n"
        "print(json.dumps({'worker': worker, 'server_torch': 'torch' in sys.modules}))\n"
    )
    seen = json.loads(out)
    assert seen == {"worker": {"torch": False, "pydantic": False}, "server_torch": False}


@pytest.mark.parametrize("spec", [s for s in ALL_SPECS if s.warmup is not None], ids=lambda s: s.task.value)
def test_a_warmup_request_passes_its_own_parser(spec: TaskSpec) -> None:
    assert spec.warmup is not None
    input_data, params = spec.warmup
    assert spec.parse_request(dict(input_data), dict(params), LimitsSettings()).inputs


@pytest.mark.parametrize("task", [TaskType.TXT2EMBED, TaskType.TXT2TXT], ids=str)
def test_the_health_check_runs_the_specs_sample_through_the_fake_adapter(
    tmp_path: Path, task: TaskType
) -> None:
    folder = make_fake_model(tmp_path / task.value, task_type=task.value)
    core = WorkerCore()
    assert isinstance(core.load(LoadSpec(str(folder), task, adapter="fake", health_check=False)), Loaded)
    sample = spec_for(task).health_item()
    assert sample.request_id == HEALTH_CHECK_ID
    (outcome,) = core.infer(Infer(1, [sample])).outcomes
    assert isinstance(outcome, ItemOk)


def test_streaming_and_image_inputs_are_what_the_specs_say() -> None:
    streams = {spec.task for spec in ALL_SPECS if spec.stream is not None}
    assert streams == {TaskType.TXT2TXT, TaskType.TXT2IMG, TaskType.IMG2TXT}
    images = {spec.task for spec in ALL_SPECS if spec.image_inputs}
    assert images == {TaskType.IMG2EMBED, TaskType.IMG2TXT}
    assert all(spec.image_inputs == ("image" in spec.input_fields) for spec in ALL_SPECS)
