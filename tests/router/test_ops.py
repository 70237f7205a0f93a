"""Operations: request ids, /health, /metrics, the admin API, upstream timeouts, keep-alives,
cancellation on disconnect, secrets kept out of every output, and the real ``smolvlm-router``
process reloading on SIGHUP and finishing streams on SIGTERM."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import re
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from router.app import create_app
from router.config import Config, ConfigError, LogConfig
from router.keys import KEY_POOLS
from router.logs import configure_logging, secrets_of, start_request
from router.reload import CONFIG_LOADER
from router.sse import SSEDecoder
from tests.router.fakes import OPENAI_KEYS, SLOW_TEXT, make_clients, read_first_text_then_leave
from tests.router.helpers import (
    ANTHROPIC_BODY,
    OPENAI_BODY,
    Answer,
    RouterProcess,
    anthropic_events,
    client_roots,
    make_config,
    running_router,
)
from tests.router.test_keys import SNAPSHOT_FIELDS

module_loop = pytest.mark.asyncio(loop_scope="module")

ADMIN_KEY = "ops-admin-key-0001"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def ops_config(base_url: str, **extra: object) -> Config:
    data = {
        "providers": {
            "oai": {"type": "openai", "base_url": f"{base_url}/v1", "keys": ["sk-1"]},
            "claude": {"type": "anthropic", "base_url": base_url, "keys": ["ak-1", "ak-2"]},
        },
        "models": {
            "gpt": [{"provider": "oai", "model": "gpt-up"}],
            "claude": [{"provider": "claude", "model": "claude-up"}],
            "fallback": [
                {"provider": "oai", "model": "gpt-up"},
                {"provider": "claude", "model": "claude-up"},
            ],
        },
        "auth": {"admin_key": ADMIN_KEY},
        "limits": {"keepalive_s": 0},
        **extra,
    }
    return Config.from_dict(data)


def sdk_fake_config(root: str, **extra: object) -> Config:
    """Model ``m`` served by the SDK-validating OpenAI fake at ``root``."""
    return Config.from_dict(
        {
            "providers": {"oai": {"type": "openai", "base_url": f"{root}/v1", "keys": OPENAI_KEYS}},
            "models": {"m": [{"provider": "oai", "model": "gpt-fake"}]},
            **extra,
        }
    )


@pytest.fixture
def router_config(fake) -> Config:
    return ops_config(fake.base_url)


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the Prometheus text, or None."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        found = dict(re.findall(r'(\w+)="([^"]*)"', head))
        if head.split("{")[0] == name and all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return None


# ---- request ids, health, metrics -----------------------------------------------------------


async def test_request_id_is_echoed_or_made(client):
    resp = await client.post(
        "/v1/chat/completions", json=OPENAI_BODY, headers={"x-request-id": "abc-123"}
    )
    assert resp.headers["x-request-id"] == "abc-123"
    resp = await client.post("/v1/chat/completions", json={**OPENAI_BODY, "stream": True})
    made = resp.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    await resp.read()
    # An id that is not an id (newlines, too long) is replaced, errors carry one too.
    resp = await client.post("/v1/chat/completions", json={}, headers={"x-request-id": "x" * 500})
    assert resp.status == 400 and re.fullmatch(r"[0-9a-f]{32}", resp.headers["x-request-id"])


async def test_health_reports_providers_and_key_counts(client):
    resp = await client.get("/health")
    assert resp.status == 200
    assert await resp.json() == {
        "status": "ok",
        "providers": {"oai": {"keys": 1, "active": 1}, "claude": {"keys": 2, "active": 2}},
    }
    await client.post("/admin/keys/oai/0/disable", headers=ADMIN)
    assert (await (await client.get("/health")).json())["status"] == "degraded"


async def test_metrics_count_requests_tokens_retries_fallbacks_and_key_states(client, fake):
    assert (await client.post("/v1/chat/completions", json=OPENAI_BODY)).status == 200
    # The first target fails (500), the fallback provider answers.
    fake.queue("openai", Answer(status=500, body={"error": {"message": "boom"}}))
    fake.queue("openai", Answer(status=500, body={"error": {"message": "boom"}}))
    resp = await client.post("/v1/chat/completions", json={**OPENAI_BODY, "model": "fallback"})
    assert resp.status == 200
    assert (
        await client.post("/v1/chat/completions", json={**OPENAI_BODY, "model": "nope"})
    ).status == 404
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.content_type == "text/plain"
    text = await resp.text()
    route = "/v1/chat/completions"
    assert (
        metric(
            text, "router_requests_total", route=route, model="gpt", provider="oai", status="200"
        )
        == 1
    )
    assert (
        metric(
            text,
            "router_requests_total",
            route=route,
            model="fallback",
            provider="claude",
            status="200",
        )
        == 1
    )
    assert (
        metric(
            text, "router_requests_total", route=route, model="other", provider="none", status="404"
        )
        == 1
    )
    assert metric(text, "router_tokens_total", model="gpt", provider="oai", direction="in") == 5
    assert metric(text, "router_tokens_total", model="gpt", provider="oai", direction="out") == 2
    attempts = len([s for s in fake.seen if s.path == "/v1/chat/completions"])
    assert metric(text, "router_retries_total", model="fallback") == attempts - 1
    assert metric(text, "router_fallbacks_total", model="fallback") == 1
    assert metric(text, "router_request_duration_seconds_count", route=route) == 3
    for key in ("oai/0", "claude/0", "claude/1"):
        assert metric(text, "router_key_state", key=key, state="active") == 1
        assert metric(text, "router_key_state", key=key, state="disabled") == 0


async def test_admin_keys_disable_enable_and_metrics_follow(client, fake):
    keys = (await (await client.get("/admin/keys", headers=ADMIN)).json())["keys"]
    assert {k["id"]: k["state"] for k in keys} == {
        "oai/0": "active",
        "claude/0": "active",
        "claude/1": "active",
    }
    assert set(keys[0]) >= SNAPSHOT_FIELDS | {"provider"}
    resp = await client.post(
        "/admin/keys/claude/0/disable", headers=ADMIN, json={"reason": "leaked"}
    )
    assert resp.status == 200
    assert (await resp.json())["state"] == "disabled" and (await resp.json())["reason"] == "leaked"
    # A disabled key gets no traffic.
    for _ in range(3):
        assert (await client.post("/v1/messages", json=ANTHROPIC_BODY)).status == 200
    assert {s.headers["x-api-key"] for s in fake.seen} == {"ak-2"}
    text = await (await client.get("/metrics")).text()
    assert metric(text, "router_key_state", key="claude/0", state="disabled") == 1
    assert metric(text, "router_key_state_changes_total", key="claude/0", state="disabled") == 1
    resp = await client.post("/admin/keys/claude/0/enable", headers=ADMIN)
    assert (await resp.json())["state"] == "active"
    for path in ("/admin/keys/nope/0/disable", "/admin/keys/claude/9/disable"):
        resp = await client.post(path, headers=ADMIN)
        assert resp.status == 404, path
    resp = await client.post("/admin/keys/claude/0/disable", headers=ADMIN, data=b"{not json")
    assert resp.status == 400


async def test_admin_reload_keeps_unchanged_pools_and_rejects_bad_configs(
    client, aiohttp_client, fake
):
    resp = await client.post("/admin/reload", headers=ADMIN)
    assert resp.status == 400 and "without a config file" in (await resp.json())["error"]["message"]
    # What the config "file" holds, as the loader reads it.
    source: list = [lambda: ops_config(fake.base_url)]
    app = create_app(ops_config(fake.base_url))
    app[CONFIG_LOADER] = lambda: source[-1]()
    client = await aiohttp_client(app)
    claude_pool = app[KEY_POOLS]["claude"]
    await client.post("/admin/keys/claude/1/disable", headers=ADMIN)

    def rotated() -> Config:
        new = ops_config(fake.base_url)
        new.providers["oai"].key_configs[0].key = "sk-2"
        return new

    source.append(rotated)
    resp = await client.post("/admin/reload", headers=ADMIN)
    assert resp.status == 200 and (await resp.json())["providers_changed"] == ["oai"]
    # The unchanged provider kept its pool and its key states; the changed one uses the new key.
    assert app[KEY_POOLS]["claude"] is claude_pool
    states = {k["id"]: k["state"] for k in claude_pool.snapshot()}
    assert states["claude/1"] == "disabled"
    assert (await client.post("/v1/chat/completions", json=OPENAI_BODY)).status == 200
    assert fake.seen[-1].headers["Authorization"] == "Bearer sk-2"
    source.append(lambda: Config.from_dict({"providers": {}, "models": {}, "bogus": 1}))
    resp = await client.post("/admin/reload", headers=ADMIN)
    assert resp.status == 400 and "bogus" in (await resp.json())["error"]["message"]
    assert (await client.post("/v1/chat/completions", json=OPENAI_BODY)).status == 200
    assert fake.seen[-1].headers["Authorization"] == "Bearer sk-2"


# ---- timeouts and keep-alives -------------------------------------------------------------------


async def test_first_byte_timeout_is_retryable_and_falls_back(router_client, fake):
    cfg = ops_config(fake.base_url, timeouts={"first_byte_s": 0.2})
    client = await router_client(cfg)
    fake.queue("openai", Answer(body={}, delay_s=2), Answer(body={}, delay_s=2))
    started = time.monotonic()
    resp = await client.post("/v1/chat/completions", json={**OPENAI_BODY, "model": "fallback"})
    assert resp.status == 200, await resp.text()
    assert time.monotonic() - started < 1.5
    assert fake.seen[-1].path == "/v1/messages"
    # Without a fallback the client gets a 504 that names the timeout.
    fake.queue("openai", Answer(body={}, delay_s=2), Answer(body={}, delay_s=2))
    resp = await client.post("/v1/chat/completions", json=OPENAI_BODY)
    assert resp.status == 504
    assert "no answer from the upstream within 0.2 s" in (await resp.json())["error"]["message"]


async def test_stream_first_byte_timeout_falls_back(router_client, fake):
    cfg = ops_config(fake.base_url, timeouts={"first_byte_s": 0.2})
    client = await router_client(cfg)
    slow = Answer(events=[(None, {"x": 1})], delay_s=2)
    fake.queue("openai", slow, slow)
    resp = await client.post(
        "/v1/chat/completions", json={**OPENAI_BODY, "model": "fallback", "stream": True}
    )
    raw = await resp.read()
    assert resp.status == 200 and b"hello" in raw and raw.rstrip().endswith(b"[DONE]")


@pytest.mark.parametrize(
    "path, body, expected",
    [
        ("/v1/chat/completions", {**OPENAI_BODY, "stream": True}, b": ping\n\n"),
        (
            "/v1/messages",
            {**ANTHROPIC_BODY, "stream": True},
            b'event: ping\ndata: {"type": "ping"}\n\n',
        ),
    ],
    ids=["sse-comment", "anthropic-event"],
)
async def test_keepalive_pings_while_waiting_for_the_first_byte(
    router_client, fake, path, body, expected
):
    client = await router_client(make_config(fake.base_url, keepalive_s=0.05))
    kind = "anthropic" if "messages" in path else "openai"
    events = (
        anthropic_events(({"type": "text", "text": ""}, [{"type": "text_delta", "text": "x"}]))
        if kind == "anthropic"
        else None
    )
    fake.queue(
        kind,
        Answer(events=events, delay_s=0.3)
        if events
        else Answer(
            delay_s=0.3,
            events=[
                (
                    None,
                    {
                        "id": "c",
                        "object": "chat.completion.chunk",
                        "created": 1,
                        "model": "m",
                        "choices": [
                            {
                                "index": 0,
                                "delta": {"role": "assistant", "content": "x"},
                                "finish_reason": "stop",
                            }
                        ],
                    },
                ),
                (None, "[DONE]"),
            ],
        ),
    )
    resp = await client.post(path, json=body)
    raw = await resp.read()
    assert resp.status == 200 and raw.startswith(expected), raw[:80]
    decoder = SSEDecoder()
    names = [e.event for e in decoder.feed(raw) + decoder.flush()]
    if kind == "anthropic":
        assert names[0] == "ping" and "message_start" in names and names[-1] == "message_stop"


@module_loop
async def test_idle_timeout_mid_stream_ends_it_with_an_error_event(fakes, upstreams):
    """Once content went out there is no retry: a silent upstream ends the client's stream with
    the format's error event, and the upstream request is dropped."""
    # The slow scenario pauses 50 ms between pieces.
    cfg = sdk_fake_config(upstreams.roots["openai"], timeouts={"idle_s": 0.02})
    async with running_router(cfg) as server:
        body = {
            "model": "m",
            "stream": True,
            "messages": [{"role": "user", "content": "scenario:slow"}],
        }
        async with aiohttp.ClientSession() as http:
            async with http.post(server.make_url("/v1/chat/completions"), json=body) as resp:
                raw = await resp.read()
        decoder = SSEDecoder()
        chunks = [json.loads(e.data) for e in decoder.feed(raw) + decoder.flush()]
        assert chunks[1]["choices"][0]["delta"]["content"].strip() == "w0"
        error = chunks[-1]["error"]
        assert "no data from the upstream within 0.02 s" in error["message"], chunks[-1]
        for _ in range(50):
            if fakes.openai.disconnects:
                break
            await asyncio.sleep(0.02)
        assert [len(fakes.openai.exchanges), fakes.openai.disconnects] == [1, 1]


