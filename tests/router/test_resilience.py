"""Key pools and retries end to end: the router in front of fake providers on loopback that
record which key each request used (and, here, how many were in flight per key)."""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import gc
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from router import ir
from router.attempts import open_stream as _open_stream
from router.config import Config, ProviderConfig
from router.keys import KEY_POOLS, KeyPool
from router.providers.base import BaseProvider
from tests.router.fakes import (
    ANTHROPIC_KEYS,
    ERROR_MESSAGE,
    MIDSTREAM_ERRORS,
    TEXT_ANSWER,
    FakeAnthropic,
    FakeOpenAI,
    ask,
    make_clients,
)

OPENAI_KEYS = ["sk-res-key-000", "sk-res-key-111", "sk-res-key-222"]
PROMPT = "scenario:text"


class _Instrumented:
    """Mixin for a fake: the 429 headers a test chooses (None removes one), a delay before
    each answer, and the peak number of requests in flight per key."""

    def instrument(self) -> None:
        self.rate_limit_headers: dict[str, str | None] = {}
        # Added to the next successful JSON answer only.
        self.success_headers: dict[str, str] = {}
        self.delay_s = 0.0
        self.in_flight: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()

    def error_response(self, status: int, message: str) -> web.Response:
        response = super().error_response(status, message)
        for name, value in self.rate_limit_headers.items() if status == 429 else ():
            response.headers.popall(name, None)
            if value is not None:
                response.headers[name] = value
        return response

    async def counted(self, key: str, handler: object, request: web.Request) -> web.StreamResponse:
        self.in_flight[key] += 1
        self.peak[key] = max(self.peak[key], self.in_flight[key])
        try:
            await asyncio.sleep(self.delay_s)
            response = await handler(request)
            if response.status == 200 and not response.prepared:
                response.headers.update(self.success_headers)
                self.success_headers = {}
            return response
        finally:
            self.in_flight[key] -= 1


class CountingOpenAI(_Instrumented, FakeOpenAI):
    def __init__(self, keys: list[str]) -> None:
        super().__init__(keys)
        self.instrument()

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        return await self.counted(key, super().chat_completions, request)


class CountingAnthropic(_Instrumented, FakeAnthropic):
    def __init__(self, keys: list[str]) -> None:
        super().__init__(keys)
        self.instrument()


@dataclass
class Ups:
    openai: CountingOpenAI
    anthropic: CountingAnthropic
    roots: dict[str, str]

    def keys_used(self, fake: str = "openai") -> list[int]:
        """Index in its key list of the key each request to a fake used."""
        up = self.openai if fake == "openai" else self.anthropic
        return [up.keys.index(e.key) for e in up.exchanges]


@pytest_asyncio.fixture
async def ups() -> AsyncIterator[Ups]:
    fakes = [CountingOpenAI(OPENAI_KEYS), CountingAnthropic(ANTHROPIC_KEYS)]
    servers = [TestServer(f.app(), host="127.0.0.1") for f in fakes]
    for server in servers:
        await server.start_server()
    roots = {f.name: str(s.make_url("")).rstrip("/") for f, s in zip(fakes, servers, strict=True)}
    yield Ups(fakes[0], fakes[1], roots)
    for server in servers:
        await server.close()
    problems = [p for fake in fakes for p in fake.problems]
    assert not problems, "fake upstreams rejected requests:\n" + "\n".join(problems)


def make_cfg(
    ups: Ups, oai: dict | None = None, ant: dict | None = None, retry: dict | None = None
) -> Config:
    oai_target = {"provider": "oai", "model": "gpt-fake"}
    ant_target = {"provider": "ant", "model": "claude-fake"}
    oai_cfg = {"type": "openai", "base_url": f"{ups.roots['openai']}/v1", "keys": OPENAI_KEYS}
    ant_cfg = {"type": "anthropic", "base_url": ups.roots["anthropic"], "keys": ANTHROPIC_KEYS}
    return Config.from_dict(
        {
            "providers": {"oai": {**oai_cfg, **(oai or {})}, "ant": {**ant_cfg, **(ant or {})}},
            "models": {
                "m-oai": [oai_target],
                "m-ant": [ant_target],
                "m-oai-then-ant": [oai_target, ant_target],
                "m-ant-then-oai": [ant_target, oai_target],
            },
            "retry": retry or {},
        }
    )


