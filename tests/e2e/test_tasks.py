"""txt2txt, img2embed, img2txt and txt2img end to end: the server as a user starts it, tiny
random-weight models installed through the CLI from local folders, called over REST."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from PIL import Image

from modelmora.v1 import modelmora_pb2_grpc as pb_grpc
from modelmora.v1.convert import build_request
from tests.conftest import make_fake_model
from tests.e2e.conftest import Server, clean_env, cli, start_server


@pytest.fixture(scope="module")
def server(module_tmp: Path, tiny_models: dict[str, Path]) -> Iterator[Server]:
    data = module_tmp / "data"
    env = clean_env(data)
    for folder in tiny_models.values():
        cli(env, "install", str(folder))  # the task comes from the folder's own metadata
    cli(env, "install", str(make_fake_model(module_tmp / "fake-gen", task_type="txt2txt", step_ms=20)))
    cli(env, "install", str(_st_clip(tiny_models["tiny-clip"], module_tmp / "st-clip")))
    srv = start_server(
        data,
        module_tmp / "server.log",
        MODELMORA_LIMITS__MAX_IMAGE_BYTES=str(200_000),
        MODELMORA_LIMITS__MAX_IMAGE_PIXELS=str(1_000_000),
    )
    yield srv
    srv.stop()


def _st_clip(clip: Path, folder: Path) -> Path:
    """The tiny CLIP saved as a sentence-transformers image model (`modules.json`)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import CLIPModel

    SentenceTransformer(modules=[CLIPModel(str(clip))]).save(str(folder))
    return folder


