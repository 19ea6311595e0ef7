"""The CLI workflow (Hub install through a stand-in, lock, install from lock, uninstall) and
the server's process lifecycle (drain on SIGTERM, workers end with a killed server)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import make_fake_model
from tests.e2e.conftest import clean_env, cli, start_server
from tests.hubstub import HubStub


def test_install_from_the_hub_lock_and_reinstall(tmp_path: Path, minilm_dir: Path) -> None:
    data = tmp_path / "data"
    with HubStub({"sentence-transformers/all-MiniLM-L6-v2": minilm_dir}) as hub:
        env = clean_env(data, MODELMORA_REGISTRY__HUB_ENDPOINT=hub.endpoint)
        out = cli(env, "install", "sentence-transformers/all-MiniLM-L6-v2")
        assert f"all-MiniLM-L6-v2@{hub.commit[:12]}" in out.stdout
        info = json.loads(cli(env, "info", "all-MiniLM-L6-v2").stdout)
        version = info["versions"][0]
        assert version["revision"] == hub.commit and info["task_type"] == "txt2embed"
        assert version["origin"].startswith("hf://sentence-transformers/all-MiniLM-L6-v2")
        cli(env, "lock", cwd=tmp_path)

        # A fresh machine: an empty data dir installs everything from the lock, verified.
        fresh = clean_env(tmp_path / "fresh", MODELMORA_REGISTRY__HUB_ENDPOINT=hub.endpoint)
        done = cli(fresh, "install", cwd=tmp_path)
        assert "installed (checksums verified)" in done.stdout
        again = cli(fresh, "install", cwd=tmp_path)
        assert "present" in again.stdout
        # A file changed on disk after install is caught when the lock is applied again.
        path = Path(json.loads(cli(fresh, "info", "all-MiniLM-L6-v2").stdout)["versions"][0]["path"])
        (path / "config.json").resolve().write_text("{}")
        tampered = cli(fresh, "install", cwd=tmp_path, check=False)
        assert tampered.returncode == 1 and "CHECKSUM_MISMATCH" in tampered.stderr

        # A tampered lock refuses with CHECKSUM_MISMATCH and registers nothing.
        lock = json.loads((tmp_path / "modelmora.lock").read_text())
        lock["models"][0]["files"]["config.json"] = "0" * 64
        (tmp_path / "modelmora.lock").write_text(json.dumps(lock))
        other = clean_env(tmp_path / "other", MODELMORA_REGISTRY__HUB_ENDPOINT=hub.endpoint)
        refused = cli(other, "install", cwd=tmp_path, check=False)
        assert refused.returncode == 1 and "CHECKSUM_MISMATCH" in refused.stderr
        assert "all-MiniLM-L6-v2" not in cli(other | {"COLUMNS": "200"}, "list").stdout


def test_bad_configuration_is_one_line(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "data")
    missing = cli(env, "--config", str(tmp_path / "nope.yaml"), "list", check=False)
    assert missing.returncode == 2 and "invalid configuration" in missing.stderr
    assert "Traceback" not in missing.stderr
    (tmp_path / "bad.yaml").write_text("server:\n  prot: 9000\n")
    typo = cli(env, "--config", str(tmp_path / "bad.yaml"), "serve", check=False)
    assert typo.returncode == 2 and "prot" in typo.stderr and "Traceback" not in typo.stderr


def test_unreachable_sources_fail_cleanly(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "data", MODELMORA_REGISTRY__HUB_ENDPOINT="http://127.0.0.1:9")
    for args in (
        ["install", "org/some-model"],
        ["install", "./no/such/folder"],
        ["install", "x", "--from", "/nope"],
    ):
        proc = cli(env, *args, check=False)
        assert proc.returncode == 1
        assert "SOURCE_UNAVAILABLE" in proc.stderr and "Traceback" not in proc.stderr
    assert "0 models" in cli(env, "lock", "--output", str(tmp_path / "l.lock")).stdout
    staging = tmp_path / "data" / "models" / ".staging"
    assert not staging.exists() or not any(staging.iterdir())


def test_versions_use_update_uninstall(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "data")
    folder = make_fake_model(tmp_path / "emb")
    cli(env, "install", str(folder), "--version", "v1")
    (folder / "extra.txt").write_text("changed")
    cli(env, "install", str(folder), "--version", "v2")
    assert json.loads(cli(env, "info", "emb").stdout)["active_version"] == "v2"
    cli(env, "use", "emb@v1")
    cli(env, "update", "emb", "--set", "max_batch_size=8", "--set", "display_name=Embedder")
    info = json.loads(cli(env, "info", "emb").stdout)
    assert info["active_version"] == "v1" and info["config"]["max_batch_size"] == 8
    assert info["display_name"] == "Embedder"
    bad = cli(env, "update", "emb", "--set", "max_batch_size=lots", check=False)
    assert bad.returncode == 1 and "VALIDATION_ERROR" in bad.stderr
    missing = cli(env, "use", "emb@v9", check=False)
    assert missing.returncode == 1 and "MODEL_NOT_FOUND" in missing.stderr
    bad_name = cli(env, "info", "../etc", check=False)
    assert bad_name.returncode == 1 and "VALIDATION_ERROR" in bad_name.stderr
    v2_path = Path(next(v["path"] for v in info["versions"] if v["version"] == "v2"))
    cli(env, "uninstall", "emb@v2")
    assert not v2_path.exists()
    cli(env, "uninstall", "emb")
    assert cli(env, "info", "emb", check=False).returncode == 1
    assert not (tmp_path / "data" / "models" / "emb").exists()


def _pids_of_children(pid: int) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(pid).children(recursive=True)]


def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cli(clean_env(data), "install", str(make_fake_model(tmp_path / "slow")))
    server = start_server(data, tmp_path / "server.log", MODELMORA_SERVER__DRAIN_SECONDS="10")
    try:
        assert server.client.post("/infer/slow", json={"text": "warm"}).status_code == 200
        workers = _pids_of_children(server.proc.pid)
        assert workers  # the model's worker, and the warm spare when it is up
        results: dict[str, httpx.Response] = {}
        slow = threading.Thread(
            target=lambda: results.setdefault(
                "slow", httpx.post(server.url + "/infer/slow", json={"text": "sleep:1500"}, timeout=30)
            )
        )
        slow.start()
        server.wait_until(lambda: server.model_in_flight("slow") == 1, "the slow request in flight")
        server.proc.send_signal(signal.SIGTERM)
        server.wait_until(
            lambda: httpx.get(server.url + "/health/ready").status_code == 503, "the drain to begin"
        )
        ready = httpx.get(server.url + "/health/ready")
        assert ready.status_code == 503 and ready.json()["reason"] == "draining"
        refused = httpx.post(server.url + "/infer/slow", json={"text": "new"})
        assert refused.status_code == 503 and refused.json()["error_code"] == "SHUTTING_DOWN"
        assert "retry-after" in refused.headers
        slow.join(10)
        assert results["slow"].status_code == 200  # the request in flight finished
        assert server.proc.wait(15) is not None
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in workers)
    finally:
        server.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def test_no_worker_outlives_a_killed_server(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cli(clean_env(data), "install", str(make_fake_model(tmp_path / "m")))
    server = start_server(data, tmp_path / "server.log")
    try:
        assert server.client.post("/infer/m", json={"text": "hi"}).status_code == 200
        workers = _pids_of_children(server.proc.pid)
        assert workers
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(5)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in workers)
    finally:
        server.stop()