@pytest_asyncio.fixture
async def start(router_client, ups):
    async def started(**kwargs: object) -> TestClient:
        return await router_client(make_cfg(ups, **kwargs))

    return started


def pool(client: TestClient, name: str = "oai") -> KeyPool:
    return client.server.app[KEY_POOLS][name]


async def chat(
    client: TestClient,
    model: str = "m-oai",
    stream: bool = False,
    headers: dict[str, str] | None = None,
    **extra: object,
) -> tuple[int, str, dict[str, str]]:
    """One OpenAI-format request; returns the status, the answer text (or the error body's
    text) and the headers."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], **extra}
    async with client.post(
        "/v1/chat/completions", json={**body, "stream": stream}, headers=headers
    ) as resp:
        raw = await resp.text()
        if resp.status != 200:
            return resp.status, raw, dict(resp.headers)
        if not stream:
            return 200, json.loads(raw)["choices"][0]["message"]["content"], dict(resp.headers)
        assert raw.rstrip().endswith("data: [DONE]"), raw[-200:]
        text = ""
        for line in raw.splitlines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += "".join(c["delta"].get("content") or "" for c in chunk["choices"])
        return 200, text, dict(resp.headers)


async def ok(client: TestClient, **kwargs: object) -> None:
    status, text, _ = await chat(client, **kwargs)
    assert (status, text) == (200, TEXT_ANSWER), text


def seconds_left(client: TestClient, key_id: str, name: str = "oai") -> float:
    [snap] = [k for k in pool(client, name).snapshot() if k["id"] == key_id]
    assert snap["until"] is not None, snap
    return snap["until"] - time.time()


def state(client: TestClient, key_id: str, name: str = "oai") -> str:
    return next(k["state"] for k in pool(client, name).snapshot() if k["id"] == key_id)


# ---- strategies -------------------------------------------------------------------------------


async def test_round_robin_spreads_evenly(start, ups):
    client = await start()
    for i in range(30):
        await ok(client, stream=i % 2 == 1)
    assert Counter(ups.keys_used()) == {0: 10, 1: 10, 2: 10}


async def test_least_busy_goes_to_the_idle_key(start, ups):
    client = await start(oai={"keys": OPENAI_KEYS[:2], "strategy": "least_busy"})
    slow = {"model": "m-oai", "messages": [{"role": "user", "content": "scenario:slow"}]}
    async with client.post("/v1/chat/completions", json={**slow, "stream": True}) as held:
        await held.content.readline()  # the slow stream is running on key 0
        await ok(client)
        await ok(client)
    # Round robin would have sent the third request to the busy key 0.
    assert ups.keys_used() == [0, 1, 1]


async def test_weighted_is_proportional(start, ups):
    keys = [{"key": OPENAI_KEYS[0], "weight": 1}, {"key": OPENAI_KEYS[1], "weight": 3}]
    client = await start(oai={"keys": keys, "strategy": "weighted"})
    for _ in range(40):
        await ok(client)
    assert abs(Counter(ups.keys_used())[1] - 30) <= 2


async def test_priority_uses_the_top_key_while_it_is_healthy(start, ups):
    keys = [{"key": OPENAI_KEYS[0], "priority": 0}, {"key": OPENAI_KEYS[1], "priority": 5}]
    client = await start(oai={"keys": keys, "strategy": "priority"})
    for _ in range(5):
        await ok(client)
    assert ups.keys_used() == [1] * 5
    ups.openai.rate_limit_headers = {"retry-after": "1"}
    ups.openai.fail_next(429)
    for _ in range(3):
        await ok(client)
    assert ups.keys_used()[5:] == [1, 0, 0, 0]
    await asyncio.sleep(max(0.0, seconds_left(client, "oai/1")) + 0.05)
    await ok(client)
    assert ups.keys_used()[-1] == 1


# ---- key states -------------------------------------------------------------------------------


async def test_retry_after_seconds_cools_the_key_for_that_long(start, ups):
    client = await start(oai={"keys": OPENAI_KEYS[:2]})
    ups.openai.rate_limit_headers = {"retry-after": "2"}
    ups.openai.fail_next(429)
    await ok(client)  # key 0 answers 429, key 1 answers: the client never knows
    assert ups.keys_used() == [0, 1]
    assert state(client, "oai/0") == "cooling"
    assert 1.5 < seconds_left(client, "oai/0") <= 2.0
    for i in range(4):
        await ok(client, stream=i % 2 == 0)
    assert ups.keys_used()[2:] == [1, 1, 1, 1], "a cooling key got traffic"
    await asyncio.sleep(seconds_left(client, "oai/0") + 0.05)
    await ok(client)
    await ok(client)
    assert 0 in ups.keys_used()[6:] and state(client, "oai/0") == "active"


async def test_retry_after_http_date(start, ups):
    client = await start(oai={"keys": OPENAI_KEYS[:2]})
    when = email.utils.formatdate(time.time() + 3, usegmt=True)
    ups.openai.rate_limit_headers = {"retry-after": when}
    ups.openai.fail_next(429)
    await ok(client)
    assert state(client, "oai/0") == "cooling"
    assert 1.5 < seconds_left(client, "oai/0") <= 3.0


@pytest.mark.parametrize(
    ("fake", "headers", "seconds"),
    [
        (
            "openai",
            {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"},
            360,
        ),
        (
            "anthropic",
            {
                "anthropic-ratelimit-requests-remaining": "0",
                "anthropic-ratelimit-requests-reset": "{in45s}",
            },
            45,
        ),
    ],
)
async def test_provider_reset_headers_set_the_cool_down(start, ups, fake, headers, seconds):
    """Without Retry-After, the provider's own reset headers say when the key is back."""
    in45 = dt.datetime.fromtimestamp(time.time() + 45, dt.UTC)
    up = ups.openai if fake == "openai" else ups.anthropic
    up.rate_limit_headers = {
        "retry-after": None,
        **{k: v.format(in45s=in45.strftime("%Y-%m-%dT%H:%M:%SZ")) for k, v in headers.items()},
    }
    up.fail_next(429)
    client = await start()
    model, name = ("m-oai", "oai") if fake == "openai" else ("m-ant", "ant")
    await ok(client, model=model)
    assert ups.keys_used(fake)[:2] == [0, 1]
    assert seconds - 2 < seconds_left(client, f"{name}/0", name) <= seconds