# ---- cancellation -----------------------------------------------------------------------------------


@module_loop
async def test_client_leaving_mid_stream_cancels_the_upstream_within_1s(fakes, upstreams):
    """The real server setting (handler_cancellation) with the SDK-validating fakes."""
    async with running_router(sdk_fake_config(upstreams.roots["openai"])) as server:
        roots = client_roots(server)
        clients = make_clients(roots)
        first = await read_first_text_then_leave("openai", clients, roots, "m")
        left = time.monotonic()
        assert SLOW_TEXT.startswith(first.strip())
        while not fakes.openai.disconnects and time.monotonic() - left < 1.0:
            await asyncio.sleep(0.02)
        assert fakes.openai.disconnects == 1, "the upstream stream outlived the client by 1 s"
        await clients.close()


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
async def test_client_leaving_before_the_first_byte_cancels_the_upstream(aiohttp_server, stream):
    """During the keep-alive wait nothing is written for a while: the disconnect itself must
    cancel the upstream request (hard case 13)."""
    cancelled = asyncio.Event()
    started = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return web.json_response({})

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", hang)
    up = await aiohttp_server(upstream)
    cfg = ops_config(str(up.make_url("")).rstrip("/"))
    async with running_router(cfg) as server:
        async with aiohttp.ClientSession() as http:
            task = asyncio.ensure_future(
                http.post(
                    server.make_url("/v1/chat/completions"), json={**OPENAI_BODY, "stream": stream}
                )
            )
            await asyncio.wait_for(started.wait(), 5)
            task.cancel()
            left = time.monotonic()
        await asyncio.wait_for(cancelled.wait(), 1.0)
        assert time.monotonic() - left < 1.0


