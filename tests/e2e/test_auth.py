"""Authentication and TLS against real servers: keys made with the CLI, checked at both doors
(JSON, multipart, SSE, the short `/infer` paths, jobs, the registry; gRPC unary and streams),
scopes, expiry, revocation, the bootstrap key, the public-bind rule, TLS and mTLS with the SDK."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import httpx
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelmora.client import (
    NO_RETRY,
    AsyncClient,
    AsyncGrpcClient,
    AuthError,
    Client,
    GrpcClient,
    OverloadedError,
    TransportError,
)
from modelmora.v1 import modelmora_pb2 as pb
from modelmora.v1 import modelmora_pb2_grpc as pb_grpc
from modelmora.v1.convert import build_request
from tests.conftest import make_fake_model
from tests.e2e.conftest import CLI, Server, clean_env, cli, free_port, start_server

BOOTSTRAP = "bootstrap-" + "b" * 40
BOUNDARY = "authboundary"


@pytest.fixture(scope="module")
def keyed(module_tmp: Path) -> Iterator[tuple[Server, dict[str, str]]]:
    """A server with auth on (cache 0: a revocation shows at once), keys made by the CLI."""
    data = module_tmp / "data"
    env = clean_env(data)
    cli(env, "install", str(make_fake_model(module_tmp / "fake")))
    cli(env, "install", str(make_fake_model(module_tmp / "gen", task_type="txt2txt")))
    tokens = {
        scope: cli(env, "keys", "create", f"{scope}-key", "--scope", scope).stdout.strip()
        for scope in ("infer", "admin")
    }
    tokens["doomed"] = cli(env, "keys", "create", "doomed", "--scope", "infer").stdout.strip()
    tokens["expired"] = _expired_key(data)
    srv = start_server(
        data,
        module_tmp / "server.log",
        MODELMORA_AUTH__ENABLED="true",
        MODELMORA_AUTH__CACHE_SECONDS="0",
        MODELMORA_AUTH__BOOTSTRAP_KEY=BOOTSTRAP,
    )
    yield srv, tokens
    srv.stop()


def _expired_key(data: Path) -> str:
    """A key made an hour ago that expired a minute ago, in the same database."""
    from modelmora.auth.store import KeyStore
    from modelmora.registry.store import RegistryStore

    store = RegistryStore(f"sqlite:///{data / 'registry.db'}")
    then = datetime.now(UTC) - timedelta(hours=1)
    try:
        created = KeyStore(store.engine, now=lambda: then).create(
            "expired", "infer", expires_at=then + timedelta(minutes=59)
        )
    finally:
        store.close()
    return created.token


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _multipart() -> tuple[bytes, dict[str, str]]:
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\nxx\r\n'
        f"--{BOUNDARY}--\r\n"
    ).encode()
    return body, {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


# (method, path, json body, extra headers) of every kind of REST call a key guards
def _guarded_calls() -> list[tuple[str, str, object, dict[str, str]]]:
    multipart_body, multipart_headers = _multipart()
    return [
        ("POST", "/api/v1/infer/fake", {"input_data": {"text": "a"}}, {}),
        ("POST", "/infer/fake", {"text": "a"}, {}),
        ("POST", "/api/v1/infer/gen", {"input_data": {"text": "a"}, "stream": True}, {}),
        ("POST", "/api/v1/infer/fake", multipart_body, multipart_headers),
        ("POST", "/api/v1/infer/fake/async", {"input_data": {"text": "a"}}, {}),
        ("GET", "/api/v1/jobs", None, {}),
        ("GET", "/api/v1/models", None, {}),
        ("POST", "/api/v1/models", {"source": "/proc/self/environ", "name": "x"}, {}),
        ("PUT", "/api/v1/models/fake", {"config": {"adapter": "fake"}}, {}),
        ("GET", "/api/v1/status", None, {}),
    ]


def _send(srv: Server, method: str, path: str, body: object, headers: dict[str, str]) -> httpx.Response:
    if isinstance(body, bytes):
        return srv.client.request(method, path, content=body, headers=headers)
    return srv.client.request(method, path, json=body, headers=headers)


def test_without_a_key_every_call_but_health_is_refused(keyed: tuple[Server, dict[str, str]]) -> None:
    srv, _ = keyed
    for method, path, body, headers in _guarded_calls():
        for auth in ({}, _bearer("mm_0123456789ab_" + "x" * 43), {"Authorization": "Basic abc"}):
            reply = _send(srv, method, path, body, {**headers, **auth})
            assert reply.status_code == 401, (method, path, reply.text)
            assert reply.headers["www-authenticate"].startswith("Bearer")
            error = reply.json()
            assert error["error_code"] == "UNAUTHORIZED" and error["trace_id"]
    missing = srv.client.get("/api/v1/models").json()["message"]
    assert "modelmora keys create" in missing
    for path in ("/health/live", "/health/ready", "/health/models", "/metrics", "/openapi.json"):
        assert srv.client.get(path).status_code == 200, path


def test_grpc_without_a_key_is_unauthenticated(keyed: tuple[Server, dict[str, str]]) -> None:
    srv, _ = keyed
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
        infer = pb_grpc.InferenceServiceStub(channel)
        registry = pb_grpc.RegistryServiceStub(channel)
        calls = [
            lambda: infer.Infer(build_request("fake", {"text": "a"}), timeout=10),
            lambda: list(infer.Generate(build_request("gen", {"text": "a"}), timeout=10)),
            lambda: registry.RegisterModel(pb.RegisterModelRequest(source="/etc", name="x"), timeout=10),
            lambda: registry.ListModels(pb.ListModelsRequest(), timeout=10),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert dict(err.value.trailing_metadata() or ())["error_code"] == "UNAUTHORIZED"
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_an_infer_key_infers_but_cannot_change_the_catalog(keyed: tuple[Server, dict[str, str]]) -> None:
    srv, tokens = keyed
    key = tokens["infer"]
    with Client(srv.url, api_key=key) as rest, GrpcClient(f"127.0.0.1:{srv.grpc_port}", api_key=key) as rpc:
        for mm in (rest, rpc):
            assert len(mm.embed("fake", ["a", "b"])) == 2
            assert {m["name"] for m in mm.models.list()["data"]} >= {"fake", "gen"}
            events = list(mm.generate_stream("gen", {"text": "hi"}, {"max_tokens": 2}))
            assert events[-1]["event"] == "done"
            job = mm.submit("fake", {"text": "a"})
            assert mm.job(job["job_id"])["job_id"] == job["job_id"]
            refused: list[tuple[str, tuple[object, ...], dict[str, object]]] = [
                ("register", (), {"source": "/proc/self/environ", "name": "x", "task_type": "txt2embed"}),
                ("update", ("fake",), {"config": {"adapter": "fake"}}),
                ("delete", ("fake",), {}),
            ]
            for method, args, kwargs in refused:
                with pytest.raises(AuthError) as err:
                    getattr(mm.models, method)(*args, **kwargs)
                assert err.value.error_code == "FORBIDDEN"
                assert err.value.http_status == 403 or err.value.grpc_status == "PERMISSION_DENIED"
            for call in (mm.status, lambda client=mm: client.unload("fake")):
                with pytest.raises(AuthError) as err:
                    call()
                assert err.value.error_code == "FORBIDDEN"
    # The short path and multipart pass the check too (the multipart body is then refused by
    # the model: a text model takes no image).
    assert srv.client.post("/infer/fake", json={"text": "a"}, headers=_bearer(key)).status_code == 200
    body, headers = _multipart()
    reply = srv.client.post("/api/v1/infer/fake", content=body, headers={**headers, **_bearer(key)})
    assert reply.status_code not in (401, 403), reply.text


def test_async_clients_and_the_environment_carry_the_key(
    keyed: tuple[Server, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, tokens = keyed
    target = f"127.0.0.1:{srv.grpc_port}"

    async def both() -> list[int]:
        key = tokens["infer"]
        async with AsyncClient(srv.url, api_key=key) as rest, AsyncGrpcClient(target, api_key=key) as rpc:
            return [len(await mm.embed("fake", ["a", "b"])) for mm in (rest, rpc)]

    assert asyncio.run(both()) == [2, 2]
    monkeypatch.setenv("MODELMORA_API_KEY", tokens["infer"])
    with Client(srv.url) as rest, GrpcClient(target) as rpc:
        assert [len(mm.embed("fake", ["a"])) for mm in (rest, rpc)] == [1, 1]
    with Client(srv.url, api_key="", retry=NO_RETRY) as rest, pytest.raises(AuthError):
        rest.embed("fake", "a")


def test_admin_and_bootstrap_keys_may_do_everything(keyed: tuple[Server, dict[str, str]]) -> None:
    srv, tokens = keyed
    for key in (tokens["admin"], BOOTSTRAP):
        with (
            Client(srv.url, api_key=key) as rest,
            GrpcClient(f"127.0.0.1:{srv.grpc_port}", api_key=key) as rpc,
        ):
            for mm in (rest, rpc):
                assert mm.status()["ready"] is True
                assert mm.models.update("fake", description="checked")["name"] == "fake"
                assert mm.embed("fake", "a") is not None
    log = srv.log.read_text()
    assert "authentication on" in log


def test_expired_and_revoked_keys_are_refused(keyed: tuple[Server, dict[str, str]]) -> None:
    srv, tokens = keyed
    reply = srv.client.get("/api/v1/models", headers=_bearer(tokens["expired"]))
    assert reply.status_code == 401 and "expired" in reply.json()["message"]
    doomed = _bearer(tokens["doomed"])
    assert srv.client.get("/api/v1/models", headers=doomed).status_code == 200
    key_id = tokens["doomed"].split("_")[1]
    assert key_id in cli(srv.env, "keys", "revoke", key_id).stdout
    reply = srv.client.get("/api/v1/models", headers=doomed)
    assert reply.status_code == 401 and "revoked" in reply.json()["message"]
    with GrpcClient(f"127.0.0.1:{srv.grpc_port}", api_key=tokens["doomed"]) as rpc, pytest.raises(AuthError):
        rpc.models.list()


def test_keys_commands_round_trip_and_client_commands_take_a_key(
    keyed: tuple[Server, dict[str, str]],
) -> None:
    srv, _ = keyed
    made = cli(srv.env, "keys", "create", "ci", "--scope", "infer", "--scope", "admin", "--expires", "30d")
    token = made.stdout.strip()
    key_id = token.split("_")[1]
    assert "shown this once" in made.stderr
    listed = cli(srv.env, "keys", "list").stdout
    assert key_id in listed and token.split("_")[2] not in listed
    (mine,) = [k for k in json.loads(cli(srv.env, "keys", "list", "--json").stdout) if k["key_id"] == key_id]
    assert mine["name"] == "ci" and mine["scopes"] == ["admin", "infer"] and mine["state"] == "active"
    assert mine["expires_at"] is not None and mine["revoked_at"] is None
    bad = cli(srv.env, "keys", "create", "x", "--scope", "root", check=False)
    assert bad.returncode == 2 and "unknown scope" in bad.stderr
    url = ["--url", srv.url]
    refused = cli(srv.env, *url, "status", check=False)
    assert refused.returncode == 1 and "UNAUTHORIZED" in refused.stderr
    assert "models" in cli(srv.env, *url, "--api-key", token, "status").stdout
    assert "jobs" in cli({**srv.env, "MODELMORA_API_KEY": token}, *url, "jobs").stdout
    cli(srv.env, "keys", "revoke", key_id)
    (mine,) = [k for k in json.loads(cli(srv.env, "keys", "list", "--json").stdout) if k["key_id"] == key_id]
    assert mine["state"] == "revoked" and mine["revoked_at"] is not None
    assert cli(srv.env, *url, "--api-key", token, "status", check=False).returncode == 1


def test_per_key_rate_limits_are_checked_at_both_doors(tmp_path: Path) -> None:
    """The limiter runs right after the key check: the 4th call of a key in a minute is 429
    RATE_LIMITED with Retry-After, over REST and gRPC alike; another key has its own window."""
    data = tmp_path / "data"
    env = clean_env(data)
    cli(env, "install", str(make_fake_model(tmp_path / "fake")))
    first, second = (cli(env, "keys", "create", n, "--scope", "infer").stdout.strip() for n in ("a", "b"))
    srv = start_server(
        data, tmp_path / "server.log", MODELMORA_AUTH__ENABLED="true", MODELMORA_AUTH__RATE_LIMIT="3/minute"
    )
    try:
        for _ in range(3):
            assert (
                srv.client.post("/infer/fake", json={"text": "a"}, headers=_bearer(first)).status_code == 200
            )
        refused = srv.client.post("/infer/fake", json={"text": "a"}, headers=_bearer(first))
        assert refused.status_code == 429 and refused.json()["error_code"] == "RATE_LIMITED"
        assert int(refused.headers["retry-after"]) >= 1
        with GrpcClient(f"127.0.0.1:{srv.grpc_port}", api_key=first, retry=NO_RETRY) as rpc:
            with pytest.raises(OverloadedError) as err:
                rpc.embed("fake", "a")
            assert err.value.error_code == "RATE_LIMITED" and err.value.grpc_status == "RESOURCE_EXHAUSTED"
        with GrpcClient(f"127.0.0.1:{srv.grpc_port}", api_key=second, retry=NO_RETRY) as rpc:
            assert len(rpc.embed("fake", ["a"])) == 1
    finally:
        srv.stop()


# -- the public bind ---------------------------------------------------------------------------


def test_a_public_bind_without_auth_refuses_to_start(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "data", MODELMORA_AUTH__ENABLED="false")
    port, grpc_port = str(free_port()), str(free_port())
    proc = subprocess.run(
        [*CLI, "serve", "--host", "0.0.0.0", "--port", port, "--grpc-port", grpc_port],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "refusing to serve on 0.0.0.0" in proc.stdout + proc.stderr


def test_a_public_bind_starts_open_only_when_allowed_and_warns(tmp_path: Path) -> None:
    srv = start_server(
        tmp_path / "data",
        tmp_path / "server.log",
        MODELMORA_SERVER__HOST="0.0.0.0",
        MODELMORA_AUTH__ENABLED="false",
        MODELMORA_AUTH__ALLOW_UNAUTHENTICATED="true",
    )
    try:
        assert srv.client.get("/api/v1/models").status_code == 200
        assert "authentication is OFF on a non-loopback bind" in srv.log.read_text()
    finally:
        srv.stop()


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(module_tmp: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and an unrelated CA."""
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client.example")
    paths = {name: module_tmp / f"{name}.pem" for name in ("ca", "other", "cert", "key", "ccert", "ckey")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    other.cert_pem.write_to_path(str(paths["other"]))
    for blob in server.cert_chain_pems:
        blob.write_to_path(str(paths["cert"]), append=True)
    server.private_key_pem.write_to_path(str(paths["key"]))
    for blob in client.cert_chain_pems:
        blob.write_to_path(str(paths["ccert"]), append=True)
    client.private_key_pem.write_to_path(str(paths["ckey"]))
    return paths


def _start_tls(data: Path, log: Path, pki: dict[str, Path], client_auth: str) -> Server:
    port, grpc_port = free_port(), free_port()
    env = clean_env(
        data,
        MODELMORA_SERVER__TLS__CERTFILE=str(pki["cert"]),
        MODELMORA_SERVER__TLS__KEYFILE=str(pki["key"]),
        MODELMORA_SERVER__TLS__CA_CERTS=str(pki["ca"]),
        MODELMORA_SERVER__TLS__CLIENT_AUTH=client_auth,
    )
    cli(env, "install", str(make_fake_model(data.parent / f"fake-{client_auth}")), "--name", "fake")
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    context.load_cert_chain(str(pki["ccert"]), str(pki["ckey"]))
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*CLI, "serve", "--port", str(port), "--grpc-port", str(grpc_port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"https://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            ready = httpx.get(url + "/health/ready", verify=context, timeout=1).status_code == 200
        except httpx.HTTPError:
            ready = False
        with socket.socket() as s:
            if ready and s.connect_ex(("127.0.0.1", grpc_port)) == 0:
                srv = Server(proc, url, env, log, grpc_port)
                srv.client.close()
                srv.client = httpx.Client(base_url=url, verify=context, timeout=60)
                return srv
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"TLS server not ready:\n{log.read_text()}")


@pytest.fixture(scope="module")
def tls_server(module_tmp: Path, pki: dict[str, Path]) -> Iterator[Server]:
    srv = _start_tls(module_tmp / "tls" / "data", module_tmp / "tls.log", pki, "none")
    yield srv
    srv.stop()


def test_tls_on_both_doors_with_the_sdk(tls_server: Server, pki: dict[str, Path]) -> None:
    target = f"127.0.0.1:{tls_server.grpc_port}"
    with Client(tls_server.url, ca_certs=pki["ca"]) as rest, GrpcClient(target, ca_certs=pki["ca"]) as rpc:
        for mm in (rest, rpc):
            assert len(mm.embed("fake", ["a", "b"])) == 2
    with GrpcClient(f"https://{target}", ca_certs=pki["ca"]) as rpc:
        assert rpc.health()["ready"] is True
    # Plain HTTP and plaintext gRPC are not answered on the TLS ports.
    with pytest.raises(httpx.HTTPError):
        httpx.get(tls_server.url.replace("https", "http") + "/health/live", timeout=5)
    with GrpcClient(target, timeout=5, retry=NO_RETRY) as plain, pytest.raises(TransportError):
        plain.embed("fake", "a")


def test_the_sdk_verifies_the_server_by_default(tls_server: Server, pki: dict[str, Path]) -> None:
    target = f"127.0.0.1:{tls_server.grpc_port}"
    for rest in (
        Client(tls_server.url, retry=NO_RETRY),
        Client(tls_server.url, ca_certs=pki["other"], retry=NO_RETRY),
    ):
        with rest, pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
            rest.embed("fake", "a")
    with (
        GrpcClient(target, ca_certs=pki["other"], timeout=5, retry=NO_RETRY) as rpc,
        pytest.raises(TransportError),
    ):
        rpc.embed("fake", "a")


def test_mtls_required_refuses_a_client_without_a_certificate(module_tmp: Path, pki: dict[str, Path]) -> None:
    srv = _start_tls(module_tmp / "mtls" / "data", module_tmp / "mtls.log", pki, "required")
    target = f"127.0.0.1:{srv.grpc_port}"
    mine = {"client_cert": pki["ccert"], "client_key": pki["ckey"]}
    try:
        with (
            Client(srv.url, ca_certs=pki["ca"], **mine) as rest,
            GrpcClient(target, ca_certs=pki["ca"], **mine) as rpc,
        ):
            for mm in (rest, rpc):
                assert len(mm.embed("fake", ["a"])) == 1
        with Client(srv.url, ca_certs=pki["ca"], retry=NO_RETRY) as rest, pytest.raises(TransportError):
            rest.embed("fake", "a")
        with (
            GrpcClient(target, ca_certs=pki["ca"], timeout=5, retry=NO_RETRY) as rpc,
            pytest.raises(TransportError),
        ):
            rpc.embed("fake", "a")
    finally:
        srv.stop()
