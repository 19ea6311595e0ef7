"""`modelmora run MODEL [INPUT...]`: one inference against the running server, shaped by the
model's task (as `ollama run`): embeddings print their dimension, norm and first figures;
txt2txt streams its tokens, or opens a chat on a terminal when no prompt is given; txt2img
writes PNG files; img2txt captions image files. `-` as an INPUT reads standard input.

The SDK over REST does the work, so this runs on the base install (no server library).
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer

from modelmora.cli.common import app, context, err, out

if TYPE_CHECKING:  # imported when `run` runs: loading the SDK loads grpc, which no other command needs
    from modelmora.client.rest_client import Client

HEAD = 8  # figures of a vector shown without --json
BYE = "/bye"


def _client(ctx: typer.Context) -> Client:
    from modelmora.client.rest_client import Client

    cli = context(ctx)
    # --api-key (or MODELMORA_API_KEY) for a server that checks keys, as the other commands.
    return Client(cli.server_url(cli.settings()), api_key=cli.api_key, timeout=600)


def _read_stdin_text() -> str:
    return sys.stdin.read()


def _texts(inputs: list[str]) -> list[str]:
    return [_read_stdin_text() if item == "-" else item for item in inputs]


def _image(item: str) -> str:
    data = sys.stdin.buffer.read() if item == "-" else Path(item).expanduser().read_bytes()
    return base64.b64encode(data).decode("ascii")


def _params(values: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for raw in values:
        key, sep, value = raw.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{raw!r}: use key=value", param_hint="--param")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


def _dump(body: Any) -> None:
    def plain(value: Any) -> Any:
        if hasattr(value, "tolist"):  # numpy arrays from the SDK
            return value.tolist()
        raise TypeError(type(value).__name__)

    sys.stdout.write(json.dumps(body, indent=2, default=plain) + "\n")


# -- each task -------------------------------------------------------------------------------


def _embeddings(
    client: Client, model: str, task: str, inputs: list[str], params: dict[str, Any], as_json: bool
) -> None:
    if not inputs:
        raise typer.BadParameter("give a text (or an image file for img2embed), or - for stdin")
    if task == "img2embed":
        values: list[str] = [_image(i) for i in inputs]
        input_data: dict[str, Any] = {"image": values[0] if len(values) == 1 else values}
    else:
        texts = _texts(inputs)
        input_data = {"text": texts[0] if len(texts) == 1 else texts}
    response = client.infer(model, input_data, params or None)
    if as_json:
        _dump(response)
        return
    vectors = response["result"]["embeddings"]
    rows = [vectors] if getattr(vectors, "ndim", 1) == 1 else list(vectors)
    for label, vector in zip(inputs, rows, strict=True):
        figures = [float(x) for x in vector]
        norm = math.sqrt(sum(x * x for x in figures))
        head = ", ".join(f"{x:.4f}" for x in figures[:HEAD])
        more = ", …" if len(figures) > HEAD else ""
        if len(rows) > 1:
            out.print(f"[bold]{label if label != '-' else 'stdin'}[/]", highlight=False)
        out.print(f"dimension {len(figures)}, norm {norm:.4f}", highlight=False)
        out.print(f"[{head}{more}]", highlight=False)


def _stream(
    client: Client, model: str, input_data: dict[str, Any], params: dict[str, Any], sink: TextIO
) -> str:
    """Print tokens as they arrive; the whole text."""
    text = ""
    for event in client.generate_stream(model, input_data, params or None):
        if event["event"] == "token":
            piece = str(event["data"].get("text", ""))
            text += piece
            sink.write(piece)
            sink.flush()
        elif event["event"] == "done":
            result = event["data"]["result"]
            final = result.get("text")
            if isinstance(final, str) and final.startswith(text):  # a tail not sent as tokens
                sink.write(final[len(text) :])
                text = final
    sink.write("\n")
    sink.flush()
    return text


def _chat(client: Client, model: str, params: dict[str, Any]) -> None:
    """A conversation on the terminal: the whole history goes with each turn."""
    from modelmora.client.errors import ApiError

    with contextlib.suppress(ImportError):  # line editing and arrow-key history where it exists
        import readline  # noqa: F401
    out.print(f"chatting with {model}; {BYE} to leave", highlight=False)
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            break
        prompt = line.strip()
        if prompt == BYE:
            break
        if not prompt:
            continue
        history.append({"role": "user", "content": prompt})
        try:
            answer = _stream(client, model, {"messages": history}, params, sys.stdout)
        except ApiError as exc:  # one turn failed (too long, a timeout): the chat goes on
            history.pop()
            err.print(f"error: {exc.error_code}: {exc.message}", highlight=False)
            continue
        history.append({"role": "assistant", "content": answer.strip()})


def _generate(client: Client, model: str, inputs: list[str], params: dict[str, Any], as_json: bool) -> None:
    if not inputs:
        if sys.stdin.isatty() and not as_json:
            _chat(client, model, params)
            return
        inputs = ["-"]
    prompt = " ".join(_texts(inputs))
    if as_json:
        _dump(client.infer(model, {"text": prompt}, params or None))
        return
    _stream(client, model, {"text": prompt}, params, sys.stdout)


def _images(
    client: Client, model: str, inputs: list[str], params: dict[str, Any], output: Path | None, as_json: bool
) -> None:
    if not inputs:
        raise typer.BadParameter("give a prompt, or - for stdin")
    response = client.infer(model, {"text": " ".join(_texts(inputs))}, params or None)
    if as_json:
        _dump(response)
        return
    target = output or Path("out.png")
    images = response["result"]["images"]
    for i, image in enumerate(images):
        path = target if len(images) == 1 else target.with_stem(f"{target.stem}-{i + 1}")
        if "b64_json" in image:
            data = base64.b64decode(image["b64_json"])
        else:
            data = client.download_result(str(image["url"]).rstrip("/").rsplit("/", 1)[-1])
        path.write_bytes(data)
        out.print(
            f"wrote {path} ({len(data):,} bytes, seed {response['result'].get('seed')})", highlight=False
        )


def _caption(client: Client, model: str, inputs: list[str], params: dict[str, Any], as_json: bool) -> None:
    if not inputs:
        raise typer.BadParameter("give an image file, or - for stdin")
    images = [_image(i) for i in inputs]
    response = client.infer(model, {"image": images[0] if len(images) == 1 else images}, params or None)
    if as_json:
        _dump(response)
        return
    texts = response["result"]["text"]
    for label, text in zip(inputs, [texts] if isinstance(texts, str) else texts, strict=True):
        out.print(f"{label}: {text}" if len(images) > 1 else text, highlight=False)


@app.command("run")
def run_model(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model name")],
    inputs: Annotated[
        list[str] | None,
        typer.Argument(help="Texts, a prompt, or image files (by the model's task); - reads stdin"),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="txt2img: the PNG to write")] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="A parameter, key=value (JSON values)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The whole response, as JSON")] = False,
) -> None:
    """Run a model once on the running server (with no prompt on a terminal, txt2txt chats)."""
    from modelmora.client.errors import ApiError, TransportError

    params = _params(param or [])
    items = list(inputs or [])
    client = _client(ctx)
    try:
        task = client.models.get(model)["task_type"]
        if task in ("txt2embed", "img2embed"):
            _embeddings(client, model, task, items, params, as_json)
        elif task == "txt2txt":
            _generate(client, model, items, params, as_json)
        elif task == "txt2img":
            _images(client, model, items, params, output, as_json)
        elif task == "img2txt":
            _caption(client, model, items, params, as_json)
        else:  # pragma: no cover - a task this CLI does not know yet
            _dump(client.infer(model, {"text": " ".join(_texts(items))}, params or None))
    except TransportError:
        err.print(f"error: no server answers at {client._http.base_url}", highlight=False)
        raise typer.Exit(1) from None
    except ApiError as exc:
        err.print(f"error: {exc.error_code}: {exc.message}", highlight=False)
        raise typer.Exit(1) from None
    except OSError as exc:
        err.print(f"error: {exc}", highlight=False)
        raise typer.Exit(1) from None
    finally:
        client.close()
