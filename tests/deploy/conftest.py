"""What the container checks share: the docker CLI, the image under test, free ports, waiting.

The container checks (marked `container`) run when MODELMORA_IMAGE names an image that
deploy/ci/check_deploy.sh has just built: `.ci/run` sets it and then they must pass. Without it
(the README's plain `pytest`, a laptop without docker) they are not collected as failures but
skipped with that reason: an image built earlier must not be mistaken for this tree's.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

IMAGE = os.environ.get("MODELMORA_IMAGE", "")
# Debian's docker.io CLI (20.10) has BuildKit built in; a newer CLI without buildx would not build.
DOCKER = os.environ.get("MODELMORA_DOCKER", "docker")
BOOTSTRAP_KEY = "deploy-check-bootstrap-key-0123456789abcdef"
POLL_S = 0.2


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="set MODELMORA_IMAGE to an image built from this tree (deploy/ci)")
    for item in items:
        if not IMAGE and item.get_closest_marker("container"):
            item.add_marker(skip)


def docker(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        command = " ".join(args)
        raise AssertionError(f"docker {command} -> {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll until `condition` returns something truthy; fail with `what` after `timeout` s (a
    bound reached only when something is wrong: the waits here are on observable state)."""
    end = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except Exception as exc:  # not up yet: connection refused, 503, ...
            value, last = None, exc
        else:
            last = None
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"not reached within {timeout} s: {what} (last error: {last!r})")
        time.sleep(POLL_S)


def auth_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {BOOTSTRAP_KEY}"}