async def test_a_used_up_limit_rests_the_key_before_any_429(start, ups):
    """OpenAI reports ``remaining 0`` on the success that used the last request: the key
    gets no more traffic until the reset, instead of earning a 429."""
    client = await start(oai={"keys": OPENAI_KEYS[:2]})
    ups.openai.success_headers = {
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "20s",
    }
    await ok(client)
    assert state(client, "oai/0") == "cooling" and 18 < seconds_left(client, "oai/0") <= 20
    for _ in range(3):
        await ok(client)
    assert ups.keys_used() == [0, 1, 1, 1]


async def test_401_disables_the_key_and_the_snapshot_shows_it(start, ups):
    client = await start(oai={"keys": OPENAI_KEYS[:2]})
    ups.openai.fail_next(401)
    await ok(client)
    snap = pool(client).snapshot()
    assert snap[0]["state"] == "disabled" and "401" in snap[0]["reason"]
    assert snap[0]["until"] is None and snap[1]["state"] == "active"
    for _ in range(4):
        await ok(client)
    assert ups.keys_used() == [0, 1, 1, 1, 1, 1]
    pool(client).enable("oai/0")
    await ok(client)
    await ok(client)
    assert 0 in ups.keys_used()[6:]


async def test_all_keys_down_means_the_fallback_provider_answers(start, ups):
    client = await start(oai={"keys": OPENAI_KEYS[:2]})
    ups.openai.fail_next(401, 429)
    await ok(client, model="m-oai-then-ant")
    assert len(ups.openai.exchanges) == 2 and len(ups.anthropic.exchanges) == 1
    assert [k["state"] for k in pool(client).snapshot()] == ["disabled", "cooling"]
    await ok(client, model="m-oai-then-ant", stream=True)
    assert len(ups.openai.exchanges) == 2, "a key that is down got traffic"
    assert len(ups.anthropic.exchanges) == 2


async def test_attempts_are_bounded(start, ups):
    client = await start(retry={"max_attempts": 2})
    ups.openai.fail_next(429, 429, 429)
    status, body, headers = await chat(client)
    assert status == 429 and "Retry-After" in headers, body
    assert len(ups.openai.exchanges) == 2


