"""The declared FastAPI inference routes stay: the fast path answers inference requests
before FastAPI routes them, but only the declared routes give `/openapi.json` (and the
clients generated from it) its inference operations."""

from __future__ import annotations

import httpx

from modelmora.app import create_app
from modelmora.config import Settings
from modelmora.lifecycle.runners import in_process_runner_factory


async def test_openapi_lists_both_infer_paths(settings: Settings) -> None:
    app = create_app(settings, in_process_runner_factory)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mm") as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    for path in ("/infer/{name}", "/api/v1/infer/{name}"):
        assert path in paths, sorted(paths)
        operation = paths[path]["post"]
        assert "inference" in operation["tags"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]
        assert "200" in operation["responses"]
