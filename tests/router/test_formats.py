"""The format registry and contract: every route finds its client format, model listings answer
in the asking SDK's shape, providers find their upstream format, and a stream's upstream
headers reach the key pool as a complete answer's do."""

from __future__ import annotations

import json

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from router.config import Config, ProviderConfig
from router.formats.anthropic.upstream import AnthropicUpstream
from router.formats.base import ClientFormat, UpstreamFormat
from router.formats.gemini.upstream import GeminiUpstream
from router.formats.openai.upstream import OpenAIUpstream
from router.formats.registry import (
    ANTHROPIC,
    CLIENT_FORMATS,
    GEMINI,
    OPENAI,
    client_format_for_models,
    client_format_for_path,
    upstream_format,
)
from router.keys import KEY_POOLS


@pytest.mark.parametrize("fmt", CLIENT_FORMATS, ids=lambda f: f.name)
def test_each_route_of_a_format_maps_back_to_it(fmt: ClientFormat):
    assert isinstance(fmt, ClientFormat)
    for path in fmt.paths:
        concrete = path.replace("{target:.+}", "gemini-x:generateContent")
        assert client_format_for_path(concrete) is fmt


@pytest.mark.parametrize(
    "path, headers, expected",
    [
        ("/v1/models", {}, OPENAI),
        ("/v1/models", {"anthropic-version": "2023-06-01"}, ANTHROPIC),
        ("/v1/models", {"x-goog-api-key": "k"}, GEMINI),
        ("/v1/models?key=k", {}, GEMINI),
        ("/v1beta/models", {}, GEMINI),
    ],
)
def test_model_listings_answer_in_the_asking_sdks_format(path, headers, expected):
    request = make_mocked_request("GET", path, headers=headers)
    assert client_format_for_models(request) is expected


@pytest.mark.parametrize(
    "kind, base_url, expected, compatible",
    [
        ("openai", "https://api.openai.com/v1", OpenAIUpstream, False),
        ("openai", "http://127.0.0.1:8000/v1", OpenAIUpstream, True),
        ("anthropic", "https://api.anthropic.com", AnthropicUpstream, None),
        ("gemini", "https://generativelanguage.googleapis.com", GeminiUpstream, None),
    ],
)
def test_providers_find_their_upstream_format(kind, base_url, expected, compatible):
    wire = upstream_format(ProviderConfig(name="p", type=kind, base_url=base_url))
    assert isinstance(wire, UpstreamFormat) and type(wire) is expected
    if compatible is not None:
        assert wire.compatible is compatible


async def _used_up_stream(request: web.Request) -> web.StreamResponse:
    """An OpenAI stream whose 200 says the key's requests are used up for 20 s."""
    out = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "20s",
        }
    )
    await out.prepare(request)
    chunks = [
        {"id": "c1", "model": "m", "choices": [{"index": 0, "delta": {"content": "hi"}}]},
        {"id": "c1", "model": "m", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]
    for chunk in chunks:
        await out.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await out.write(b"data: [DONE]\n\n")
    await out.write_eof()
    return out


async def serve_upstream(aiohttp_server, route: str, handler) -> str:
    """A loopback upstream that answers ``POST route`` with ``handler``; returns its root URL."""
    upstream = web.Application()
    upstream.router.add_post(route, handler)
    server = await aiohttp_server(upstream)
    return str(server.make_url("")).rstrip("/")


def one_provider_config(name: str, provider: dict) -> Config:
    """A router whose model ``m`` is the provider's model ``up``."""
    return Config.from_dict(
        {"providers": {name: provider}, "models": {"m": [{"provider": name, "model": "up"}]}}
    )


async def test_a_streams_used_up_limit_rests_the_key(aiohttp_server, router_client):
    root = await serve_upstream(aiohttp_server, "/v1/chat/completions", _used_up_stream)
    keys = ["sk-stream-000", "sk-stream-111"]
    provider = {"type": "openai", "base_url": f"{root}/v1", "keys": keys}
    client = await router_client(one_provider_config("oai", provider))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with client.post("/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert b"[DONE]" in await resp.read()
    [first, second] = client.server.app[KEY_POOLS]["oai"].snapshot()
    assert first["state"] == "cooling" and second["state"] == "active"


async def _used_up_count(request: web.Request) -> web.Response:
    """A token count whose answer says the key's request budget is used up."""
    headers = {
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": "2099-01-01T00:00:00Z",
    }
    return web.json_response({"input_tokens": 7}, headers=headers)


async def test_a_token_counts_used_up_limit_rests_the_key(aiohttp_server, router_client):
    root = await serve_upstream(aiohttp_server, "/v1/messages/count_tokens", _used_up_count)
    keys = ["sk-ant-count-000", "sk-ant-count-111"]
    provider = {"type": "anthropic", "base_url": root, "keys": keys}
    client = await router_client(one_provider_config("ant", provider))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with client.post("/v1/messages/count_tokens", json=body) as resp:
        assert resp.status == 200
        assert (await resp.json()) == {"input_tokens": 7}
    [first, second] = client.server.app[KEY_POOLS]["ant"].snapshot()
    assert first["state"] == "cooling" and second["state"] == "active"