# ---- streams: retried before the first delta, never after --------------------------------------


async def test_overload_in_stream_before_first_delta_is_invisible(start, ups):
    client = await start()
    ups.anthropic.fail_stream_next(1)
    body = {
        "model": "m-ant-then-oai",
        "max_tokens": 64,
        "stream": True,
        "messages": [{"role": "user", "content": PROMPT}],
    }
    async with client.post("/v1/messages", json=body) as resp:
        raw = await resp.text()
    assert resp.status == 200 and "event: error" not in raw, raw
    deltas = [json.loads(line[6:]) for line in raw.splitlines() if "text_delta" in line]
    assert "".join(d["delta"]["text"] for d in deltas) == TEXT_ANSWER
    assert len(ups.anthropic.exchanges) == 1 and len(ups.openai.exchanges) == 1
    # An overload is the provider's trouble, not the key's.
    assert [k["state"] for k in pool(client, "ant").snapshot()] == ["active", "active"]


@pytest.mark.parametrize("client_kind", ["openai", "anthropic", "gemini", "responses"])
async def test_overload_after_first_delta_is_a_stream_error_event(start, ups, client_kind):
    client = await start()
    root = str(client.make_url("")).rstrip("/")
    clients = make_clients({"openai": root, "anthropic": root, "gemini": root})
    prompt = "scenario:midstream-error"  # one text delta, then Anthropic's overloaded_error
    try:
        if client_kind == "responses":
            stream = await clients.openai.responses.create(
                model="m-ant-then-oai", input=prompt, stream=True
            )
            events = [event async for event in stream]
            kinds = [e.type for e in events]
            assert "error" in kinds or "response.failed" in kinds, kinds
            assert "response.completed" not in kinds, kinds
        else:
            with pytest.raises(MIDSTREAM_ERRORS[client_kind], match=ERROR_MESSAGE):
                await ask(client_kind, clients, "m-ant-then-oai", prompt, stream=True)
    finally:
        await clients.close()
    # Content had reached the client: no retry, not even on the fallback target.
    assert len(ups.anthropic.exchanges) == 1 and not ups.openai.exchanges
    assert [k["in_flight"] for k in pool(client, "ant").snapshot()] == [0, 0]


class _TwoDeltas(BaseProvider):
    """A provider whose stream has two text deltas."""

    async def complete(self, request: ir.Request, key: str | None) -> ir.Response:
        raise NotImplementedError

    async def stream(self, request: ir.Request, key: str | None) -> AsyncIterator[ir.StreamEvent]:
        yield ir.StreamStart("id", "m")
        yield ir.PartStart(0, ir.TextPart(""))
        yield ir.PartDelta(0, "a")
        yield ir.PartDelta(0, "b")
        yield ir.StreamEnd(usage=ir.Usage(3, 2))


async def test_a_stream_closed_or_dropped_before_it_is_read_gives_its_key_back():
    """A client may leave before the router reads past the buffered first delta."""
    cfg = ProviderConfig(name="p", type="openai", keys=[{"key": "k" * 12, "max_concurrent": 1}])
    pool = KeyPool(cfg)
    provider = _TwoDeltas(cfg, None)
    request = ir.Request("m", [ir.Message("user", [ir.TextPart("hi")])], stream=True)

    def in_flight() -> int:
        return pool.snapshot()[0]["in_flight"]

    buffered, rest = await _open_stream(provider, request, await pool.acquire())
    assert isinstance(buffered[-1], ir.PartDelta) and in_flight() == 1
    await rest.aclose()
    assert in_flight() == 0
    buffered, rest = await _open_stream(provider, request, await pool.acquire())
    del rest
    gc.collect()
    assert in_flight() == 0
    buffered, rest = await _open_stream(provider, request, await pool.acquire())
    assert [type(e) async for e in rest] == [ir.PartDelta, ir.StreamEnd]
    assert in_flight() == 0


# ---- limits -----------------------------------------------------------------------------------


