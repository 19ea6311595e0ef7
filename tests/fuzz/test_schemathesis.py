"""Schemathesis against the OpenAPI document of a real `modelmora serve` (issue 14, "Checks").

A separate step of `.ci/run` (`pytest -m fuzz tests/fuzz`): the README's `pytest` deselects
it (`-m "not fuzz"` in pyproject), as it takes minutes.

The server is started as the e2e tests start one, with what a production server has: the
fake adapter and file-touching options refused (`testing` unset), no local roots, and sources
allowed on loopback only (`hub` with `registry.hub_endpoint` at the tests' Hub stand-in, and
`http` to 127.0.0.1), so that whatever the fuzzer installs, the server contacts no other host.
Two fake models are installed beforehand by the CLI (trusted), so inference reaches a worker.

`st run` drives the fuzzing (examples, coverage, fuzzing and stateful phases; links inferred
from the schema and `Location` headers), bounded by `--max-examples` per operation and a
wall-clock budget. Pass or fail is decided by two checks (tests/fuzz/st_hooks.py): no 5xx but
the documented 502/503/504 with their codes, and every error in the one JSON shape. On a
failure the test shows schemathesis's report: each failing case with a curl line to replay it.

Variants: `open` (auth off, as on a loopback bind) and `keyed` (`auth.enabled: true` with a
bootstrap key: every guarded operation refuses a call without a key with 401, and the fuzzing
runs with the admin key).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from modelmora.auth.policy import rest_scope
from tests.conftest import make_fake_model
from tests.e2e.conftest import Server, clean_env, cli, start_server
from tests.hubstub import HubStub

pytestmark = pytest.mark.fuzz

ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAP_KEY = "fuzz-bootstrap-" + "k" * 40
MODELS = ("fuzzembed", "fuzzgen")
# Bounds: cases per operation and phase, and a wall-clock budget for each variant's run
# (`--max-time` ends the fuzzing and stateful phases when it is spent).
MAX_EXAMPLES = int(os.environ.get("MODELMORA_FUZZ_EXAMPLES", "60"))
MAX_SECONDS = int(os.environ.get("MODELMORA_FUZZ_SECONDS", "100"))
# What fails the run (tests/fuzz/st_hooks.py); exploring, add schemathesis's own, e.g. ",all".
CHECKS = os.environ.get("MODELMORA_FUZZ_CHECKS", "documented_server_errors,one_error_shape")
# What the server may reach: loopback only (docs/security.md, "Checks").
LOOPBACK_ONLY = {
    "MODELMORA_TESTING__ALLOW_FAKE_ADAPTER": "",  # unset, as in production
    "MODELMORA_REGISTRY__ALLOWED_SOURCES__LOCAL_ROOTS": "",
    "MODELMORA_REGISTRY__ALLOWED_SOURCES__SCHEMES": json.dumps(["hub", "http"]),
    "MODELMORA_REGISTRY__ALLOWED_SOURCES__HOSTS": json.dumps(["127.0.0.1"]),
    "MODELMORA_REGISTRY__ALLOWED_SOURCES__PRIVATE_HOSTS": json.dumps(["127.0.0.1"]),
}


def plain_model(folder: Path) -> Path:
    """A Hub repo for the stand-in: a manifest a real adapter would take (its load fails)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "modelmora.json").write_text(json.dumps({"task_type": "txt2embed"}), encoding="utf-8")
    return folder


@pytest.fixture(params=["open", "keyed"])
def fuzz_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Server, str | None]]:
    """(server, admin key or None)."""
    keyed = request.param == "keyed"
    data = tmp_path / "data"
    with HubStub({"fuzz/tiny": plain_model(tmp_path / "hub" / "tiny")}) as hub:
        env = clean_env(data, MODELMORA_REGISTRY__HUB_ENDPOINT=hub.endpoint)
        cli(env, "install", str(make_fake_model(tmp_path / MODELS[0])))
        cli(env, "install", str(make_fake_model(tmp_path / MODELS[1], task_type="txt2txt")))
        extra = dict(LOOPBACK_ONLY, MODELMORA_REGISTRY__HUB_ENDPOINT=hub.endpoint)
        if keyed:
            extra |= {"MODELMORA_AUTH__ENABLED": "true", "MODELMORA_AUTH__BOOTSTRAP_KEY": BOOTSTRAP_KEY}
        srv = start_server(
            data,
            tmp_path / "server.log",
            MODELMORA_LIFECYCLE__LOAD_RETRIES="0",
            **extra,
        )
        try:
            yield srv, BOOTSTRAP_KEY if keyed else None
        finally:
            srv.stop()


