"""`modelmora run`, `ps`, `list --json` and the tables at 80 columns, through the CLI against a
real server (the interactive chat through a pseudo-terminal)."""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from PIL import Image

from modelmora.client import Client
from tests.conftest import make_fake_model
from tests.e2e.conftest import CLI, Server, clean_env, cli, start_server

LONG_NAME = "all-MiniLM-L6-v2-long-name-model"


@pytest.fixture(scope="module")
def server(module_tmp: Path, tiny_models: dict[str, Path]) -> Iterator[Server]:
    data = module_tmp / "data"
    env = clean_env(data)
    cli(env, "install", str(make_fake_model(module_tmp / "fake")))
    cli(env, "install", str(make_fake_model(module_tmp / LONG_NAME)))
    cli(env, "install", str(make_fake_model(module_tmp / "chat", task_type="txt2txt", step_ms=1)))
    cli(env, "install", str(tiny_models["tiny-captioner"]))
    cli(env, "install", str(tiny_models["tiny-sd"]))
    srv = start_server(data, module_tmp / "server.log")
    yield srv
    srv.stop()


def run(server: Server, *args: str, stdin: str | bytes | None = None, cwd: Path | None = None) -> str:
    """`modelmora --url URL ...` at 80 columns; its stdout (fails on a non-zero exit)."""
    env = server.env | {"COLUMNS": "80"}
    data = stdin.encode() if isinstance(stdin, str) else stdin
    proc = subprocess.run(
        [*CLI, "--url", server.url, *args], env=env, input=data, capture_output=True, timeout=300, cwd=cwd
    )
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout.decode()}\n{proc.stderr.decode()}"
    return proc.stdout.decode()


def test_embeddings_print_dimension_norm_and_head(server: Server) -> None:
    out = run(server, "run", "fake", "hello")
    vector = Client(server.url).embed("fake", "hello")
    norm = math.sqrt(sum(float(x) ** 2 for x in vector))
    assert f"dimension 8, norm {norm:.4f}" in out
    assert f"[{float(vector[0]):.4f}, {float(vector[1]):.4f}," in out
    full = json.loads(run(server, "run", "fake", "hello", "--json"))
    assert full["result"]["embeddings"] == [float(x) for x in vector]
    # `-` reads standard input; several inputs give one block each.
    piped = run(server, "run", "fake", "-", stdin="hello")
    assert f"norm {norm:.4f}" in piped
    both = run(server, "run", "fake", "hello", "other")
    assert both.count("dimension 8") == 2


def test_generation_streams_tokens(server: Server) -> None:
    streamed = run(server, "run", "chat", "say", "something", "-p", "seed=3", "-p", "max_tokens=6")
    whole = json.loads(
        run(server, "run", "chat", "say something", "--json", "-p", "seed=3", "-p", "max_tokens=6")
    )
    assert streamed == whole["result"]["text"] + "\n" and len(streamed.split()) == 6
    # No prompt and stdin not a terminal: the prompt comes from stdin.
    piped = run(server, "run", "chat", "-p", "seed=3", "-p", "max_tokens=6", stdin="say something")
    assert piped == streamed


def test_interactive_chat_keeps_the_history(server: Server) -> None:
    params = {"seed": 9, "max_tokens": 4}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "modelmora", "--url", server.url, "run", "chat", "-p", "seed=9", "-p", "max_tokens=4"],
        env=server.env | {"COLUMNS": "80", "TERM": "dumb"},
        encoding="utf-8",
        timeout=60,
    )
    try:
        child.expect("/bye to leave")
        child.expect(">>> ")
        child.sendline("hello there")
        child.expect(">>> ")
        first = child.before.splitlines()[-1].strip()
        child.sendline("and again")
        child.expect(">>> ")
        second = child.before.splitlines()[-1].strip()
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    with Client(server.url) as sdk:
        turn1 = [{"role": "user", "content": "hello there"}]
        assert sdk.infer("chat", {"messages": turn1}, params)["result"]["text"].strip() == first
        # The second turn carried the first one: its answer is that of the whole conversation.
        turn2 = [*turn1, {"role": "assistant", "content": first}, {"role": "user", "content": "and again"}]
        assert sdk.infer("chat", {"messages": turn2}, params)["result"]["text"].strip() == second
        alone = sdk.infer("chat", {"messages": turn2[-1:]}, params)["result"]["text"].strip()
    assert second != alone


def test_txt2img_writes_a_png(server: Server, tmp_path: Path) -> None:
    out = run(
        server, "run", "tiny-sd", "a cat", "-o", "cat.png",
        "-p", "width=32", "-p", "height=32", "-p", "steps=2", "-p", "seed=5",
        cwd=tmp_path,
    )  # fmt: skip
    assert "wrote cat.png" in out and "seed 5" in out
    picture = Image.open(tmp_path / "cat.png")
    assert picture.format == "PNG" and picture.size == (32, 32)


def test_img2txt_captions_an_image_file(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (200, 30, 90)).save(image, format="PNG")
    params = ["-p", "max_tokens=5", "-p", "temperature=0"]
    caption = run(server, "run", "tiny-captioner", str(image), *params)
    expected = Client(server.url).infer(
        "tiny-captioner",
        {"image": base64.b64encode(image.read_bytes()).decode()},
        {"max_tokens": 5, "temperature": 0},
    )["result"]["text"]
    assert caption == expected + "\n"
    assert run(server, "run", "tiny-captioner", "-", *params, stdin=image.read_bytes()) == caption


def test_errors_are_one_line(server: Server) -> None:
    env = server.env | {"COLUMNS": "80"}
    missing = subprocess.run(
        [*CLI, "--url", server.url, "run", "nope", "x"], env=env, capture_output=True, text=True, timeout=60
    )
    assert (
        missing.returncode == 1 and "MODEL_NOT_FOUND" in missing.stderr and "Traceback" not in missing.stderr
    )
    down = subprocess.run(
        [*CLI, "--url", "http://127.0.0.1:9", "run", "fake", "x"], env=env, capture_output=True, text=True
    )
    assert down.returncode == 1 and "no server answers" in down.stderr


def test_ps_lists_loaded_models_only_and_tables_fit_80_columns(server: Server) -> None:
    Client(server.url).load(LONG_NAME)
    Client(server.url).unload("fake")
    ps = run(server, "ps")
    assert LONG_NAME in ps and "fake" not in ps.replace(LONG_NAME, "")
    loaded = json.loads(run(server, "ps", "--json"))
    names = {m["name"] for m in loaded}
    assert LONG_NAME in names and "fake" not in names and all(m["pid"] for m in loaded)
    for args in (["ps"], ["status"], ["list"], ["health"], ["jobs"]):
        text = run(server, *args)
        assert all(len(line) <= 80 for line in text.splitlines()), (args, text)
        assert "…" not in text, (args, text)
        if args != ["jobs"]:
            assert LONG_NAME in text, (args, text)


def test_status_does_not_count_itself_and_list_json(server: Server) -> None:
    status = json.loads(run(server, "status", "--json"))
    assert status["in_flight"] == 0
    assert ", 0 in flight" in run(server, "status")
    records = json.loads(run(server, "list", "--json"))
    by_name = {r["name"]: r for r in records}
    assert by_name["tiny-sd"]["task_type"] == "txt2img" and by_name["chat"]["task_type"] == "txt2txt"
    assert LONG_NAME in by_name
