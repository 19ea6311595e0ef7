"""The edge's side of the hop (api/edge.py with cluster/hop.py), on the real ASGI app: a hop
with the cluster credential acts for the caller it carries, whose scope is checked again and
whose rate limit is not counted a second time; a hop without the credential is refused."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from modelmora.api.rest import asgi_app
from modelmora.app import ModelMora
from modelmora.auth.keys import BOOTSTRAP, Principal, Scope
from modelmora.cluster.hop import CLUSTER_KEY, HOP, PRINCIPAL, encode_principal
from modelmora.config import Settings
from modelmora.lifecycle.runners import in_process_runner_factory

KEY = "b" * 40
SECRET = "c" * 40


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        server={"data_dir": str(tmp_path)},  # type: ignore[arg-type]
        auth={"enabled": True, "bootstrap_key": KEY, "rate_limit": "2/minute"},  # type: ignore[arg-type]
        cluster={"secret": SECRET},  # type: ignore[arg-type]
    )
    mm = ModelMora(settings, in_process_runner_factory)
    await mm.start()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=asgi_app(mm)), base_url="http://mm"
        ) as c:
            yield c
    finally:
        await mm.stop()


def hop(caller: Principal, secret: str | None = SECRET) -> dict[str, str]:
    headers = {HOP.decode(): "peer-1", PRINCIPAL.decode(): encode_principal(caller).decode()}
    if secret is not None:
        headers[CLUSTER_KEY.decode()] = secret
    return headers


async def test_a_hop_acts_for_its_caller_and_counts_no_rate_again(http: httpx.AsyncClient) -> None:
    direct = {"authorization": f"Bearer {KEY}"}
    assert [(await http.get("/api/v1/status", headers=direct)).status_code for _ in range(3)] == [
        200,
        200,
        429,
    ]
    # the same caller, carried by a peer that has counted it already: not limited here
    assert [(await http.get("/api/v1/status", headers=hop(BOOTSTRAP))).status_code for _ in range(4)] == [
        200
    ] * 4


async def test_a_hop_is_checked(http: httpx.AsyncClient) -> None:
    for headers in (hop(BOOTSTRAP, secret=None), hop(BOOTSTRAP, secret="x" * 40)):
        refused = await http.get("/api/v1/status", headers=headers)
        assert refused.status_code == 401 and refused.json()["error_code"] == "UNAUTHORIZED"
    # the carried caller's scope, checked again: an infer key cannot read the admin status
    infer_only = Principal("k1", "ci", frozenset({Scope.INFER}))
    forbidden = await http.get("/api/v1/status", headers=hop(infer_only))
    assert forbidden.status_code == 403 and forbidden.json()["error_code"] == "FORBIDDEN"
    garbled = {**hop(BOOTSTRAP), PRINCIPAL.decode(): "%%%"}
    assert (await http.get("/api/v1/status", headers=garbled)).status_code == 401
