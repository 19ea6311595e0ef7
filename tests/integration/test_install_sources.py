"""Installs under an install policy, for real: a local HTTP server (127.0.0.1) stands in for
an internal service and for a model host, real folders and symlinks, a real SQLite registry.
Each refusal is checked to happen before a byte is fetched and to leave nothing behind."""

from __future__ import annotations

import io
import json
import threading
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpcore
import pytest

from modelmora.config import Settings
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.registry import sources
from modelmora.registry.installer import InstallRequest, install, lock_entries
from modelmora.registry.lockfile import write_lock
from modelmora.registry.policy import InstallPolicy, Resolver, system_resolver
from modelmora.registry.sources.guard import GuardedBackend
from modelmora.registry.store import RegistryStore
from modelmora.services.registry import RegistryService
from tests.conftest import make_fake_model


def model_zip() -> bytes:
    """A model a real adapter would serve (no `adapter` in its manifest)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("modelmora.json", json.dumps({"task_type": "txt2embed"}))
        zf.writestr("weights.bin", b"\0" * 64)
    return buffer.getvalue()


class Site:
    """`/model.zip`, `/secret` (what an internal service would answer) and
    `/redirect?to=URL`; counts every path asked and records the Host headers."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.hosts: list[str] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                site.hits[parts.path] += 1
                site.hosts.append(self.headers.get("host", ""))
                if parts.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", parse_qs(parts.query)["to"][0])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = model_zip() if parts.path == "/model.zip" else b"internal secret"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def site() -> Iterator[Site]:
    site = Site()
    yield site
    site.close()


def resolving(names: dict[str, str]) -> Resolver:
    """The system's resolver, except for made-up names (public-looking model hosts)."""

    def resolve(host: str, port: int) -> list[str]:
        return [names[host]] if host in names else system_resolver(host, port)

    return resolve


def fetch_with(policy: InstallPolicy, source: str, staging: Path) -> sources.FetchResult:
    return sources.fetch(None, source, staging_dir=staging, cache_dir=staging / "cache", policy=policy)


def assert_refused(policy: InstallPolicy, source: str, staging: Path, setting: str) -> None:
    with pytest.raises(ModelMoraError) as info:
        fetch_with(policy, source, staging)
    assert info.value.code is ErrorCode.FORBIDDEN, info.value
    assert info.value.details["setting"] == setting
    assert not staging.exists() or not any(staging.iterdir())  # nothing left behind


HTTP = frozenset({"http", "https", "hub", "file"})


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/secret",
        "http://localhost:{port}/secret",  # a name that resolves to loopback
        "http://2130706433:{port}/secret",  # 127.0.0.1 spelt as one number
        "http://[::1]:{port}/secret",
        "http://[::ffff:127.0.0.1]:{port}/secret",
        "http://169.254.169.254/latest/meta-data/",  # the cloud metadata service
        "http://0.0.0.0:{port}/secret",
    ],
)
def test_urls_to_the_inside_are_refused(site: Site, tmp_path: Path, url: str) -> None:
    policy = InstallPolicy(schemes=HTTP)
    assert_refused(
        policy, url.format(port=site.port), tmp_path / "staging", "registry.allowed_sources.private_hosts"
    )
    assert site.hits["/secret"] == 0


def test_plain_http_is_off_by_default(site: Site, tmp_path: Path) -> None:
    assert_refused(
        InstallPolicy(private_hosts=("127.0.0.1",)),
        f"http://127.0.0.1:{site.port}/model.zip",
        tmp_path / "staging",
        "registry.allowed_sources.schemes",
    )
    assert not site.hits


def test_an_allowed_host_installs_and_keeps_its_name(site: Site, tmp_path: Path) -> None:
    """The guard connects to the address it checked but asks for the URL's host."""
    policy = InstallPolicy(
        schemes=HTTP,
        private_hosts=("models.example.test",),
        resolver=resolving({"models.example.test": "127.0.0.1"}),
    )
    result = fetch_with(policy, f"http://models.example.test:{site.port}/model.zip", tmp_path / "staging")
    assert set(result.files) == {"modelmora.json", "weights.bin"}
    assert site.hosts == [f"models.example.test:{site.port}"]


