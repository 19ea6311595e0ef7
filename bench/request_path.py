"""Which source files one warm REST embedding request runs through, edge to worker and back.

Not a timing benchmark: a map of the request path, for reviews of the layout. The server is
built in-process with the in-process runner (the worker core in a thread, the same modules a
worker process runs), the model is loaded and warmed, then one request is traced with
`sys.setprofile` on every thread and the modelmora files it entered are printed as a table.

    python bench/request_path.py [--model PATH]   # default: the fake embedder
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any


async def _trace(model: str | None) -> Counter[str]:
    import httpx

    from modelmora.api.rest import asgi_app
    from modelmora.app import ModelMora
    from modelmora.config import load_settings
    from modelmora.lifecycle.runners import in_process_runner_factory
    from modelmora.registry.installer import InstallRequest

    data = Path(tempfile.mkdtemp(prefix="mm-path-"))
    # The fake model is installed through the API's service: the install policy must allow it.
    roots = [str(data)] + ([model] if model is not None else [])  # model: absolute (main)
    settings = load_settings(
        overrides={
            "server": {"data_dir": str(data), "grpc_enabled": False},
            "resources": {"worker_start": "fresh"},
            "registry": {"allowed_sources": {"local_roots": roots}},
            "testing": {"allow_fake_adapter": True},
        }
    )
    touched: Counter[str] = Counter()
    root = str(Path(__import__("modelmora").__file__).parent)
    active = False

    def profile(frame: Any, event: str, _arg: Any) -> None:
        if active and event == "call" and frame.f_code.co_filename.startswith(root):
            touched[frame.f_code.co_filename[len(root) + 1 :]] += 1

    # Before anything starts a thread: the worker core's thread must carry the profiler too.
    threading.setprofile(profile)
    mm = ModelMora(settings, in_process_runner_factory)
    await mm.start()
    if model is None:
        folder = data / "fake"
        folder.mkdir()
        (folder / "weights.bin").write_bytes(b"x")
        request = InstallRequest(
            source=str(folder), name="m", task_type="txt2embed", config={"adapter": "fake"}
        )
    else:
        request = InstallRequest(source=model, name="m", task_type="txt2embed")
    await mm.registry.install(request)
    app = asgi_app(mm)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://mm") as client:
        for _ in range(3):  # load, then warm
            (await client.post("/api/v1/infer/m", json={"input_data": {"text": ["warm"]}})).raise_for_status()
        sys.setprofile(profile)
        active = True
        try:
            response = await client.post("/api/v1/infer/m", json={"input_data": {"text": ["one", "two"]}})
        finally:
            active = False
            sys.setprofile(None)
            threading.setprofile(None)  # type: ignore[arg-type]
        response.raise_for_status()
    await mm.stop()
    return touched


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="a sentence-transformers folder (default: the fake embedder)")
    args = parser.parse_args()
    touched = asyncio.run(_trace(os.path.abspath(args.model) if args.model else None))
    print(f"{'file':<40} {'calls':>6}")
    for name, calls in sorted(touched.items()):
        print(f"{name:<40} {calls:>6}")
    print(f"{len(touched)} files, {sum(touched.values())} calls")


if __name__ == "__main__":
    main()