# ---- secrets ----------------------------------------------------------------------------------------

SECRET_KEYS = {
    "oai": "sk-SECRET-openai-0123456789abcdef",
    "claude": "sk-ant-SECRET-anthropic-fedcba9876543210",
    "gem": "AIzaSECRET-gemini-00112233445566",
    "dead": "sk-SECRET-unreachable-99887766",
}


async def test_provider_keys_never_appear_in_logs_errors_metrics_or_admin(
    router_client, fake, unused_tcp_port
):
    base = fake.base_url
    cfg = Config.from_dict(
        {
            "providers": {
                "oai": {"type": "openai", "base_url": f"{base}/v1", "keys": [SECRET_KEYS["oai"]]},
                "claude": {"type": "anthropic", "base_url": base, "keys": [SECRET_KEYS["claude"]]},
                "gem": {"type": "gemini", "base_url": base, "keys": [SECRET_KEYS["gem"]]},
                "dead": {
                    "type": "openai",
                    "base_url": f"http://127.0.0.1:{unused_tcp_port}/v1",
                    "keys": [SECRET_KEYS["dead"]],
                },
            },
            "models": {
                "gpt": [{"provider": "oai", "model": "gpt-up"}],
                "claude": [{"provider": "claude", "model": "claude-up"}],
                "gemini": [{"provider": "gem", "model": "gemini-up"}],
                "dead": [{"provider": "dead", "model": "x"}],
            },
            "auth": {"admin_key": ADMIN_KEY},
            "timeouts": {"first_byte_s": 0.2},
            "limits": {"keepalive_s": 0},
        }
    )
    captured = io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    configure_logging(LogConfig(format="json", level="DEBUG"), secrets_of(cfg), stream=captured)
    outputs: list[str] = []
    try:
        client = await router_client(cfg)

        async def send(path: str, body: dict) -> None:
            resp = await client.post(path, json=body)
            outputs.append(f"{resp.status} {dict(resp.headers)} {await resp.text()}")
            # Errors cool, park or disable keys: bring them back for the next kind of error.
            for provider in SECRET_KEYS:
                await client.post(f"/admin/keys/{provider}/0/enable", headers=ADMIN)

        def echo(status: int, provider: str) -> Answer:
            # An upstream that quotes the key it was sent in its error message.
            message = f"key {SECRET_KEYS[provider]} was refused"
            return Answer(status=status, body={"error": {"message": message, "type": "x"}})

        # Every kind of upstream error, each echoing the key: 400, 401, 403, 429, 500, 529.
        for status in (400, 429, 500, 401):
            fake.queue("openai", echo(status, "oai"), echo(status, "oai"))
            await send("/v1/chat/completions", OPENAI_BODY)
        for status in (403, 529):
            fake.queue("anthropic", echo(status, "claude"), echo(status, "claude"))
            await send("/v1/messages", ANTHROPIC_BODY)
        fake.queue("gemini", echo(401, "gem"))
        await send(
            "/v1beta/models/gemini:generateContent",
            {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
        )
        # An error inside a started stream, quoting the key.
        fake.queue(
            "anthropic",
            Answer(
                events=[
                    *anthropic_events(
                        ({"type": "text", "text": ""}, [{"type": "text_delta", "text": "x"}])
                    )[:4],
                    (
                        "error",
                        {
                            "type": "error",
                            "error": {
                                "type": "api_error",
                                "message": f"bad {SECRET_KEYS['claude']}",
                            },
                        },
                    ),
                ]
            ),
        )
        await send("/v1/messages", {**ANTHROPIC_BODY, "stream": True})
        # A timeout, a refused connection.
        fake.queue("openai", Answer(body={}, delay_s=1), Answer(body={}, delay_s=1))
        await send("/v1/chat/completions", OPENAI_BODY)
        await send("/v1/chat/completions", {**OPENAI_BODY, "model": "dead"})
        outputs.append(await (await client.get("/metrics")).text())
        outputs.append(await (await client.get("/health")).text())
        outputs.append(await (await client.get("/admin/keys", headers=ADMIN)).text())
        outputs.append(await (await client.post("/admin/keys/oai/0/disable", headers=ADMIN)).text())
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    logs = captured.getvalue()
    assert len(fake.seen) >= 8 and "refused" in logs, "the errors were not driven"
    everything = "\n".join(outputs) + logs
    for name, key in SECRET_KEYS.items():
        assert key not in everything, f"the {name} key leaked"
        # Not even the middle of it.
        assert key[4:-4] not in everything, f"part of the {name} key leaked"
    # Logs are JSON lines with request ids.
    lines = [json.loads(line) for line in logs.splitlines()]
    assert any(line.get("request_id") for line in lines)
    assert any(line["logger"] == "router.access" and line.get("status") == 429 for line in lines)


# ---- the real process: SIGHUP reload, SIGTERM drain ----------------------------------------------


def process_config(root: str, keys: list[str]) -> dict:
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "providers": {"oai": {"type": "openai", "base_url": f"{root}/v1", "keys": keys}},
        "models": {"m": [{"provider": "oai", "model": "gpt-fake"}]},
        "shutdown_grace_s": 10,
        "log": {"format": "json", "level": "INFO"},
    }


