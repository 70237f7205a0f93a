"""The web console's server side: login with the admin key, the session cookie and its
expiry, CSRF on state-changing calls, the redacted config, the playground's route, and a
console call while the request log store is unavailable (a clear 503; nothing lost)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path

from aiohttp.test_utils import TestClient

from router.app import create_app
from router.auth import ADMIN_SESSION
from router.config import AuthConfig, Config
from router.console import SESSIONS
from router.console.session import COOKIE, CSRF_HEADER, LOGIN_FAILURES, Sessions
from router.reload import CONFIG_LOADER, apply_config
from tests.router.console_fixtures import ADMIN_KEY, CLIENT_KEY, console_config
from tests.router.helpers import FakeUpstream

SECRETS = (ADMIN_KEY, CLIENT_KEY, "sk-one-123456789", "ak-one-123456789", "gk-one-123456789")


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def serve(aiohttp_client, cfg: Config, clock: Clock | None = None) -> TestClient:
    app = create_app(cfg)
    sessions = Sessions(b"test-secret", ttl_s=3600, clock=clock or time.time)
    app[SESSIONS] = sessions
    app[ADMIN_SESSION] = sessions.check
    return await aiohttp_client(app)


async def login(client: TestClient) -> str:
    """Logs in; returns the CSRF token (the cookie stays in the client's jar)."""
    resp = await client.post("/ui/login", json={"admin_key": ADMIN_KEY})
    assert resp.status == 200, await resp.text()
    return (await resp.json())["csrf"]


def error_of(body: dict) -> str:
    return body["error"]["message"]


async def test_login_sets_a_strict_http_only_session_cookie(aiohttp_client, fake, tmp_path):
    client = await serve(aiohttp_client, console_config(fake.base_url, tmp_path / "log.db"))
    resp = await client.post("/ui/login", json={"admin_key": ADMIN_KEY})
    assert resp.status == 200
    cookie = resp.headers["Set-Cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    for flag in ("HttpOnly", "SameSite=Strict", "Max-Age=3600", "Path=/"):
        assert flag in cookie
    assert ADMIN_KEY not in cookie
    csrf = (await resp.json())["csrf"]
    # The admin API takes the cookie instead of the key; the page gets the CSRF token back.
    resp = await client.get("/admin/keys")
    assert resp.status == 200
    assert {k["id"] for k in (await resp.json())["keys"]} == {
        "oai/0",
        "claude/0",
        "claude/1",
        "gem/0",
    }
    assert (await (await client.get("/ui/api/session")).json())["csrf"] == csrf


async def test_a_wrong_admin_key_gets_a_clear_401_and_no_cookie(aiohttp_client, fake, tmp_path):
    client = await serve(aiohttp_client, console_config(fake.base_url, tmp_path / "log.db"))
    resp = await client.post("/ui/login", json={"admin_key": "guess"})
    assert resp.status == 401
    assert error_of(await resp.json()) == "wrong admin key"
    assert "Set-Cookie" not in resp.headers
    resp = await client.post("/ui/login", data={"admin_key": ""})
    assert resp.status == 400
    assert error_of(await resp.json()) == "admin_key: enter the router's admin key"
    deep = "[" * 100_000 + "]" * 100_000
    resp = await client.post("/ui/login", data=deep, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert error_of(await resp.json()) == "request body is nested too deeply"
    resp = await client.get("/ui/api/session")
    assert resp.status == 401
    assert error_of(await resp.json()) == "not logged in"
    resp = await client.get("/admin/keys")
    assert resp.status == 401


async def test_guessing_the_admin_key_is_throttled(aiohttp_client, fake, tmp_path):
    client = await serve(aiohttp_client, console_config(fake.base_url, tmp_path / "log.db"))
    for _ in range(LOGIN_FAILURES):
        assert (await client.post("/ui/login", json={"admin_key": "guess"})).status == 401
    # Even the right key waits now: a guesser cannot tell which of its tries was right.
    resp = await client.post("/ui/login", json={"admin_key": ADMIN_KEY})
    assert resp.status == 429
    wait = int(resp.headers["Retry-After"])
    assert 50 <= wait <= 60  # the first failure ages out a minute after it
    assert error_of(await resp.json()) == (
        f"too many wrong admin keys from this address: try again in {wait} s"
    )


async def test_the_console_is_off_without_an_admin_key(aiohttp_client, fake, tmp_path):
    cfg = console_config(fake.base_url, tmp_path / "log.db")
    cfg.auth.admin_digest = None
    client = await serve(aiohttp_client, cfg)
    resp = await client.post("/ui/login", json={"admin_key": ADMIN_KEY})
    assert resp.status == 403
    assert error_of(await resp.json()) == "the console is disabled: set auth.admin_key"


async def test_an_expired_session_must_log_in_again(aiohttp_client, fake, tmp_path):
    clock = Clock()
    client = await serve(aiohttp_client, console_config(fake.base_url, tmp_path / "log.db"), clock)
    await login(client)
    clock.now += 3599
    assert (await client.get("/admin/keys")).status == 200
    clock.now += 2
    resp = await client.get("/admin/keys")
    assert resp.status == 401
    assert error_of(await resp.json()) == "the console session has expired: log in again"
    resp = await client.get("/ui/api/session")
    assert resp.status == 401
    await login(client)
    assert (await client.get("/admin/keys")).status == 200


async def test_a_forged_or_tampered_cookie_is_refused(aiohttp_client, fake, tmp_path):
    client = await serve(aiohttp_client, console_config(fake.base_url, tmp_path / "log.db"))
    await login(client)
    value = client.session.cookie_jar.filter_cookies(client.make_url("/"))[COOKIE].value
    data, _, signature = value.rpartition(".")
    session = json.loads(base64.urlsafe_b64decode(data))
    session["exp"] += 10**6  # a longer session, same signature
    longer = base64.urlsafe_b64encode(json.dumps(session).encode()).decode()
    other = Sessions(b"another-secret").issue(b"\0" * 32)[0]
    for forged in (f"{longer}.{signature}", other, "garbage"):
        resp = await client.get("/admin/keys", cookies={COOKIE: forged})
        assert resp.status == 401, forged
        assert error_of(await resp.json()) == "invalid console session: log in again"


async def test_a_new_admin_key_ends_every_session(aiohttp_client, fake, tmp_path):
    cfg = console_config(fake.base_url, tmp_path / "log.db")
    client = await serve(aiohttp_client, cfg)
    await login(client)
    new = console_config(fake.base_url, tmp_path / "log.db")
    new.auth = AuthConfig(admin_key="another-admin-key-0123456789")
    apply_config(client.app, new)
    resp = await client.get("/admin/keys")
    assert resp.status == 401
    assert error_of(await resp.json()) == "invalid console session: log in again"


async def test_state_changing_calls_need_the_csrf_token(aiohttp_client, fake, tmp_path):
    client = await serve(aiohttp_client, console_config(fake.base_url, tmp_path / "log.db"))
    csrf = await login(client)
    url = "/admin/keys/claude/1/disable"
    for headers in ({}, {CSRF_HEADER: "forged"}):
        resp = await client.post(url, json={"reason": "csrf"}, headers=headers)
        assert resp.status == 403
        assert "X-CSRF-Token" in error_of(await resp.json())
    keys = (await (await client.get("/admin/keys")).json())["keys"]
    assert {k["id"]: k["state"] for k in keys}["claude/1"] == "active"
    resp = await client.post(url, json={"reason": "rotating"}, headers={CSRF_HEADER: csrf})
    assert resp.status == 200
    assert (await resp.json())["state"] == "disabled"
    assert (await resp.json())["reason"] == "rotating"
    resp = await client.post("/admin/keys/claude/1/enable", headers={CSRF_HEADER: csrf})
    assert (await resp.json())["state"] == "active"
    # The admin key itself still works without a session or token.
    resp = await client.post(url, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert resp.status == 200


async def test_config_reload_from_the_console_shows_validation_errors(
    aiohttp_client, fake, tmp_path
):
    cfg = console_config(fake.base_url, tmp_path / "log.db")
    app = create_app(cfg)
    bad = {"providers": {}, "models": {"m": [{"provider": "nowhere", "model": "x"}]}}
    app[CONFIG_LOADER] = lambda: Config.from_dict(bad)
    client = await aiohttp_client(app)
    csrf = await login(client)
    resp = await client.post("/admin/reload", headers={CSRF_HEADER: csrf})
    assert resp.status == 400
    assert error_of(await resp.json()) == (
        "reload failed, the running config is kept: "
        "models.m[0].provider: unknown provider 'nowhere'"
    )


async def test_the_config_page_shows_no_secret(aiohttp_client, fake, tmp_path):
    cfg = console_config(fake.base_url, tmp_path / "log.db")
    cfg.providers["oai"].headers = {"Proxy-Authorization": "Bearer proxy-token-42"}
    client = await serve(aiohttp_client, cfg)
    await login(client)
    resp = await client.get("/admin/config")
    text = await resp.text()
    for secret in SECRETS:
        assert secret not in text
    assert "proxy-token-42" not in text
    body = json.loads(text)
    assert body["providers"]["claude"]["keys"] == ["ak-...6789", "ak-...6789"]
    assert body["providers"]["oai"]["headers"] == {"Proxy-Authorization": "[redacted]"}
    assert body["auth"] == {
        "client_keys": [
            {"name": "team-a", "models": ["*"]},
            {"name": "team-b", "models": ["claude"]},
        ],
        "admin_key": "set",
    }
    assert body["models"]["gpt"] == [{"provider": "oai", "model": "gpt-up"}]


async def test_the_page_loads_without_client_keys_and_sets_a_csp(aiohttp_client, fake, tmp_path):
    client = await serve(aiohttp_client, console_config(fake.base_url, tmp_path / "log.db"))
    resp = await client.get("/ui")
    assert resp.status == 200
    page = await resp.text()
    assert '<script src="/ui/static/console.js"' in page
    # Nothing from another origin: every asset is the router's own.
    assert "http://" not in page and "https://" not in page
    assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
    for asset in ("console.js", "console.css"):
        assert (await client.get(f"/ui/static/{asset}")).status == 200


async def test_the_playground_chats_as_the_console_client(aiohttp_client, fake, tmp_path):
    client = await serve(aiohttp_client, console_config(fake.base_url, tmp_path / "log.db"))
    body = {"model": "claude", "messages": [{"role": "user", "content": "hi"}]}
    resp = await client.post("/ui/api/chat/completions", json=body)
    assert resp.status == 401
    assert error_of(await resp.json()) == "missing or invalid admin key"
    csrf = await login(client)
    assert (await client.post("/ui/api/chat/completions", json=body)).status == 403
    resp = await client.post("/ui/api/chat/completions", json=body, headers={CSRF_HEADER: csrf})
    assert resp.status == 200
    assert (await resp.json())["choices"][0]["message"]["content"] == "hello"
    request_id = resp.headers["x-request-id"]
    row = await logged(client, request_id)
    assert (row["client"], row["model"], row["provider"], row["status"]) == (
        "console",
        "claude",
        "claude",
        200,
    )


async def logged(client: TestClient, request_id: str) -> dict:
    """The request log's row of a request, once flushed."""
    for _ in range(100):
        resp = await client.get("/admin/requests", params={"request_id": request_id})
        rows = (await resp.json())["requests"]
        if rows:
            return rows[0]
        await asyncio.sleep(0.02)
    raise AssertionError(f"request {request_id} never reached the log")


async def test_store_unavailable_clear_message_and_nothing_lost(
    aiohttp_client, fake: FakeUpstream, tmp_path: Path
):
    """The log's directory is missing (a volume not mounted yet): requests are served, the
    console says why it has no log, and once the store is back every request is in it."""
    folder = tmp_path / "not-mounted"
    client = await serve(aiohttp_client, console_config(fake.base_url, folder / "log.db"))
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
    chat = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}
    ids = []
    for _ in range(5):
        resp = await client.post("/v1/chat/completions", json=chat, headers=auth)
        assert resp.status == 200
        ids.append(resp.headers["x-request-id"])
    await login(client)
    await asyncio.sleep(0.2)  # a few failed flushes
    for path in ("/admin/requests", "/admin/stats"):
        resp = await client.get(path)
        assert resp.status == 503
        message = error_of(await resp.json())
        assert message.startswith("the request log store is unavailable (unable to open")
        assert message.endswith("5 requests are buffered and will be written when it is back")
    # The rest of the console works meanwhile.
    assert (await client.get("/admin/keys")).status == 200
    folder.mkdir()
    for _ in range(100):
        resp = await client.get("/admin/requests")
        if resp.status == 200:
            break
        await asyncio.sleep(0.05)
    page = await resp.json()
    assert page["store"] == {"available": True, "error": None, "pending": 0, "dropped": 0}
    assert sorted(r["request_id"] for r in page["requests"]) == sorted(ids)