@pytest.mark.parametrize(
    ("target", "setting"),
    [
        ("http://127.0.0.1:{port}/secret", "registry.allowed_sources.private_hosts"),
        ("http://localhost:{port}/secret", "registry.allowed_sources.private_hosts"),
        ("http://[::1]:{port}/secret", "registry.allowed_sources.private_hosts"),
    ],
)
def test_a_redirect_to_the_inside_is_refused(site: Site, tmp_path: Path, target: str, setting: str) -> None:
    """The first hop is allowed (a model host the operator named); the hop it redirects to is
    checked like the first and refused."""
    policy = InstallPolicy(
        schemes=HTTP,
        private_hosts=("models.example.test",),
        resolver=resolving({"models.example.test": "127.0.0.1"}),
    )
    to = target.format(port=site.port)
    assert_refused(
        policy, f"http://models.example.test:{site.port}/redirect?to={to}", tmp_path / "staging", setting
    )
    assert site.hits["/redirect"] == 1 and site.hits["/secret"] == 0


def test_a_redirect_leaves_the_allowed_hosts(site: Site, tmp_path: Path) -> None:
    policy = InstallPolicy(
        schemes=HTTP,
        hosts=("models.example.test",),
        private_hosts=("models.example.test", "elsewhere.test"),
        resolver=resolving({"models.example.test": "127.0.0.1", "elsewhere.test": "127.0.0.1"}),
    )
    to = f"http://elsewhere.test:{site.port}/model.zip"
    assert_refused(
        policy,
        f"http://models.example.test:{site.port}/redirect?to={to}",
        tmp_path / "staging",
        "registry.allowed_sources.hosts",
    )
    assert site.hits["/model.zip"] == 0


class RecordingBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self.connected: list[str] = []

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        self.connected.append(host)
        raise httpcore.ConnectError("recorded")


def test_dns_rebinding_cannot_switch_the_address() -> None:
    """A name that answers a public address first and loopback afterwards: the guard looks
    it up once and connects to the address it checked, never to a second answer."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])
    lookups: list[str] = []

    def rebinding(host: str, port: int) -> list[str]:
        lookups.append(host)
        return next(answers)

    inner = RecordingBackend()
    backend = GuardedBackend(InstallPolicy(schemes=HTTP, resolver=rebinding), inner)
    with pytest.raises(httpcore.ConnectError):
        backend.connect_tcp("rebind.test", 80)
    assert (lookups, inner.connected) == (["rebind.test"], ["93.184.216.34"])
    with pytest.raises(ModelMoraError) as info:  # the second lookup is checked in turn
        backend.connect_tcp("rebind.test", 80)
    assert info.value.code is ErrorCode.FORBIDDEN and inner.connected == ["93.184.216.34"]


def test_local_sources_stay_under_the_roots(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    model = make_fake_model(root / "model")
    (outside / "secret").parent.mkdir(parents=True)
    (outside / "secret").write_text("do not copy")
    policy = InstallPolicy(local_roots=(root.resolve(),), allow_fake_adapter=True)
    staging = tmp_path / "staging"
    assert set(fetch_with(policy, str(model), staging).files) == {"modelmora.json"}
    sneaky = make_fake_model(root / "sneaky")
    (sneaky / "weights.bin").symlink_to(outside / "secret")  # a link out, inside a folder
    before = set(staging.iterdir())
    with pytest.raises(ModelMoraError) as info:
        fetch_with(policy, str(sneaky), staging)
    assert info.value.code is ErrorCode.FORBIDDEN
    assert set(staging.iterdir()) == before
    for source in ("/proc/self/environ", str(outside / "secret"), "~/.ssh"):
        assert_refused(policy, source, tmp_path / "empty-staging", "registry.allowed_sources.local_roots")


# -- through the catalog service, as the API doors call it --------------------------------------


@pytest.fixture
def strict(settings: Settings, tmp_path: Path) -> Iterator[tuple[RegistryService, RegistryStore]]:
    """The API's service on a server with default testing settings and one local root."""
    (tmp_path / "root").mkdir()
    store = RegistryStore(settings.database_url)
    store.create_schema()
    policy = InstallPolicy(local_roots=((tmp_path / "root").resolve(),))
    yield RegistryService(settings, store, policy=policy), store
    store.close()