@asynccontextmanager
async def openai_router_process(tmp_path: Path, root: str) -> AsyncIterator[RouterProcess]:
    """The router as a real process on the fake OpenAI upstream (its config file at
    ``router.config``), killed on exit."""
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(process_config(root, OPENAI_KEYS)))
    router = RouterProcess(config, tmp_path / "router.log")
    try:
        await router.start()
        yield router
    finally:
        await router.stop()


async def start_slow_stream(http: aiohttp.ClientSession, url: str) -> asyncio.Task:
    """Starts a ~3 s stream and waits for its first chunk; returns the task reading it whole."""
    first = asyncio.Event()

    async def read() -> bytes:
        body = {
            "model": "m",
            "stream": True,
            "messages": [{"role": "user", "content": "scenario:slow"}],
        }
        async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            raw = b""
            async for chunk in resp.content.iter_any():
                raw += chunk
                if b'"content": "w' in raw or b'"content":"w' in raw:
                    first.set()
            return raw

    stream = asyncio.ensure_future(read())
    await asyncio.wait_for(first.wait(), 5)
    return stream


def streamed_text(raw: bytes) -> str:
    decoder = SSEDecoder()
    events = decoder.feed(raw) + decoder.flush()
    assert events[-1].data == "[DONE]", raw[-200:]
    chunks = [json.loads(e.data) for e in events[:-1]]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