async def test_200_concurrent_requests_on_two_keys_of_4_in_flight(start, ups):
    """Each request gets one complete answer or one clean 429, nothing hangs, and no key ever
    has more than 4 requests in flight."""
    keys = [{"key": k, "max_concurrent": 4} for k in OPENAI_KEYS[:2]]
    client = await start(oai={"keys": keys, "max_queue": 40, "queue_timeout_s": 10})
    ups.openai.delay_s = 0.2
    started = time.monotonic()
    results = await asyncio.wait_for(
        asyncio.gather(*(chat(client, stream=i % 2 == 0) for i in range(200))), 60
    )
    elapsed = time.monotonic() - started
    answered = [r for r in results if r[0] == 200]
    limited = [r for r in results if r[0] == 429]
    assert len(answered) + len(limited) == 200, Counter(r[0] for r in results)
    assert all(text == TEXT_ANSWER for _, text, _ in answered)
    for _, body, headers in limited:
        assert int(headers["Retry-After"]) >= 1
        assert json.loads(body)["error"]["type"] == "rate_limit_error", body
    # 8 in flight plus 40 queued got through at least; the rest were turned away.
    assert len(answered) >= 48 and limited, (len(answered), len(limited))
    assert len(ups.openai.exchanges) == len(answered)
    assert max(ups.openai.peak.values()) == 4, ups.openai.peak
    assert [k["in_flight"] for k in pool(client).snapshot()] == [0, 0]
    assert elapsed < 30


async def test_full_queue_is_a_429_in_the_client_format(start, ups):
    keys = [{"key": k, "max_concurrent": 1} for k in ANTHROPIC_KEYS]
    client = await start(ant={"keys": keys, "max_queue": 0})
    slow = {
        "model": "m-ant",
        "max_tokens": 64,
        "stream": True,
        "messages": [{"role": "user", "content": "scenario:slow"}],
    }
    first = await client.post("/v1/messages", json=slow)
    second = await client.post("/v1/messages", json=slow)
    await first.content.readline()
    await second.content.readline()
    resp = await client.post("/v1/messages", json={**slow, "stream": False})
    body = await resp.json()
    assert resp.status == 429 and resp.headers["Retry-After"] == "1"
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error", body
    first.close()
    second.close()
    for _ in range(40):
        if [k["in_flight"] for k in pool(client, "ant").snapshot()] == [0, 0]:
            break
        await asyncio.sleep(0.05)
    assert [k["in_flight"] for k in pool(client, "ant").snapshot()] == [0, 0], "leaked lease"


async def test_rpm_budget_holds(start, ups):
    client = await start(oai={"keys": [{"key": OPENAI_KEYS[0], "rpm": 2}], "queue_timeout_s": 0.2})
    await ok(client)
    await ok(client, stream=True)
    status, body, headers = await chat(client)
    assert status == 429 and int(headers["Retry-After"]) >= 1, body
    assert len(ups.openai.exchanges) == 2


# ---- affinity ---------------------------------------------------------------------------------


async def test_affinity_keeps_a_conversation_on_one_key_and_moves_it_when_it_cools(start, ups):
    client = await start()
    conv = {"x-conversation-id": "conv-A"}
    for _ in range(4):
        await ok(client, headers=conv)
        await ok(client)  # other traffic rotates the pool meanwhile
    home = ups.keys_used()[0]
    assert ups.keys_used()[::2] == [home] * 4
    users = []
    for _ in range(3):
        await ok(client, user="user-9")
        users.append(ups.keys_used()[-1])
    assert len(set(users)) == 1, users
    ups.openai.rate_limit_headers = {"retry-after": "30"}
    ups.openai.fail_next(429)
    await ok(client, headers=conv)
    moved = ups.keys_used()[-1]
    assert moved != home and state(client, f"oai/{home}") == "cooling"
    for _ in range(3):
        await ok(client, headers={"x-session-affinity": "conv-A"})
    assert ups.keys_used()[-3:] == [moved] * 3


async def test_anthropic_metadata_user_id_is_a_conversation(start, ups):
    client = await start()
    body = {
        "model": "m-ant",
        "max_tokens": 64,
        "metadata": {"user_id": "user-42"},
        "messages": [{"role": "user", "content": PROMPT}],
    }
    for _ in range(4):
        async with client.post("/v1/messages", json=body) as resp:
            assert resp.status == 200, await resp.text()
    # Round robin alone would alternate between the two keys.
    assert len(set(ups.keys_used("anthropic"))) == 1, ups.keys_used("anthropic")
