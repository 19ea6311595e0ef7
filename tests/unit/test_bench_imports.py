"""Every script under bench/ still imports: they import project modules that move, and the
GPU ones run only on a lent GPU, so a broken import would otherwise surface there, late.

Imported (not run: each keeps its work behind `if __name__ == "__main__"`) in one child
process with no GPU visible, as on a machine without one, and apart from this process's
modules and path (bench/grpc.py edits sys.path when imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py"))

_IMPORT_ALL = """
import importlib.util, json, sys, traceback
from pathlib import Path
results = {}
for path in map(Path, sys.argv[1:]):
    try:
        spec = importlib.util.spec_from_file_location(f"bench_smoke_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        results[path.name] = None if callable(getattr(module, "main", None)) else "no main()"
    except BaseException:
        results[path.name] = traceback.format_exc()
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def imported() -> dict[str, str | None]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL, *(str(BENCH / name) for name in SCRIPTS)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=BENCH.parent,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    results: dict[str, str | None] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


def test_every_bench_script_is_covered() -> None:
    assert len(SCRIPTS) >= 9 and "gpu_check.py" in SCRIPTS and "grpc.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_imports_without_a_gpu(imported: dict[str, str | None], script: str) -> None:
    assert imported[script] is None, imported[script]
