"""The web console and the figures it draws: `/ui` in a real browser (Debian's chromium driven
by Playwright), and `GET /api/v1/stats` with its gRPC and SDK counterparts."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from modelmora.client import Client, GrpcClient, InvalidRequestError
from modelmora.v1 import modelmora_pb2 as pb
from modelmora.v1 import modelmora_pb2_grpc as pb_grpc
from tests.conftest import make_fake_model
from tests.e2e.conftest import Server, clean_env, cli, start_server

CHROMIUM = "/usr/bin/chromium"
LONG_NAME = "all-MiniLM-L6-v2-long-name-model"
DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture(scope="module")
def server(module_tmp: Path) -> Iterator[Server]:
    data = module_tmp / "data"
    env = clean_env(data)
    cli(env, "install", str(make_fake_model(module_tmp / "fake", per_item_ms=2)))
    cli(env, "install", str(make_fake_model(module_tmp / LONG_NAME)))
    cli(env, "install", str(make_fake_model(module_tmp / "chat", task_type="txt2txt", step_ms=1)))
    # A RAM budget: the console draws each worker's memory against it.
    srv = start_server(data, module_tmp / "server.log", MODELMORA_RESOURCES__MAX_MEMORY_MB="1024")
    yield srv
    srv.stop()


def traffic(server: Server, model: str = "fake", n: int = 20) -> None:
    for i in range(n):
        assert server.client.post(f"/infer/{model}", json={"text": f"t{i}"}).status_code == 200


# -- the page and its files ----------------------------------------------------------------------


def test_root_redirects_and_every_file_is_served_locally(server: Server) -> None:
    root = server.client.get("/", follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/ui"
    page = server.client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    html = page.text
    assert "http://" not in html and "https://" not in html  # no CDN
    for asset in ("/ui/static/console.js", "/ui/static/console.css", "/ui/static/vendor/uPlot.iife.min.js"):
        assert asset in html
        r = server.client.get(asset)
        assert r.status_code == 200 and r.content
        again = server.client.get(asset, headers={"if-none-match": r.headers["etag"]})
        assert again.status_code == 304
    assert "MIT" in server.client.get("/ui/static/vendor/uPlot.LICENSE.txt").text
    missing = server.client.get("/ui/static/../../app.py")
    assert missing.status_code == 404 and missing.json()["error_code"] == "NOT_FOUND"
    session = server.client.get("/ui/session").json()
    assert session == {"auth": False, "signed_in": True, "name": None, "admin": True, "csrf": None}


# -- the figures -------------------------------------------------------------------------------


def test_stats_over_rest_grpc_and_the_sdk(server: Server) -> None:
    traffic(server)
    assert server.client.post("/infer/fake", json={"text": "fail:x"}).status_code >= 400
    body = server.client.get("/api/v1/stats", params={"window": 60}).json()
    assert body["window_seconds"] == 60 and body["step_seconds"] == 5
    assert len(body["timestamps"]) == 12 and body["timestamps"] == sorted(body["timestamps"])
    fake = next(m for m in body["models"] if m["name"] == "fake")
    assert fake["totals"]["requests"] >= 21 and fake["totals"]["errors"] >= 1
    assert fake["totals"]["batch_size"] >= 1 and fake["totals"]["p50_ms"] > 0
    assert sum(fake["requests_per_second"]) > 0
    assert any(v is not None for v in fake["p99_ms"])
    for series in ("requests_per_second", "errors_per_second", "p50_ms", "p90_ms", "p99_ms", "batch_size"):
        assert len(fake[series]) == 12

    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    stub = pb_grpc.ManagementServiceStub(channel)
    message = stub.GetStats(pb.GetStatsRequest(window_seconds=60))
    grpc_fake = next(m for m in message.models if m.name == "fake")
    assert grpc_fake.totals.requests >= fake["totals"]["requests"]
    assert any(math.isnan(v) for v in grpc_fake.p50_ms)  # slots without a request
    assert stub.GetStats(pb.GetStatsRequest()).window_seconds == 300  # 0: the default
    with pytest.raises(grpc.RpcError) as refused:
        stub.GetStats(pb.GetStatsRequest(window_seconds=5))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    channel.close()

    for sdk in (Client(server.url), GrpcClient(f"127.0.0.1:{server.grpc_port}")):
        with sdk:
            stats = sdk.stats(60)
            names = {m["name"] for m in stats["models"]}
            assert "fake" in names and len(stats["timestamps"]) == 12
            gaps = next(m for m in stats["models"] if m["name"] == "fake")["p50_ms"]
            assert None in gaps  # the same shape over both transports: null, not NaN
            with pytest.raises(InvalidRequestError):
                sdk.stats(100_000)


def test_the_window_is_validated_over_rest(server: Server) -> None:
    for bad in ("0", "9", "901", "abc"):
        r = server.client.get("/api/v1/stats", params={"window": bad})
        assert r.status_code == 422 and r.json()["error_code"] == "VALIDATION_ERROR"
    assert server.client.get("/api/v1/stats").json()["window_seconds"] == 300


def test_status_does_not_count_its_own_request(server: Server) -> None:
    assert server.client.get("/api/v1/status").json()["in_flight"] == 0
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    status = pb_grpc.ManagementServiceStub(channel).GetSystemStatus(pb.GetSystemStatusRequest())
    assert status.in_flight == 0
    channel.close()


# -- in a browser ------------------------------------------------------------------------------


def _browser_or_skip() -> Any:
    """Playwright's sync API with Debian's chromium; skipped where either is missing, unless
    MODELMORA_REQUIRE_BROWSER=1 (CI: `.ci/run` installs chromium)."""
    required = os.environ.get("MODELMORA_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            raise
        pytest.skip("playwright is not installed (the test extra)")
    if not Path(CHROMIUM).exists():
        if required:
            raise AssertionError(f"{CHROMIUM} missing: apt-get install chromium")
        pytest.skip("chromium is not installed")
    return sync_playwright


class Watched:
    """A page whose console errors and failed requests are collected."""

    def __init__(self, browser: Any, width: int, height: int) -> None:
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.errors: list[str] = []
        self.failed: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("requestfailed", lambda r: self.failed.append(f"{r.url} {r.failure}"))
        self.page.on(
            "response", lambda r: self.failed.append(f"{r.status} {r.url}") if r.status >= 400 else None
        )

    def points(self, chart: str) -> int:
        return int(self.page.get_attribute(f"#{chart}", "data-points") or 0)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def test_the_console_in_a_browser(server: Server, browser: Any, tmp_path: Path) -> None:
    watched = Watched(browser, 1280, 800)
    page = watched.page
    page.goto(server.url + "/")
    assert page.url == server.url + "/ui"
    # Every installed model is listed, names whole; none is loaded yet.
    page.wait_for_selector(f"tr[data-model='{LONG_NAME}']")
    assert page.inner_text(f"tr[data-model='{LONG_NAME}'] td.name") == LONG_NAME
    assert page.get_attribute(f"tr[data-model='{LONG_NAME}']", "data-state") == "registered"

    # The load button turns the model's state to ready.
    page.click(f"tr[data-model='{LONG_NAME}'] button[data-action='load']")
    page.wait_for_selector(f"tr[data-model='{LONG_NAME}'][data-state='ready']", timeout=60_000)
    assert page.is_visible(f"tr[data-model='{LONG_NAME}'] button[data-action='unload']")
    assert page.is_visible(f"tr[data-model='{LONG_NAME}'] .bar")  # its RSS against the budget
    assert "of 1.0 GiB budget" in page.inner_text("#memory")

    # After traffic, the charts get points.
    traffic(server, LONG_NAME, 30)
    page.wait_for_function(
        "Number(document.getElementById('chart-rate').dataset.points || 0) > 0", timeout=30_000
    )
    page.wait_for_function(
        "Number(document.getElementById('chart-latency').dataset.points || 0) > 0", timeout=30_000
    )
    assert watched.points("chart-batch") > 0

    # Recent async jobs with their status.
    job = server.client.post("/api/v1/infer/chat/async", json={"input_data": {"text": "a job"}}).json()
    page.wait_for_selector(f"tr[data-job='{job['job_id']}']", timeout=30_000)

    shot = tmp_path / "console.png"
    page.screenshot(path=str(shot))
    if os.environ.get("MODELMORA_UPDATE_SCREENSHOT") == "1":  # refresh the one in docs/
        shutil.copy(shot, DOCS / "console.png")
    assert watched.errors == [] and watched.failed == []
    page.close()


def test_the_console_at_phone_width(server: Server, browser: Any) -> None:
    watched = Watched(browser, 390, 844)
    page = watched.page
    page.goto(server.url + "/ui")
    row = page.wait_for_selector("tr[data-model='fake']")
    assert row is not None
    # Nothing wider than the screen but the tables' own scroll boxes.
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390
    name = page.query_selector(f"tr[data-model='{LONG_NAME}'] td.name")
    assert name is not None and name.inner_text() == LONG_NAME
    assert watched.errors == [] and watched.failed == []
    page.close()