def nothing_installed(settings: Settings, store: RegistryStore) -> None:
    assert store.list(None, 1, 10)[1] == 0
    models = settings.models_dir
    assert not models.exists() or {p.name for p in models.iterdir()} <= {".staging"}
    assert not (models / ".staging").exists() or not any((models / ".staging").iterdir())


async def expect_forbidden(call: Any, setting: str) -> None:
    with pytest.raises(ModelMoraError) as info:
        await call
    assert info.value.code is ErrorCode.FORBIDDEN, info.value
    assert info.value.details["setting"] == setting


async def test_the_service_refuses_test_adapters_and_options(
    settings: Settings, strict: tuple[RegistryService, RegistryStore], tmp_path: Path
) -> None:
    registry, store = strict
    root = tmp_path / "root"
    plain = root / "plain"
    plain.mkdir()
    (plain / "modelmora.json").write_text(json.dumps({"task_type": "txt2embed"}))
    # A folder whose own manifest names the fake adapter: fetched, then refused, then removed.
    await expect_forbidden(
        registry.install(InstallRequest(source=str(make_fake_model(root / "fake")))),
        "testing.allow_fake_adapter",
    )
    for config in ({"adapter": "fake"}, {"options": {"fail_health_if_exists": "/etc/shadow"}}):
        await expect_forbidden(
            registry.install(InstallRequest(source=str(plain), config=config)), "testing.allow_fake_adapter"
        )
    await expect_forbidden(
        registry.install(InstallRequest(source="/proc/self/environ")), "registry.allowed_sources.local_roots"
    )
    nothing_installed(settings, store)

    victim = await registry.install(
        InstallRequest(source=str(plain), name="victim", config={"options": {"threads": 1}})
    )
    assert victim["config"] == {"options": {"threads": 1}}
    await expect_forbidden(registry.update("victim", {"adapter": "fake"}), "testing.allow_fake_adapter")
    await expect_forbidden(
        registry.update("victim", {"options": {"fail_health_if_exists": "/root/.bashrc"}}),
        "testing.allow_fake_adapter",
    )
    assert store.get("victim").config == {"options": {"threads": 1}}


async def test_a_lock_applied_through_the_api_obeys_the_roots(
    settings: Settings, strict: tuple[RegistryService, RegistryStore], tmp_path: Path
) -> None:
    registry, store = strict
    outside = tmp_path / "outside" / "plain"
    outside.mkdir(parents=True)
    (outside / "modelmora.json").write_text(json.dumps({"task_type": "txt2embed"}))
    elsewhere = settings.model_copy(
        update={"server": settings.server.model_copy(update={"data_dir": tmp_path / "elsewhere"})}
    )
    other = RegistryStore(elsewhere.database_url)
    other.create_schema()
    try:
        record = install(elsewhere, other, InstallRequest(source=str(outside)))  # the trusted CLI
        write_lock(tmp_path / "modelmora.lock", lock_entries([record]), datetime.now(UTC))
    finally:
        other.close()
    await expect_forbidden(
        registry.apply_lock(tmp_path / "modelmora.lock"), "registry.allowed_sources.local_roots"
    )
    nothing_installed(settings, store)


async def test_the_testing_flag_and_roots_allow_the_suites(settings: Settings, tmp_path: Path) -> None:
    """With `testing.allow_fake_adapter` and a root (the suites' settings), fake models install
    and switch adapters through the API as before."""
    store = RegistryStore(settings.database_url)
    store.create_schema()
    try:
        registry = RegistryService(settings, store, policy=InstallPolicy.from_settings(settings))
        assert registry.policy is not None and registry.policy.allow_fake_adapter
        folder = make_fake_model(tmp_path / "fake", fail_health_if_exists=str(tmp_path / "marker"))
        record = await registry.install(InstallRequest(source=str(folder)))
        assert record["config"]["adapter"] == "fake"
        updated = await registry.update(record["name"], {"adapter": None, "options": {"dim": 4}})
        assert updated["config"]["options"] == {"dim": 4}
    finally:
        store.close()
