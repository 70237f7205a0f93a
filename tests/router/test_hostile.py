"""The router's answers to hostile clients and misbehaving upstreams beyond media: metric
labels that clients cannot multiply, a provider's rejection of the router's own key, and
upstream answers without bound."""

from __future__ import annotations

import contextlib
import gzip
import re
import uuid

import pytest
from aiohttp import web

from router.config import Config
from router.upstream_client import MAX_ANSWER_BYTES
from tests.router.helpers import ANTHROPIC_BODY, OPENAI_BODY, Answer

# ---- metric labels -----------------------------------------------------------------------------


def series(text: str) -> set[str]:
    """The sample lines (name and labels) of a Prometheus exposition."""
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and line[0] != "#"}


async def test_random_model_names_do_not_create_series(client, fake):
    await client.post("/v1/chat/completions", json=OPENAI_BODY)
    await client.post("/v1/chat/completions", json={**OPENAI_BODY, "model": "oai/gpt-up"})
    before = series(await (await client.get("/metrics")).text())
    statuses = set()
    for i in range(100):
        name = uuid.uuid4().hex
        # Unknown aliases, `provider/anything` and unknown providers.
        model = [name, f"oai/{name}", f"nobody/{name}"][i % 3]
        resp = await client.post("/v1/chat/completions", json={**OPENAI_BODY, "model": model})
        statuses.add(resp.status)
    assert statuses == {200, 404}
    text = await (await client.get("/metrics")).text()
    after = series(text)
    new = after - before
    models = set(re.findall(r'model="([^"]*)"', "\n".join(new)))
    assert models <= {"other", "oai/other", "none"}, models  # none: the /metrics scrapes
    assert len(new) < 40, sorted(new)
    # Configured names keep their own label.
    assert 'model="gpt"' in text and 'model="oai/gpt-up"' in text


# ---- the router's own key rejected upstream ----------------------------------------------------


def rejection(status: int, key: str) -> Answer:
    # Upstreams quote (part of) the key they were sent.
    return Answer(status=status, body={"error": {"message": f"Incorrect API key: {key}"}})


@pytest.mark.parametrize("status", [401, 403])
async def test_a_rejected_router_key_is_a_502_without_key_fragments(client, fake, status):
    """Every key of the fallback model's providers is rejected: the client gets a 502 that
    says the router's credential was rejected, not a 401 its SDK would blame on its own key."""
    fake.queue("openai", rejection(status, "sk-1"))
    fake.queue("anthropic", rejection(status, "ak-1"), rejection(status, "ak-2"))
    resp = await client.post("/v1/chat/completions", json={**OPENAI_BODY, "model": "fallback"})
    assert resp.status == 502
    body = await resp.json()
    message = body["error"]["message"]
    assert "rejected the router's credential" in message, body
    assert body["error"]["type"] != "authentication_error"
    assert len(fake.seen) == 3, "every key of every provider was tried"
    text = await resp.text()
    for fragment in ("sk-1", "ak-1", "ak-2", "k-1", "k-2", "Incorrect API key"):
        assert fragment not in text


async def test_a_rejected_key_is_a_502_in_the_anthropic_format(client, fake):
    fake.queue("anthropic", rejection(401, "ak-1"), rejection(401, "ak-2"))
    resp = await client.post("/v1/messages", json=ANTHROPIC_BODY)
    assert resp.status == 502
    body = await resp.json()
    assert body["type"] == "error" and body["error"]["type"] == "api_error", body
    assert "rejected the router's credential" in body["error"]["message"]


async def test_gemini_invalid_key_400_is_a_502(client, fake):
    body = {"error": {"code": 400, "message": "API key not valid. Please pass a valid API key."}}
    fake.queue("gemini", Answer(status=400, body=body))
    resp = await client.post("/v1/chat/completions", json={**OPENAI_BODY, "model": "gemini"})
    assert resp.status == 502
    assert "rejected the router's credential" in (await resp.json())["error"]["message"]


async def test_another_key_serves_when_one_is_rejected(client, fake):
    fake.queue("anthropic", rejection(401, "ak-1"))
    resp = await client.post("/v1/messages", json=ANTHROPIC_BODY)
    assert resp.status == 200
    assert len(fake.seen) == 2


# ---- upstreams that would exhaust the router's memory ------------------------------------------


async def gzip_bomb(request: web.Request) -> web.Response:
    """65 KiB on the wire that inflate to 65 MiB."""
    body = gzip.compress(b" " * (MAX_ANSWER_BYTES + (1 << 20)), 9)
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    return web.Response(body=body, headers=headers)


async def endless_event(request: web.Request) -> web.StreamResponse:
    """An event stream whose first line never ends."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    with contextlib.suppress(ConnectionError):  # the router hangs up
        await resp.write(b"data: ")
        for _ in range((MAX_ANSWER_BYTES >> 20) + 2):
            await resp.write(b"x" * (1 << 20))
    return resp


@pytest.fixture
async def hostile_upstream(aiohttp_server, router_client):
    upstream = web.Application()
    upstream.router.add_post("/bomb/v1/chat/completions", gzip_bomb)
    upstream.router.add_post("/endless/v1/chat/completions", endless_event)
    root = str((await aiohttp_server(upstream)).make_url("")).rstrip("/")
    providers = {
        name: {"type": "openai", "base_url": f"{root}/{name}/v1", "keys": ["k"]}
        for name in ("bomb", "endless")
    }
    models = {name: [{"provider": name, "model": "m"}] for name in providers}
    return await router_client(Config.from_dict({"providers": providers, "models": models}))


async def test_a_compressed_answer_that_inflates_to_gigabytes_is_a_502(hostile_upstream):
    body = {**ANTHROPIC_BODY, "model": "bomb"}
    resp = await hostile_upstream.post("/v1/messages", json=body)
    assert resp.status == 502
    error = await resp.json()
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert "upstream answer is over 64 MiB" in error["error"]["message"]


async def test_a_streamed_event_without_end_is_a_502(hostile_upstream):
    body = {**OPENAI_BODY, "model": "endless", "stream": True}
    resp = await hostile_upstream.post("/v1/chat/completions", json=body)
    assert resp.status == 502
    assert "upstream answer is over 64 MiB" in (await resp.json())["error"]["message"]