def png(color: tuple[int, int, int] = (200, 30, 90), size: tuple[int, int] = (40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sse_events(response: httpx.Response) -> list[tuple[str, Any]]:
    events: list[tuple[str, Any]] = []
    kind = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((str(kind), json.loads(line.removeprefix("data: "))))
    return events


def test_each_task_was_detected_at_install(server: Server) -> None:
    models = {m["name"]: m["task_type"] for m in server.client.get("/api/v1/models").json()["data"]}
    assert models["tiny-gpt2"] == "txt2txt"
    assert models["tiny-clip"] == "img2embed"
    assert models["tiny-captioner"] == "img2txt"
    assert models["tiny-sd"] == "txt2img"


# -- txt2txt ---------------------------------------------------------------------------------


def test_generate_text_and_the_same_seed_gives_the_same_text(server: Server) -> None:
    body = {"input_data": {"text": "Hello world"}, "parameters": {"max_tokens": 8, "seed": 42}}
    first = server.client.post("/api/v1/infer/tiny-gpt2", json=body)
    assert first.status_code == 200, first.text
    result = first.json()["result"]
    assert isinstance(result["text"], str)
    assert result["finish_reason"] in ("length", "stop")
    assert 1 <= result["usage"]["completion_tokens"] <= 8 or result["finish_reason"] == "stop"
    assert result["usage"]["prompt_tokens"] > 0
    again = server.client.post("/api/v1/infer/tiny-gpt2", json=body).json()["result"]
    assert again["text"] == result["text"]
    # A list of prompts and chat messages.
    many = server.client.post(
        "/infer/tiny-gpt2", json={"text": ["one", "two"], "parameters": {"max_tokens": 3, "temperature": 0}}
    ).json()["result"]
    assert len(many["text"]) == 2 and len(many["finish_reason"]) == 2
    chat = server.client.post(
        "/api/v1/infer/tiny-gpt2",
        json={
            "input_data": {"messages": [{"role": "user", "content": "hi"}]},
            "parameters": {"max_tokens": 3},
        },
    )
    assert chat.status_code == 200, chat.text


def test_concurrent_prompts_are_batched_and_greedy_output_does_not_depend_on_the_batch(
    server: Server,
) -> None:
    prompts = [f"prompt number {i}" for i in range(6)]

    def call(prompt: str) -> dict[str, Any]:
        body = {"input_data": {"text": prompt}, "parameters": {"max_tokens": 12, "temperature": 0}}
        r = httpx.post(server.url + "/api/v1/infer/tiny-gpt2", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    solo = {p: call(p)["result"]["text"] for p in prompts}
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(call, prompts * 3))
    assert max(r["metadata"]["batch_size"] for r in together) > 1
    assert [r["result"]["text"] for r in together] == [solo[p] for p in prompts * 3]


def test_stream_tokens_then_done(server: Server) -> None:
    body = {"input_data": {"text": "Hello"}, "parameters": {"max_tokens": 10, "seed": 7}, "stream": True}
    with server.client.stream("POST", "/api/v1/infer/tiny-gpt2", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) <= {"token"}
    tokens = [d for k, d in events if k == "token"]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    done = events[-1][1]
    assert "".join(t["text"] for t in tokens) == done["result"]["text"]
    # Not streamed, same seed: the same text.
    plain = server.client.post("/api/v1/infer/tiny-gpt2", json={**body, "stream": False}).json()
    assert plain["result"]["text"] == done["result"]["text"]


def test_stream_errors_before_the_first_event_are_plain_errors(server: Server) -> None:
    bad = {"input_data": {"text": "x"}, "parameters": {"max_tokens": 0}, "stream": True}
    r = server.client.post("/api/v1/infer/tiny-gpt2", json=bad)
    assert r.status_code == 422 and r.json()["details"]["errors"][0]["field"] == "parameters.max_tokens"
    r = server.client.post("/infer/tiny-clip", json={"image": b64(png()), "stream": True})
    assert r.status_code == 422  # not a streaming task


def test_a_client_that_goes_away_stops_its_generation(server: Server) -> None:
    """The fake generator streams a word per 20 ms: 4,000 words would take 80 s. The client
    reads two and leaves; the worker drops it, so a request after it is served at once."""
    body = {"input_data": {"text": "long"}, "parameters": {"max_tokens": 4000}, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        with client.stream("POST", "/api/v1/infer/fake-gen", json=body) as response:
            lines = response.iter_lines()
            seen = [next(lines) for _ in range(4)]
        assert seen[0] == "event: token"
    after = httpx.post(
        server.url + "/api/v1/infer/fake-gen",
        json={"input_data": {"text": "next"}, "parameters": {"max_tokens": 2}},
        timeout=30,
    )
    assert after.status_code == 200
    assert after.json()["result"]["usage"]["completion_tokens"] == 2


# -- img2embed -------------------------------------------------------------------------------


def test_image_embeddings_from_json_and_multipart(server: Server) -> None:
    one = server.client.post(
        "/infer/tiny-clip", json={"image": b64(png()), "parameters": {"normalize": True}}
    )
    assert one.status_code == 200, one.text
    vector = one.json()["result"]["embeddings"]
    assert len(vector) == 16 and abs(sum(x * x for x in vector) - 1) < 1e-4
    many = server.client.post("/api/v1/infer/tiny-clip", json={"input_data": {"image": [b64(png())] * 3}})
    assert len(many.json()["result"]["embeddings"]) == 3
    files = [("image", ("a.png", png(), "image/png")), ("image", ("b.png", png((1, 2, 3)), "image/png"))]
    form = server.client.post(
        "/api/v1/infer/tiny-clip", files=files, data={"parameters": json.dumps({"normalize": True})}
    )
    assert form.status_code == 200, form.text
    vectors = form.json()["result"]["embeddings"]
    assert len(vectors) == 2
    assert vectors[0] == pytest.approx(vector, abs=1e-5)


def test_a_sentence_transformers_image_model_matches_encode(server: Server, module_tmp: Path) -> None:
    from sentence_transformers import SentenceTransformer

    image = png((10, 200, 40))
    reply = server.client.post("/infer/st-clip", json={"image": [b64(image), b64(png())]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["metadata"]["task_type"] == "img2embed"
    expected = SentenceTransformer(str(module_tmp / "st-clip"), device="cpu").encode(
        [Image.open(io.BytesIO(image)).convert("RGB"), Image.open(io.BytesIO(png())).convert("RGB")]
    )
    got = reply.json()["result"]["embeddings"]
    assert len(got) == 2
    for row, want in zip(got, expected.tolist(), strict=True):
        assert row == pytest.approx(want, abs=1e-4)


def test_bad_images_fail_alone(server: Server) -> None:
    corrupt = png()[:60]  # a PNG header and little else: passes the header check, not decoding
    bomb_like = b64(png(size=(5000, 5000)))  # a small file of 25 M pixels (limit: 1 M)

    def call(image: str) -> httpx.Response:
        return httpx.post(server.url + "/infer/tiny-clip", json={"image": image}, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        bad, good, gif = pool.map(call, [b64(corrupt), b64(png()), b64(_gif())])
    assert bad.status_code == 422 and bad.json()["error_code"] == "INVALID_IMAGE"
    assert good.status_code == 200
    assert gif.status_code == 422 and gif.json()["error_code"] == "INVALID_IMAGE"
    big = call(bomb_like)
    assert big.status_code == 422 and big.json()["error_code"] == "INVALID_IMAGE", big.text
    url = call("https://169.254.169.254/latest/meta-data")
    assert url.status_code == 422 and url.json()["details"]["errors"][0]["field"] == "input_data.image"


def _gif() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 4)).save(out, format="GIF")
    return out.getvalue()


# -- img2txt ---------------------------------------------------------------------------------


def test_captions(server: Server) -> None:
    params = {"max_tokens": 5, "temperature": 0}
    r = server.client.post("/infer/tiny-captioner", json={"image": b64(png()), "parameters": params})
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["result"]["text"], str)
    files = [("image", ("a.png", png(), "image/png"))]
    form = server.client.post("/infer/tiny-captioner", files=files, data={"parameters": json.dumps(params)})
    assert form.status_code == 200, form.text
    assert form.json()["result"]["text"] == r.json()["result"]["text"]  # greedy: same caption


def test_captions_stream_over_sse_and_grpc(server: Server) -> None:
    """A caption streams like generated text: tokens in order, then the whole answer, which
    is the unstreamed caption of the same seed on both doors. (Greedy, the random-weight
    captioner ends at once: its first choice is the end token.)"""
    params = {"max_tokens": 6, "temperature": 1.0, "seed": 11}
    plain = server.client.post("/infer/tiny-captioner", json={"image": b64(png()), "parameters": params})
    assert plain.status_code == 200, plain.text
    caption = plain.json()["result"]["text"]
    assert caption

    body = {"input_data": {"image": b64(png())}, "parameters": params, "stream": True}
    with server.client.stream("POST", "/api/v1/infer/tiny-captioner", json=body) as response:
        assert response.status_code == 200
        events = sse_events(response)
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done" and kinds.count("token") >= 1 and set(kinds[:-1]) == {"token"}
    tokens = [d for k, d in events if k == "token"]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert "".join(t["text"] for t in tokens) == events[-1][1]["result"]["text"] == caption

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        stream = list(stub.Generate(build_request("tiny-captioner", {"image": png()}, params)))
    kinds = [e.WhichOneof("event") for e in stream]
    assert kinds[-1] == "done" and kinds.count("token") >= 1 and set(kinds[:-1]) == {"token"}
    assert [e.token.index for e in stream[:-1]] == list(range(len(stream) - 1))
    text = "".join(e.token.text for e in stream[:-1])
    assert text == stream[-1].done.result.generation.text[0] == caption


# -- txt2img ---------------------------------------------------------------------------------


def test_images_inline_and_in_the_result_store(server: Server) -> None:
    params = {"width": 32, "height": 32, "steps": 2, "seed": 5, "response_format": "b64_json"}
    r = server.client.post("/infer/tiny-sd", json={"text": "a cat", "parameters": params})
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert result["seed"] == 5 and len(result["images"]) == 1
    picture = Image.open(io.BytesIO(base64.b64decode(result["images"][0]["b64_json"])))
    assert picture.format == "PNG" and picture.size == (32, 32)
    stored = server.client.post(
        "/infer/tiny-sd",
        json={"text": "a cat", "parameters": {**params, "response_format": "url", "num_images": 2}},
    ).json()["result"]
    assert len(stored["images"]) == 2
    fetched = server.client.get(stored["images"][0]["url"])
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    # The same seed gives the same picture.
    assert fetched.content == base64.b64decode(result["images"][0]["b64_json"])


def test_image_generation_streams_progress(server: Server) -> None:
    body = {
        "input_data": {"text": "a dog"},
        "parameters": {"width": 32, "height": 32, "steps": 3},
        "stream": True,
    }
    with server.client.stream("POST", "/api/v1/infer/tiny-sd", json=body) as response:
        events = sse_events(response)
    assert [k for k, _ in events] == ["progress"] * 3 + ["done"]
    assert [d for _, d in events[:3]] == [{"step": i, "total": 3} for i in (1, 2, 3)]
    assert events[-1][1]["result"]["images"][0]["url"]


def test_image_sizes_must_be_multiples_of_8(server: Server) -> None:
    r = server.client.post("/infer/tiny-sd", json={"text": "x", "parameters": {"width": 30}})
    assert r.status_code == 422
    assert r.json()["details"]["errors"][0]["field"] == "parameters.width"
