"""End to end: a real server, the real MiniLM installed with the CLI, called over HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import Server, cli

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "ModelMora serves many models from one place.",
    "Ein kleiner Satz auf Deutsch.",
    "Une phrase en français, avec des accents: é è à.",
    "日本語の文です。",
    "emoji 🚀🔥 and symbols %$#@!",
    "a",
    "    leading and trailing spaces    ",
    "Numbers 1234567890 and 3.14159",
    "def main():\n    return 42",
    "SELECT * FROM models WHERE task = 'txt2embed';",
    "The mitochondria is the powerhouse of the cell.",
    "I love machine learning.",
    "I hate waiting in line.",
    "Paris is the capital of France.",
    "Berlin is the capital of Germany.",
    "https://example.com/some/path?query=1",
    "UPPER CASE SENTENCE",
    "tabs\tand\nnewlines",
    "A slightly longer sentence that goes on for a while to use more tokens than the others do.",
    "short",
    "Привет, мир!",
    "مرحبا بالعالم",
]


@pytest.fixture(scope="module")
def reference(minilm_dir: Path) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    return np.asarray(SentenceTransformer(str(minilm_dir), device="cpu").encode(TEXTS))


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_the_server_process_never_loads_torch(server: Server) -> None:
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "libtorch" not in maps  # the server process never imports torch


def test_embeddings_match_sentence_transformers(server: Server, reference: np.ndarray) -> None:
    r = server.client.post("/api/v1/infer/all-MiniLM-L6-v2", json={"input_data": {"text": TEXTS}})
    assert r.status_code == 200, r.text
    body = r.json()
    got = np.asarray(body["result"]["embeddings"], dtype=np.float32)
    assert got.shape == (len(TEXTS), 384)
    assert _cos(got, reference).min() >= 0.9999
    rel = np.abs(np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1) - 1)
    assert rel.max() <= 1e-4
    meta = body["metadata"]
    assert meta["model"] == "all-MiniLM-L6-v2" and meta["task_type"] == "txt2embed"
    assert meta["device"] == "cpu" and meta["truncated"] == 0 and meta["batch_size"] == len(TEXTS)
    assert set(body["timing"]) == {"queue_time_ms", "inference_time_ms", "total_time_ms"}


def test_single_string_gives_one_vector_and_normalize(server: Server, reference: np.ndarray) -> None:
    for i, text in enumerate(TEXTS[:6]):
        r = server.client.post(
            "/infer/all-MiniLM-L6-v2", json={"text": text, "parameters": {"normalize": True}}
        )
        assert r.status_code == 200, r.text
        vec = np.asarray(r.json()["result"]["embeddings"], dtype=np.float32)
        assert vec.shape == (384,)
        assert abs(np.linalg.norm(vec) - 1) < 1e-5
        assert _cos(vec[None], reference[i : i + 1])[0] >= 0.9999


def test_long_text_is_truncated_and_counted(server: Server) -> None:
    long_text = " ".join(["tokens"] * 700)
    r = server.client.post("/infer/all-MiniLM-L6-v2", json={"text": [long_text, "short"]})
    assert r.status_code == 200
    assert r.json()["metadata"]["truncated"] == 1


def test_trace_id_comes_from_traceparent(server: Server) -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    r = server.client.post(
        "/infer/nope-model", json={"text": "x"}, headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"}
    )
    assert r.status_code == 404
    assert r.json()["trace_id"] == trace and r.headers["x-trace-id"] == trace
    assert r.headers["traceparent"].startswith(f"00-{trace}-")
    generated = server.client.get("/health/live").headers["x-trace-id"]
    assert len(generated) == 32 and generated != trace


BAD_CASES = [
    # (path, body (dict or raw bytes), status, error_code)
    ("/api/v1/infer/no-such-model", {"input_data": {"text": "x"}}, 404, "MODEL_NOT_FOUND"),
    ("/api/v1/infer/all-MiniLM-L6-v2", b'{"input_data": {"text": "x"', 422, "VALIDATION_ERROR"),
    ("/api/v1/infer/all-MiniLM-L6-v2", {"input_data": {"text": 42}}, 422, "VALIDATION_ERROR"),
    ("/api/v1/infer/all-MiniLM-L6-v2", {"input_data": {"text": ["ok", 7]}}, 422, "VALIDATION_ERROR"),
    ("/api/v1/infer/all-MiniLM-L6-v2", {"input_data": "text"}, 422, "VALIDATION_ERROR"),
    ("/api/v1/infer/all-MiniLM-L6-v2", {"input_data": {"text": ""}}, 422, "VALIDATION_ERROR"),
    ("/api/v1/infer/all-MiniLM-L6-v2", {"input_data": {"text": []}}, 422, "VALIDATION_ERROR"),
    ("/api/v1/infer/all-MiniLM-L6-v2", {"input_data": {}}, 422, "VALIDATION_ERROR"),
    (
        "/api/v1/infer/all-MiniLM-L6-v2",
        {"input_data": {"text": "x"}, "priority": "urgent"},
        422,
        "VALIDATION_ERROR",
    ),
    (
        "/api/v1/infer/all-MiniLM-L6-v2",
        {"input_data": {"text": "x"}, "timeout_seconds": -1},
        422,
        "VALIDATION_ERROR",
    ),
    (
        "/api/v1/infer/all-MiniLM-L6-v2",
        {"input_data": {"text": "x"}, "parameters": {"normalize": "yes"}},
        422,
        "VALIDATION_ERROR",
    ),
    ("/api/v1/infer/all-MiniLM-L6-v2", {"input_data": {"text": "x"}, "bogus": 1}, 422, "VALIDATION_ERROR"),
    ("/api/v1/infer/all-MiniLM-L6-v2", {"input_data": {"text": "x" * 5001}}, 422, "INPUT_TOO_LONG"),
    ("/api/v1/infer/all-MiniLM-L6-v2", {"input_data": {"text": ["x"] * 65}}, 422, "TOO_MANY_INPUTS"),
    ("/api/v1/infer/all-MiniLM-L6-v2", {"input_data": {"text": "x" * 1_100_000}}, 413, "PAYLOAD_TOO_LARGE"),
    (
        "/api/v1/infer/all-MiniLM-L6-v2",
        {"input_data": {"text": "x", "image": "aGk="}},
        422,
        "VALIDATION_ERROR",
    ),
    ("/api/v1/infer/..%2F..%2Fetc%2Fpasswd", {"input_data": {"text": "x"}}, 422, "VALIDATION_ERROR"),
    ("/api/v1/infer/bad%20name%21", {"input_data": {"text": "x"}}, 422, "VALIDATION_ERROR"),
    ("/api/v1/infer/" + "a" * 200, {"input_data": {"text": "x"}}, 422, "VALIDATION_ERROR"),
    (
        "/api/v1/infer/all-MiniLM-L6-v2",
        {"input_data": {"text": "x"}, "stream": True},
        422,
        "VALIDATION_ERROR",
    ),
    ("/infer/all-MiniLM-L6-v2", {"text": None}, 422, "VALIDATION_ERROR"),
    ("/api/v1/models/..%2Fsecret", None, 422, "VALIDATION_ERROR"),
    ("/api/v1/nothing-here", None, 404, "NOT_FOUND"),
]


@pytest.mark.parametrize(("path", "body", "status", "code"), BAD_CASES)
def test_bad_input_gets_one_clear_error(
    server: Server, path: str, body: object, status: int, code: str
) -> None:
    if body is None:
        r = server.client.get(path)
    elif isinstance(body, bytes):
        r = server.client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = server.client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()
    assert set(err) == {"error_code", "message", "details", "trace_id"}
    assert err["error_code"] == code and err["message"] and len(err["trace_id"]) == 32


def test_a_chunked_body_over_the_limit_gets_413(server: Server) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"input_data": {"text": "'
        for _ in range(40):
            yield b"x" * 32_768
        yield b'"}}'

    r = server.client.post(
        "/api/v1/infer/all-MiniLM-L6-v2", content=chunks(), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error_code"] == "PAYLOAD_TOO_LARGE"

    def small():  # type: ignore[no-untyped-def]
        yield b'{"text": "chunked '
        yield b'but small"}'

    ok = server.client.post(
        "/infer/all-MiniLM-L6-v2", content=small(), headers={"content-type": "application/json"}
    )
    assert ok.status_code == 200 and len(ok.json()["result"]["embeddings"]) == 384


def test_a_model_that_fails_to_load_does_not_stop_the_others(server: Server) -> None:
    r = server.client.post("/infer/broken", json={"text": "x"})
    assert r.status_code == 503 and r.json()["error_code"] == "MODEL_LOAD_FAILED"
    assert "asked to fail" in r.json()["message"]
    assert "retry-after" in r.headers
    ok = server.client.post("/infer/all-MiniLM-L6-v2", json={"text": "still serving"})
    assert ok.status_code == 200
    states = {m["name"]: m["state"] for m in server.client.get("/health/models").json()["models"]}
    assert states["broken"] == "failed" and states["all-MiniLM-L6-v2"] == "ready"


def test_registry_over_rest(server: Server, module_tmp: Path) -> None:
    listing = server.client.get("/api/v1/models", params={"task_type": "txt2embed", "page_size": 2}).json()
    assert listing["meta"]["total"] == 3 and listing["meta"]["total_pages"] == 2 and len(listing["data"]) == 2
    model = server.client.get("/api/v1/models/all-MiniLM-L6-v2").json()
    assert model["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    files = model["versions"][0]["files"]
    assert len(files["model.safetensors"]) == 64 and "config.json" in files
    assert model["state"] == "ready"
    lock = server.client.get("/api/v1/lock").json()
    assert {m["name"] for m in lock["models"]} == {"all-MiniLM-L6-v2", "broken", "slow"}
    updated = server.client.put(
        "/api/v1/models/slow", json={"config": {"max_batch_size": 4}, "description": "d"}
    )
    assert updated.status_code == 200 and updated.json()["config"]["max_batch_size"] == 4
    bad = server.client.put("/api/v1/models/slow", json={"config": {"max_batch_size": "many"}})
    assert bad.status_code == 422 and bad.json()["error_code"] == "VALIDATION_ERROR"
    typo = server.client.put("/api/v1/models/slow", json={"config": {"max_batch_sise": 4}})
    assert typo.status_code == 422 and "max_batch_sise" in typo.json()["message"]
    again = server.client.post(
        "/api/v1/models",
        json={
            "source": model["versions"][0]["path"],
            "name": "all-MiniLM-L6-v2",
            "version": model["active_version"],
        },
    )
    assert again.status_code == 409 and again.json()["error_code"] == "MODEL_EXISTS"
    nowhere = str(module_tmp / "does-not-exist")  # under the local root: reachable, absent
    missing = server.client.post("/api/v1/models", json={"source": nowhere, "name": "ghost"})
    assert missing.status_code == 502 and missing.json()["error_code"] == "SOURCE_UNAVAILABLE"
    assert server.client.get("/api/v1/models/ghost").status_code == 404
    assert server.client.get("/openapi.json").json()["info"]["title"] == "ModelMora"


def test_cli_sees_the_live_state_and_writes_the_lock(server: Server, module_tmp: Path) -> None:
    listing = cli(server.env | {"COLUMNS": "200"}, "--url", server.url, "list")
    assert "all-MiniLM-L6-v2" in listing.stdout and "ready" in listing.stdout
    info = json.loads(cli(server.env, "--url", server.url, "info", "all-MiniLM-L6-v2").stdout)
    assert info["state"] == "ready" and info["task_type"] == "txt2embed"
    cli(server.env, "lock", "--output", str(module_tmp / "modelmora.lock"))
    lock = json.loads((module_tmp / "modelmora.lock").read_text())
    entry = next(m for m in lock["models"] if m["name"] == "all-MiniLM-L6-v2")
    assert entry["model_id"] == "sentence-transformers/all-MiniLM-L6-v2" and entry["source_kind"] == "local"
    assert "generated_at" in lock and entry["files"]["model.safetensors"]
    refused = cli(server.env, "--url", server.url, "uninstall", "all-MiniLM-L6-v2", check=False)
    assert refused.returncode == 1 and "MODEL_LOADED" in refused.stderr
    health = cli(server.env, "--url", server.url, "health")
    assert "ready" in health.stdout


def test_warmup_download_and_explicit_unload(server: Server) -> None:
    warm = server.client.post("/api/v1/models/all-MiniLM-L6-v2/warmup")
    assert warm.status_code == 200 and warm.json()["warmed"] is True
    verified = server.client.post("/api/v1/models/all-MiniLM-L6-v2/download").json()
    assert verified["verified"] is True and verified["files"] >= 10
    pinned = server.client.post("/infer/all-MiniLM-L6-v2@v1", json={"text": "x"})
    assert pinned.status_code == 422 and pinned.json()["error_code"] == "VALIDATION_ERROR"

    known = {m["name"] for m in server.client.get("/health/models").json()["models"]}
    assert "slow" not in known  # never used: never loaded
    loaded = cli(server.env, "--url", server.url, "load", "slow")
    assert "ready" in loaded.stdout
    unloaded = cli(server.env, "--url", server.url, "unload", "slow")
    assert "unloaded" in unloaded.stdout
    state = next(m for m in server.client.get("/health/models").json()["models"] if m["name"] == "slow")
    assert state["state"] == "unloaded" and state["pid"] is None
    status = server.client.get("/api/v1/status").json()
    assert status["ready"] is True and status["workers"] >= 1
    assert server.client.post("/infer/slow", json={"text": "reloads"}).status_code == 200
