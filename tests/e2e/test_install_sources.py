"""Issue 14's install attacks replayed against `modelmora serve` over REST and gRPC, with the
testing flag off (as in production) and one local root: every one is refused with FORBIDDEN
before anything is fetched or written; the legitimate installs still work.

The server allows plain http for this test and names 127.0.0.2 as a model host it may reach
on loopback (`private_hosts`): a small site there serves a model and redirects on demand."""

from __future__ import annotations

import io
import json
import threading
import zipfile
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest

from modelmora.v1 import modelmora_pb2 as pb
from modelmora.v1 import modelmora_pb2_grpc as pb_grpc
from modelmora.v1.convert import dict_to_struct
from tests.conftest import make_fake_model
from tests.e2e.conftest import CLI, Server, clean_env, cli, start_server

SITE_HOST = "127.0.0.2"  # loopback too, but not the server's address: a "model host"


def plain_model(folder: Path) -> Path:
    """A model folder a real adapter would serve: no fake adapter, no test options."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "modelmora.json").write_text(json.dumps({"task_type": "txt2embed"}), encoding="utf-8")
    return folder


class Site:
    """`/model.zip` (a plain model) and `/redirect?to=URL`, counting every path asked."""

    def __init__(self) -> None:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as zf:
            zf.writestr("modelmora.json", json.dumps({"task_type": "txt2embed"}))
        archive = buffer.getvalue()
        self.hits: Counter[str] = Counter()
        hits = self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                hits[parts.path] += 1
                if parts.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", parse_qs(parts.query)["to"][0])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(archive)))
                self.end_headers()
                self.wfile.write(archive)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((SITE_HOST, 0), Handler)
        self.url = f"http://{SITE_HOST}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    site = Site()
    yield site
    site.close()


@pytest.fixture(scope="module")
def root(module_tmp: Path) -> Path:
    return module_tmp / "root"


@pytest.fixture(scope="module")
def server(module_tmp: Path, root: Path) -> Iterator[Server]:
    data = module_tmp / "data"
    root.mkdir()
    policy = {
        "MODELMORA_TESTING__ALLOW_FAKE_ADAPTER": "",  # off, as in production
        "MODELMORA_REGISTRY__ALLOWED_SOURCES__LOCAL_ROOTS": json.dumps([str(root)]),
        "MODELMORA_REGISTRY__ALLOWED_SOURCES__SCHEMES": json.dumps(["hub", "https", "http", "file"]),
        "MODELMORA_REGISTRY__ALLOWED_SOURCES__PRIVATE_HOSTS": json.dumps([SITE_HOST]),
    }
    # The operator's CLI is trusted: it installs the victim from outside the root.
    cli(clean_env(data, **policy), "install", str(plain_model(module_tmp / "outside" / "victim")))
    srv = start_server(data, module_tmp / "server.log", CLI, **policy)
    yield srv
    srv.stop()


def data_files(server: Server) -> set[str]:
    models = Path(server.env["MODELMORA_SERVER__DATA_DIR"]) / "models"
    return {str(p.relative_to(models)) for p in models.rglob("*")}


def refused(server: Server, method: str, path: str, body: dict[str, Any], setting: str) -> None:
    before = data_files(server)
    response = server.client.request(method, path, json=body)
    assert response.status_code == 403, response.text
    error = response.json()
    assert (error["error_code"], error["details"]["setting"]) == ("FORBIDDEN", setting), error
    assert data_files(server) == before  # nothing fetched into the data dir


LOCAL_ROOTS = "registry.allowed_sources.local_roots"
PRIVATE = "registry.allowed_sources.private_hosts"
TESTING = "testing.allow_fake_adapter"


def test_server_files_cannot_be_installed(server: Server, module_tmp: Path) -> None:
    for source in ("/proc/self/environ", "/etc/hostname", str(module_tmp / "outside" / "victim")):
        refused(server, "POST", "/api/v1/models", {"source": source, "name": "loot"}, LOCAL_ROOTS)
    refused(server, "POST", "/api/v1/models", {"source": "file:///proc/self/environ"}, LOCAL_ROOTS)


def test_internal_urls_cannot_be_fetched(server: Server, site: Site) -> None:
    port = urlsplit(server.url).port
    for url in (
        f"http://127.0.0.1:{port}/api/v1/status",
        f"http://localhost:{port}/api/v1/status",
        f"http://[::1]:{port}/api/v1/status",
        "http://169.254.169.254/latest/meta-data/",
    ):
        refused(server, "POST", "/api/v1/models", {"source": url, "name": "ssrf"}, PRIVATE)
    # An allowed model host that redirects inside: the second hop is checked like the first.
    to = f"http://127.0.0.1:{port}/api/v1/status"
    refused(server, "POST", "/api/v1/models", {"source": f"{site.url}/redirect?to={to}"}, PRIVATE)
    assert site.hits["/redirect"] == 1


def test_test_adapters_and_file_options_are_refused(server: Server, root: Path) -> None:
    folder = plain_model(root / "plain")
    refused(server, "PUT", "/api/v1/models/victim", {"config": {"adapter": "fake"}}, TESTING)
    probe = {"options": {"fail_health_if_exists": "/root/.ssh/id_rsa"}}
    refused(server, "PUT", "/api/v1/models/victim", {"config": probe}, TESTING)
    refused(server, "POST", "/api/v1/models", {"source": str(folder), "config": probe}, TESTING)
    refused(server, "POST", "/api/v1/models", {"source": str(folder), "config": {"adapter": "fake"}}, TESTING)
    # The fake adapter named by the folder's own manifest, under the root.
    fake = make_fake_model(root / "fake")
    refused(server, "POST", "/api/v1/models", {"source": str(fake)}, TESTING)
    victim = server.client.get("/api/v1/models/victim").json()
    assert victim["config"] == {}


def test_allowed_sources_still_install(server: Server, root: Path, site: Site) -> None:
    local = server.client.post(
        "/api/v1/models", json={"source": str(plain_model(root / "good")), "name": "good"}
    )
    assert local.status_code == 201, local.text
    remote = server.client.post("/api/v1/models", json={"source": f"{site.url}/model.zip", "name": "remote"})
    assert remote.status_code == 201, remote.text
    assert remote.json()["versions"][0]["origin"] == f"{site.url}/model.zip"
    threads = server.client.put("/api/v1/models/good", json={"config": {"options": {"threads": 2}}})
    assert threads.status_code == 200 and threads.json()["config"]["options"] == {"threads": 2}


def test_the_grpc_door_refuses_the_same(server: Server, module_tmp: Path) -> None:
    port = urlsplit(server.url).port

    def denied(call: Any, setting: str) -> None:
        with pytest.raises(grpc.RpcError) as info:
            call()
        error: Any = info.value
        trailers = dict(error.trailing_metadata() or ())
        assert (error.code(), trailers.get("error_code")) == (grpc.StatusCode.PERMISSION_DENIED, "FORBIDDEN")
        assert json.loads(trailers["error-details-bin"])["setting"] == setting

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        registry = pb_grpc.RegistryServiceStub(channel)
        before = data_files(server)
        for source, setting in (
            ("/proc/self/environ", LOCAL_ROOTS),
            (str(module_tmp / "outside" / "victim"), LOCAL_ROOTS),
            (f"http://127.0.0.1:{port}/api/v1/status", PRIVATE),
            (f"http://localhost:{port}/api/v1/status", PRIVATE),
        ):
            denied(
                lambda s=source: registry.RegisterModel(pb.RegisterModelRequest(source=s, name="loot")),
                setting,
            )
        for config in ({"adapter": "fake"}, {"options": {"fail_health_if_exists": "/etc/shadow"}}):
            denied(
                lambda c=config: registry.UpdateModel(
                    pb.UpdateModelRequest(name="victim", config=dict_to_struct(c))
                ),
                TESTING,
            )
        assert data_files(server) == before


def test_the_cli_obeys_the_rules_when_asked(server: Server, module_tmp: Path) -> None:
    env = server.env | {"MODELMORA_REGISTRY__ALLOWED_SOURCES__ENFORCE_ON_CLI": "true"}
    proc = cli(env, "install", "/proc/self/environ", "--name", "loot", check=False)
    assert proc.returncode == 1 and "FORBIDDEN" in proc.stderr, proc.stderr
    assert "loot" not in data_files(server)