def _operations(schema: dict[str, object]) -> list[tuple[str, str]]:
    paths = schema["paths"]
    assert isinstance(paths, dict)
    return [(method.upper(), path) for path, ops in paths.items() for method in ops]


def _concrete(path: str) -> str:
    """A path template with each parameter filled in (`{name:path}` style included)."""
    out, rest = "", path
    while "{" in rest:
        head, _, tail = rest.partition("{")
        out += head + "x"
        rest = tail.partition("}")[2]
    return out + rest


def _refused_without_a_key(srv: Server) -> None:
    """Every operation of the document that a key guards answers 401 in the one shape
    without one (and with a made-up one); the open ones do not."""
    schema = httpx.get(srv.url + "/openapi.json", timeout=30).json()
    seen = 0
    for method, template in _operations(schema):
        path = _concrete(template)
        body = {} if method in ("POST", "PUT") else None
        for headers in ({}, {"Authorization": "Bearer mm_0123456789ab_" + "x" * 43}):
            response = srv.client.request(method, path, json=body, headers=headers)
            if rest_scope(method, path, metrics_public=True) is None:
                assert response.status_code != 401, (method, path, response.text)
                continue
            seen += 1
            assert response.status_code == 401, (method, path, response.text)
            error = response.json()
            if path.startswith("/v1/"):  # OpenAI's error shape (api/openai_errors.py)
                assert set(error["error"]) == {"message", "type", "param", "code"}, error
                assert error["error"]["code"] == "UNAUTHORIZED", error
                continue
            assert set(error) == {"error_code", "message", "details", "trace_id"}, error
            assert error["error_code"] == "UNAUTHORIZED", error
    assert seen > 10  # the document lists the guarded operations


def _schemathesis(srv: Server, key: str | None, workdir: Path) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-c",
        "from schemathesis.cli import schemathesis; schemathesis()",
        "run",
        f"{srv.url}/openapi.json",
        "--checks",
        CHECKS,
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--max-time",
        str(MAX_SECONDS),
        # One worker: schemathesis's threads trip CPython 3.11's "AST constructor recursion
        # depth mismatch" (ast.parse is not thread-safe there), and the CPUs are few anyway.
        "--workers",
        "1",
        "--request-timeout",
        "60",
        "--generation-database",
        "none",
        "--suppress-health-check",
        "all",
        "--continue-on-failure",
        "--report",
        "junit",
        "--report-dir",
        str(workdir / "report"),
        "--no-color",
    ]
    if key is not None:
        command += ["--header", f"Authorization: Bearer {key}"]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.fuzz.st_hooks",
        "MODELMORA_FUZZ_MODELS": ",".join(MODELS),
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
    }
    # The budget bounds the phases; this only guards against a hang after it.
    # In the test's folder: schemathesis keeps a cache (.schemathesis/) in its working directory.
    return subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=MAX_SECONDS + 180
    )


@pytest.mark.timeout(MAX_SECONDS + 360)
def test_schemathesis_finds_no_server_errors(fuzz_server: tuple[Server, str | None], tmp_path: Path) -> None:
    srv, key = fuzz_server
    if key is not None:
        _refused_without_a_key(srv)
    started = time.monotonic()
    run = _schemathesis(srv, key, tmp_path)
    output = run.stdout + run.stderr
    (tmp_path / "schemathesis.txt").write_text(output, encoding="utf-8")
    print(output[-4000:])
    print(f"schemathesis ran {time.monotonic() - started:.0f} s; server log: {srv.log}")
    assert run.returncode == 0, f"schemathesis found failures (report in {tmp_path}):\n{output[-20000:]}"
    assert srv.proc.poll() is None, "the server died under the fuzzer"
    assert srv.client.get("/health/live").status_code == 200