@module_loop
async def test_sighup_reload_swaps_keys_without_failing_an_inflight_stream(
    fakes, upstreams, tmp_path
):
    new_key = "sk-oai-fake-rotated"
    fakes.openai.keys.append(new_key)
    root = upstreams.roots["openai"]
    try:
        async with openai_router_process(tmp_path, root) as router, aiohttp.ClientSession() as http:
            stream = await start_slow_stream(http, router.url)
            router.config.write_text(yaml.safe_dump(process_config(root, [new_key])))
            router.proc.send_signal(signal.SIGHUP)
            await router.wait_log("config reloaded")
            assert not stream.done(), "the stream ended before the reload: make it slower"
            # The in-flight stream, on the old key, completes.
            assert streamed_text(await asyncio.wait_for(stream, 10)) == SLOW_TEXT
            assert fakes.openai.exchanges[0].key == OPENAI_KEYS[0]
            body = {"model": "m", "messages": [{"role": "user", "content": "scenario:text"}]}
            async with http.post(f"{router.url}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
            assert fakes.openai.last.key == new_key
            # An invalid config on SIGHUP: logged, and the running one stays.
            router.config.write_text("providers: [this is: not valid\n")
            router.proc.send_signal(signal.SIGHUP)
            await router.wait_log("reload failed, the running config is kept")
            async with http.post(f"{router.url}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
            assert fakes.openai.last.key == new_key and router.proc.returncode is None
    finally:
        fakes.openai.keys.remove(new_key)
    log = router.log.read_text()
    assert OPENAI_KEYS[0] not in log and new_key not in log
    assert all(json.loads(line) for line in log.splitlines())


@module_loop
async def test_sigterm_finishes_the_inflight_stream_then_exits(fakes, upstreams, tmp_path):
    async with openai_router_process(tmp_path, upstreams.roots["openai"]) as router:
        async with aiohttp.ClientSession() as http:
            stream = await start_slow_stream(http, router.url)
            router.proc.send_signal(signal.SIGTERM)
            await router.wait_log("shutting down")
            # No new connections while it drains.
            with pytest.raises(aiohttp.ClientConnectionError):
                async with aiohttp.ClientSession() as other:
                    await other.get(f"{router.url}/health")
            assert streamed_text(await asyncio.wait_for(stream, 10)) == SLOW_TEXT
        assert await asyncio.wait_for(router.proc.wait(), 10) == 0
        assert "stopped" in router.log.read_text()


# ---- config ---------------------------------------------------------------------------------------


def test_timeouts_connect_is_the_default_of_each_provider():
    cfg = Config.from_dict(
        {
            "providers": {
                "a": {"type": "openai", "base_url": "http://127.0.0.1:1/v1"},
                "b": {
                    "type": "openai",
                    "base_url": "http://127.0.0.1:1/v1",
                    "connect_timeout_s": 7,
                },
            },
            "models": {},
            "timeouts": {"connect_s": 3, "first_byte_s": 30, "idle_s": 5},
        }
    )
    assert cfg.providers["a"].connect_timeout_s == 3 and cfg.providers["b"].connect_timeout_s == 7
    assert (cfg.timeouts.first_byte_s, cfg.timeouts.idle_s) == (30, 5)
    default = Config.from_dict({"providers": {}, "models": {}})
    assert (default.shutdown_grace_s, default.log.format, default.log.level) == (
        30.0,
        "json",
        "INFO",
    )


@pytest.mark.parametrize(
    "data, culprit",
    [
        ({"timeouts": {"idle_s": 0}}, r"timeouts\.idle_s: must be > 0"),
        ({"timeouts": {"read_s": 1}}, r"timeouts: unknown key\(s\) read_s"),
        ({"shutdown_grace_s": -1}, r"shutdown_grace_s: must be >= 0"),
        ({"shutdown_grace_s": "soon"}, r"shutdown_grace_s: expected float"),
        ({"log": {"format": "xml"}}, r"log\.format: 'xml' is not one of json, text"),
        ({"log": {"level": "loud"}}, r"log\.level: 'LOUD' is not a logging level"),
        ({"auth": {"admin_key": "sha256:12"}}, r"auth\.admin_key: a sha256: digest must be 64"),
    ],
)
def test_bad_ops_config_names_the_culprit(data, culprit):
    with pytest.raises(ConfigError, match=culprit):
        Config.from_dict({"providers": {}, "models": {}, **data})


def test_text_logs_carry_the_request_id_and_hide_secrets():
    captured = io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        configure_logging(LogConfig(format="text", level="INFO"), ["sk-hide-me"], stream=captured)

        def in_a_request() -> None:
            start_request("rid-7")
            logging.getLogger("router.test").info("upstream echoed %s", "sk-hide-me")

        # In a context of its own, so the request id does not outlive this test.
        contextvars.copy_context().run(in_a_request)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    line = captured.getvalue()
    assert "upstream echoed [redacted]" in line and "request_id=rid-7" in line
    assert "sk-hide-me" not in line
