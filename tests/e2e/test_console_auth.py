"""The console's sign-in against a server that checks keys: an API key exchanged for a signed
HttpOnly SameSite=Strict cookie, CSRF tokens on calls that change state, scopes, revocation,
logout; and the same in a real browser (wrong key refused, no admin buttons for `infer`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import make_fake_model
from tests.e2e.conftest import Server, clean_env, cli, start_server
from tests.e2e.test_console import CHROMIUM, Watched, _browser_or_skip

SECRET = "console-session-secret-" + "s" * 20


@pytest.fixture(scope="module")
def keyed(module_tmp: Path) -> Iterator[tuple[Server, dict[str, str]]]:
    data = module_tmp / "data"
    env = clean_env(data)
    cli(env, "install", str(make_fake_model(module_tmp / "fake")))
    tokens = {
        name: cli(env, "keys", "create", f"{name}-key", "--scope", scope).stdout.strip()
        for name, scope in (("infer", "infer"), ("admin", "admin"), ("doomed", "admin"))
    }
    srv = start_server(
        data,
        module_tmp / "server.log",
        MODELMORA_AUTH__ENABLED="true",
        MODELMORA_AUTH__CACHE_SECONDS="0",  # a revocation shows at once
        MODELMORA_AUTH__SESSION_SECRET=SECRET,
    )
    yield srv, tokens
    srv.stop()


def signed_in(server: Server, token: str) -> tuple[httpx.Client, dict[str, Any]]:
    """A client holding the session cookie of `token`, and the session document."""
    client = httpx.Client(base_url=server.url, timeout=30)
    r = client.post("/ui/login", json={"api_key": token})
    assert r.status_code == 200, r.text
    return client, r.json()


def test_the_page_is_open_and_the_api_is_not(keyed: tuple[Server, dict[str, str]]) -> None:
    server, _ = keyed
    anonymous = httpx.Client(base_url=server.url)
    assert anonymous.get("/", follow_redirects=False).status_code == 307
    assert anonymous.get("/ui").status_code == 200
    assert anonymous.get("/ui/static/console.js").status_code == 200
    assert anonymous.get("/ui/session").json()["signed_in"] is False
    assert anonymous.get("/api/v1/stats").status_code == 401
    wrong = anonymous.post("/ui/login", json={"api_key": "mm_000000000000_" + "x" * 43})
    assert wrong.status_code == 401 and wrong.json()["error_code"] == "UNAUTHORIZED"
    assert "set-cookie" not in wrong.headers


def test_an_admin_session(keyed: tuple[Server, dict[str, str]]) -> None:
    server, tokens = keyed
    raw = httpx.post(server.url + "/ui/login", json={"api_key": tokens["admin"]})
    cookie = raw.headers["set-cookie"]
    for attribute in ("mm_console=", "HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="):
        assert attribute in cookie
    assert tokens["admin"] not in cookie  # the key itself is never in the cookie

    client, session = signed_in(server, tokens["admin"])
    assert session["admin"] is True and session["name"] == "admin-key" and session["csrf"]
    assert client.get("/ui/session").json()["csrf"] == session["csrf"]
    assert client.get("/api/v1/status").status_code == 200
    # A call that changes state needs the CSRF token as well as the cookie.
    refused = client.post("/api/v1/models/fake/load")
    assert refused.status_code == 403 and "CSRF" in refused.json()["message"]
    wrong = client.post("/api/v1/models/fake/load", headers={"x-csrf-token": "nope"})
    assert wrong.status_code == 403
    loaded = client.post("/api/v1/models/fake/load", headers={"x-csrf-token": session["csrf"]})
    assert loaded.status_code == 200 and loaded.json()["state"] == "ready"

    # A tampered cookie is no session at all.
    forged = httpx.Client(base_url=server.url)
    value = client.cookies["mm_console"]
    forged.cookies.set("mm_console", value[:-3] + ("AAA" if not value.endswith("AAA") else "BBB"))
    assert forged.get("/api/v1/status").status_code == 401

    # Logging out drops the cookie.
    out = client.post("/ui/logout")
    assert "Max-Age=0" in out.headers["set-cookie"]
    assert client.get("/api/v1/status").status_code == 401
    assert client.get("/ui/session").json()["signed_in"] is False


def test_an_infer_session_reads_but_does_not_administer(keyed: tuple[Server, dict[str, str]]) -> None:
    server, tokens = keyed
    client, session = signed_in(server, tokens["infer"])
    assert session["admin"] is False and session["scopes"] == ["infer"]
    assert client.get("/api/v1/stats").status_code == 200
    assert client.get("/api/v1/models").status_code == 200
    assert client.get("/api/v1/status").status_code == 403
    headers = {"x-csrf-token": session["csrf"]}
    assert client.post("/api/v1/models/fake/unload", headers=headers).status_code == 403
    assert client.post("/infer/fake", json={"text": "x"}, headers=headers).status_code == 200


def test_a_revoked_key_ends_its_sessions(keyed: tuple[Server, dict[str, str]]) -> None:
    server, tokens = keyed
    client, _ = signed_in(server, tokens["doomed"])
    assert client.get("/api/v1/status").status_code == 200
    key_id = tokens["doomed"].split("_")[1]
    cli(server.env, "keys", "revoke", key_id)
    gone = client.get("/api/v1/status")
    assert gone.status_code == 401 and "revoked" in gone.json()["message"]
    assert client.get("/ui/session").json()["signed_in"] is False


# -- in a browser ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def sign_in(page: Any, token: str) -> None:
    page.fill("#api-key", token)
    page.click("#login button[type=submit]")


def test_a_wrong_key_is_refused_in_the_browser(keyed: tuple[Server, dict[str, str]], browser: Any) -> None:
    server, _ = keyed
    watched = Watched(browser, 1280, 800)
    page = watched.page
    page.goto(server.url + "/ui")
    page.wait_for_selector("#login-view:not([hidden])")
    sign_in(page, "mm_000000000000_" + "y" * 43)
    page.wait_for_selector("#login-error:not([hidden])")
    assert "not valid" in page.inner_text("#login-error")
    assert page.is_hidden("#console-view")
    page.close()


def test_an_infer_key_sees_no_admin_buttons(keyed: tuple[Server, dict[str, str]], browser: Any) -> None:
    server, tokens = keyed
    watched = Watched(browser, 1280, 800)
    page = watched.page
    page.goto(server.url + "/ui")
    page.wait_for_selector("#login-view:not([hidden])")
    sign_in(page, tokens["infer"])
    page.wait_for_selector("tr[data-model='fake']")
    assert page.inner_text("#who") == "infer-key (infer)"
    assert page.query_selector_all("button[data-action]") == []
    # It reloads into the same session: the cookie, not the key, is kept.
    page.reload()
    page.wait_for_selector("tr[data-model='fake']")
    assert watched.errors == [] and watched.failed == []
    page.close()


def test_an_admin_key_loads_a_model_and_logs_out(keyed: tuple[Server, dict[str, str]], browser: Any) -> None:
    server, tokens = keyed
    admin = httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {tokens['admin']}"})
    admin.post("/api/v1/models/fake/unload", params={"force": "true"})
    watched = Watched(browser, 1280, 800)
    page = watched.page
    page.goto(server.url + "/ui")
    page.wait_for_selector("#login-view:not([hidden])")
    sign_in(page, tokens["admin"])
    page.wait_for_selector("tr[data-model='fake'] button[data-action='load']")
    page.click("tr[data-model='fake'] button[data-action='load']")  # carries the CSRF token
    page.wait_for_selector("tr[data-model='fake'][data-state='ready']", timeout=60_000)
    assert page.inner_text("#who") == "admin-key (admin)"
    page.click("#logout")
    page.wait_for_selector("#login-view:not([hidden])")
    assert watched.errors == [] and watched.failed == []
    page.close()
