"""The router as real clients and real providers see it: the SDK conformance matrix.

Every client format (openai chat.completions, anthropic messages, google-genai generate_content)
talks to the router through its official async SDK; the router serves each model from one fake
provider (OpenAI, Anthropic, Gemini). Each case runs streaming and not, for five scenarios (text,
image, one tool call, two parallel tool calls fed back, reasoning with its signature sent back).
The fakes validate every upstream request with the providers' SDK types; streams are checked
both by the SDKs' own parsers and by the grammar checkers over the raw bytes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import anthropic
import openai
import pytest
import pytest_asyncio
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from router.config import Config
from tests.router.fakes import (
    ANTHROPIC_KEYS,
    CLIENT_KEY,
    DRIVERS,
    ERROR_MESSAGE,
    GEMINI_KEYS,
    IMAGE_ANSWER,
    INPUT_TOKENS,
    KINDS,
    MIDSTREAM_ERRORS,
    OPENAI_KEYS,
    RED_PIXEL_PNG,
    RETRY_AFTER_S,
    SCENARIOS,
    SLOW_TEXT,
    SYSTEM_PROMPT,
    TEXT_ANSWER,
    Clients,
    ask,
    make_clients,
    read_first_text_then_leave,
    run_scenario,
)
from tests.router.helpers import LOOPBACK_FIXTURES, client_roots, running_router

# Async tests share the module-scoped fakes and router, so they run on the module's event loop.
module_loop = pytest.mark.asyncio(loop_scope="module")

# Client formats: the providers' three plus OpenAI's Responses API.
CLIENTS = [*KINDS, "responses"]
UPSTREAM_MODELS = {"openai": "gpt-fake", "anthropic": "claude-fake", "gemini": "gemini-fake"}


def router_config(roots: dict[str, str]) -> dict:
    """A config whose model ``m-<kind>`` is served by the fake provider of that kind."""
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "providers": {
            "oai": {"type": "openai", "base_url": f"{roots['openai']}/v1", "keys": OPENAI_KEYS},
            "claude": {"type": "anthropic", "base_url": roots["anthropic"], "keys": ANTHROPIC_KEYS},
            "gem": {"type": "gemini", "base_url": roots["gemini"], "keys": GEMINI_KEYS},
        },
        "models": {
            "m-openai": [{"provider": "oai", "model": UPSTREAM_MODELS["openai"]}],
            "m-anthropic": [{"provider": "claude", "model": UPSTREAM_MODELS["anthropic"]}],
            "m-gemini": [{"provider": "gem", "model": UPSTREAM_MODELS["gemini"]}],
            # Each provider first, then another: the fallback order.
            "m-fallback-openai": [
                {"provider": "oai", "model": UPSTREAM_MODELS["openai"]},
                {"provider": "claude", "model": UPSTREAM_MODELS["anthropic"]},
            ],
            "m-fallback-anthropic": [
                {"provider": "claude", "model": UPSTREAM_MODELS["anthropic"]},
                {"provider": "gem", "model": UPSTREAM_MODELS["gemini"]},
            ],
            "m-fallback-gemini": [
                {"provider": "gem", "model": UPSTREAM_MODELS["gemini"]},
                {"provider": "oai", "model": UPSTREAM_MODELS["openai"]},
            ],
        },
        "media": {"allow": [LOOPBACK_FIXTURES]},
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def router(upstreams) -> AsyncIterator[dict[str, str]]:
    """The router on loopback, in front of the module's fakes; yields its root per client kind."""
    async with running_router(Config.from_dict(router_config(upstreams.roots))) as server:
        yield client_roots(server)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def clients(router) -> AsyncIterator[Clients]:
    """SDK clients of the shared router, made once per module."""
    made = make_clients(router)
    yield made
    await made.close()


@pytest_asyncio.fixture(loop_scope="module")
async def fresh_router(upstreams) -> AsyncIterator[dict[str, str]]:
    """A router of the test's own: error tests cool keys down, which must not leak."""
    async with running_router(Config.from_dict(router_config(upstreams.roots))) as server:
        yield client_roots(server)


@pytest_asyncio.fixture(loop_scope="module")
async def fresh_clients(fresh_router) -> AsyncIterator[Clients]:
    made = make_clients(fresh_router)
    yield made
    await made.close()


@module_loop
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("upstream", KINDS, ids=lambda k: f"to-{k}")
@pytest.mark.parametrize("client", CLIENTS, ids=lambda k: f"from-{k}")
async def test_matrix(fakes, clients, client, upstream, scenario, stream):
    fake = fakes.by_name(upstream)
    await run_scenario(client, clients, f"m-{upstream}", scenario, stream, fake)
    for exchange in fake.exchanges:
        model = exchange.body.get("model") or exchange.path.split("/")[-1].split(":")[0]
        assert model == UPSTREAM_MODELS[upstream], f"upstream model {model!r}"


# An upstream 401 rejects the router's own key: the client gets a 502 that says so.
ERROR_CLASSES = {
    "openai": {
        400: openai.BadRequestError,
        401: openai.InternalServerError,
        429: openai.RateLimitError,
        500: openai.InternalServerError,
    },
    "anthropic": {
        400: anthropic.BadRequestError,
        401: anthropic.InternalServerError,
        429: anthropic.RateLimitError,
        500: anthropic.InternalServerError,
    },
    "gemini": {
        400: genai_errors.ClientError,
        401: genai_errors.ServerError,
        429: genai_errors.ClientError,
        500: genai_errors.ServerError,
    },
}
ERROR_CLASSES["responses"] = ERROR_CLASSES["openai"]


@module_loop
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("status", [400, 401, 429, 500])
@pytest.mark.parametrize("upstream", KINDS, ids=lambda k: f"to-{k}")
@pytest.mark.parametrize("client", CLIENTS, ids=lambda k: f"from-{k}")
async def test_upstream_errors_reach_client_sdk(
    fakes, fresh_clients, client, upstream, status, stream
):
    """An upstream 400/429/500 surfaces as the client SDK's own exception, message kept; an
    upstream 401 (the router's key rejected, on every key) as a 502 that says so."""
    with pytest.raises(ERROR_CLASSES[client][status]) as info:
        await ask(client, fresh_clients, f"m-{upstream}", f"scenario:error-{status}", stream)
    err = info.value
    got = err.code if client == "gemini" else err.status_code
    if status == 401:
        assert got == 502, f"status {got}: {err}"
        assert "rejected the router's credential" in str(err), err
        assert ERROR_MESSAGE not in str(err), f"the upstream's message reached the client: {err}"
        return
    # Server errors may be reported as 500 or as a gateway's 502; both are "upstream failed".
    assert got == status or (status == 500 and got in (500, 502)), f"status {got}: {err}"
    assert ERROR_MESSAGE in str(err), f"upstream message lost: {err}"
    assert fakes.by_name(upstream).exchanges, "the fake was never called"


@module_loop
@pytest.mark.parametrize("upstream", KINDS, ids=lambda k: f"to-{k}")
@pytest.mark.parametrize("client", CLIENTS, ids=lambda k: f"from-{k}")
async def test_midstream_error_reaches_client(fakes, fresh_clients, client, upstream):
    """An error event after the first delta (no retry possible) ends the client's stream with
    its own format's error, which its SDK raises; never a silently truncated success."""
    model, prompt = f"m-{upstream}", "scenario:midstream-error"
    if client == "responses":
        # The openai SDK yields Responses `error` events instead of raising them.
        stream = await fresh_clients.openai.responses.create(model=model, input=prompt, stream=True)
        events = [event async for event in stream]
        kinds = [e.type for e in events]
        messages = [e.message for e in events if e.type == "error"] + [
            e.response.error.message for e in events if e.type == "response.failed"
        ]
        assert any(ERROR_MESSAGE in m for m in messages), f"no error event: {kinds}"
        assert "response.completed" not in kinds, kinds
        return
    with pytest.raises(MIDSTREAM_ERRORS[client], match=ERROR_MESSAGE):
        await ask(client, fresh_clients, model, prompt, stream=True)


@module_loop
@pytest.mark.parametrize("client", KINDS)
async def test_unknown_model_is_404(fakes, clients, client):
    expected = {
        "openai": openai.NotFoundError,
        "anthropic": anthropic.NotFoundError,
        "gemini": genai_errors.ClientError,
    }[client]
    with pytest.raises(expected, match="no-such-model") as info:
        await ask(client, clients, "no-such-model", "scenario:text", stream=False)
    if client == "gemini":
        assert info.value.code == 404
    assert not any(f.exchanges for f in fakes.all()), "an unknown model reached an upstream"


@module_loop
@pytest.mark.parametrize(
    ("extra", "field"),
    [
        # Anthropic has no JSON mode without a schema (router/formats/anthropic/upstream.py).
        ({"response_format": {"type": "json_object"}}, "response_format"),
        # Several choices per request are not supported by the router.
        ({"n": 2}, "n"),
    ],
)
async def test_openai_request_target_cannot_express_is_400(fakes, clients, extra, field):
    with pytest.raises(openai.BadRequestError) as info:
        await clients.openai.chat.completions.create(
            model="m-anthropic",
            messages=[{"role": "user", "content": "scenario:text"}],
            **extra,
        )
    body = info.value.body
    assert field in info.value.message, info.value.message
    assert isinstance(body, dict) and body.get("param", "").startswith(field), body
    assert not fakes.anthropic.exchanges, "an inexpressible request reached the upstream"


@module_loop
async def test_gemini_request_target_cannot_express_is_400(fakes, clients):
    config = genai_types.GenerateContentConfig(candidate_count=2)
    with pytest.raises(genai_errors.ClientError, match="candidateCount") as info:
        await clients.gemini.aio.models.generate_content(
            model="m-anthropic", contents="scenario:text", config=config
        )
    assert info.value.code == 400
    assert info.value.status == "INVALID_ARGUMENT"
    assert not fakes.anthropic.exchanges


@module_loop
async def test_model_lists(fakes, clients):
    ids = [m.id async for m in clients.openai.models.list()]
    assert {"m-openai", "m-anthropic", "m-gemini"} <= set(ids), ids
    pager = await clients.gemini.aio.models.list()
    names = [m.name async for m in pager]
    assert {"models/m-openai", "models/m-anthropic", "models/m-gemini"} <= set(names), names


@module_loop
async def test_genai_default_api_version(fakes, router):
    """google-genai 3.x calls ``/v1/models/{m}:generateContent`` unless told ``v1beta``."""
    default_clients = make_clients(router, api_version="v1")
    try:
        answer = await ask("gemini", default_clients, "m-openai", "scenario:text", stream=False)
    finally:
        await default_clients.close()
    assert answer == TEXT_ANSWER


NEXT_PROVIDER = {"openai": "anthropic", "anthropic": "gemini", "gemini": "openai"}


@module_loop
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("status", [429, 500])
@pytest.mark.parametrize("upstream", KINDS, ids=lambda k: f"to-{k}")
@pytest.mark.parametrize("client", KINDS, ids=lambda k: f"from-{k}")
async def test_failed_provider_falls_back(fakes, fresh_clients, client, upstream, status, stream):
    """A 429/500 from the first provider of a model's list is answered by the next one."""
    first, second = fakes.by_name(upstream), fakes.by_name(NEXT_PROVIDER[upstream])
    first.fail_next(*[status] * len(first.keys))
    answer = await ask(client, fresh_clients, f"m-fallback-{upstream}", "scenario:text", stream)
    assert answer == TEXT_ANSWER
    assert len(first.exchanges) >= 1 and len(second.exchanges) == 1, (
        f"{upstream} saw {len(first.exchanges)}, {second.name} saw {len(second.exchanges)}"
    )


@module_loop
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("client", KINDS)
async def test_rate_limited_key_rotates_to_next_key(fakes, fresh_clients, client, stream):
    """Anthropic has two keys: a 429 on one is retried on the other, and the client never knows."""
    fakes.anthropic.fail_next(429)
    answer = await ask(client, fresh_clients, "m-anthropic", "scenario:text", stream)
    assert answer == TEXT_ANSWER
    keys = [e.key for e in fakes.anthropic.exchanges]
    assert len(keys) == 2 and keys[0] != keys[1], f"keys used: {keys}"


@module_loop
@pytest.mark.parametrize("upstream", KINDS, ids=lambda k: f"to-{k}")
@pytest.mark.parametrize("client", KINDS, ids=lambda k: f"from-{k}")
async def test_client_disconnect_cancels_upstream(
    fakes, fresh_router, fresh_clients, client, upstream
):
    """A client that walks away mid-stream makes the router drop the upstream stream too
    (hard case 13: upstreams kept generating for minutes)."""
    fake = fakes.by_name(upstream)
    first = await read_first_text_then_leave(client, fresh_clients, fresh_router, f"m-{upstream}")
    assert SLOW_TEXT.startswith(first.strip()), first
    for _ in range(40):
        if fake.disconnects:
            break
        await asyncio.sleep(0.05)
    assert fake.disconnects == 1, (
        "the upstream stream was still being read 2 s after the client left"
    )


@module_loop
@pytest.mark.parametrize("upstream", KINDS, ids=lambda k: f"to-{k}")
@pytest.mark.parametrize("client", CLIENTS, ids=lambda k: f"from-{k}")
async def test_error_before_first_delta_is_retried(fakes, fresh_clients, client, upstream):
    """A 200 stream that fails before any content (Anthropic's overloaded_error after
    message_start) is retried, on the fallback provider, before the client sees a byte of it."""
    first, second = fakes.by_name(upstream), fakes.by_name(NEXT_PROVIDER[upstream])
    first.fail_stream_next(len(first.keys))
    answer = await ask(client, fresh_clients, f"m-fallback-{upstream}", "scenario:text", True)
    assert answer == TEXT_ANSWER
    assert len(second.exchanges) == 1, f"{second.name} saw {len(second.exchanges)} requests"


@module_loop
@pytest.mark.parametrize("upstream", KINDS, ids=lambda k: f"to-{k}")
@pytest.mark.parametrize("client", ["openai", "anthropic", "responses"], ids=lambda k: f"from-{k}")
async def test_image_url(fakes, clients, client, upstream):
    """An image given by URL reaches the provider: inlined for Gemini, which rejects arbitrary
    URLs (hard case 9); inlined or as the same URL for the others."""
    url = f"{fakes.roots['openai']}/red.png"
    driver = DRIVERS[client](clients, f"m-{upstream}")
    driver.add_user("What is this? scenario:image", image_url=url)
    out = await driver.send(stream=False)
    assert out.text == IMAGE_ANSWER
    seen = fakes.by_name(upstream).last.seen
    if upstream == "gemini":
        assert seen.images == [RED_PIXEL_PNG], f"images {seen.images}, urls {seen.image_urls}"
    else:
        assert seen.images == [RED_PIXEL_PNG] or seen.image_urls == [url], seen


@module_loop
@pytest.mark.parametrize("upstream", KINDS, ids=lambda k: f"to-{k}")
@pytest.mark.parametrize("client", ["anthropic", "gemini"], ids=lambda k: f"from-{k}")
async def test_count_tokens(fakes, clients, client, upstream):
    """Anthropic and Gemini count the prompt upstream; OpenAI has no endpoint, so an estimate."""
    prompt = "How many tokens is this prompt? scenario:text"
    if client == "anthropic":
        counted = await clients.anthropic.messages.count_tokens(
            model=f"m-{upstream}", messages=[{"role": "user", "content": prompt}]
        )
        tokens = counted.input_tokens
    else:
        counted = await clients.gemini.aio.models.count_tokens(
            model=f"m-{upstream}", contents=prompt
        )
        tokens = counted.total_tokens
    if upstream == "openai":
        assert tokens and tokens > 0, counted
    else:
        assert tokens == INPUT_TOKENS, f"counted {tokens}, upstream said {INPUT_TOKENS}"
        assert prompt in fakes.by_name(upstream).last.seen.user_texts


@module_loop
@pytest.mark.parametrize("upstream", KINDS, ids=lambda k: f"to-{k}")
@pytest.mark.parametrize("client", CLIENTS, ids=lambda k: f"from-{k}")
async def test_rate_limit_tells_client_when_to_retry(fakes, fresh_clients, client, upstream):
    """When every key is rate limited the client gets 429 with the upstream's Retry-After."""
    fake = fakes.by_name(upstream)
    fake.fail_next(*[429] * len(fake.keys))
    with pytest.raises(ERROR_CLASSES[client][429]) as info:
        await ask(client, fresh_clients, f"m-{upstream}", "scenario:text", stream=False)
    headers = info.value.response.headers
    assert headers.get("retry-after") is not None, f"no Retry-After: {dict(headers)}"
    assert 1 <= float(headers["retry-after"]) <= RETRY_AFTER_S, headers["retry-after"]


SECOND_SYSTEM = "Answer in English."


@module_loop
@pytest.mark.parametrize("upstream", KINDS, ids=lambda k: f"to-{k}")
@pytest.mark.parametrize("client", KINDS, ids=lambda k: f"from-{k}")
async def test_every_system_text_arrives_in_order(fakes, clients, client, upstream):
    """Two system texts both reach the provider, in order (hard case 10: several system
    messages were collapsed to the last one)."""
    model, prompt = f"m-{upstream}", "scenario:text"
    if client == "openai":
        await clients.openai.chat.completions.create(
            model=model,
            messages=[
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "system", "content": SECOND_SYSTEM},
                {"role": "user", "content": prompt},
            ],
        )
    elif client == "anthropic":
        await clients.anthropic.messages.create(
            model=model,
            max_tokens=64,
            system=[
                {"type": "text", "text": SYSTEM_PROMPT},
                {"type": "text", "text": SECOND_SYSTEM},
            ],
            messages=[{"role": "user", "content": prompt}],
        )
    else:
        system = genai_types.Content(
            parts=[genai_types.Part(text=SYSTEM_PROMPT), genai_types.Part(text=SECOND_SYSTEM)]
        )
        await clients.gemini.aio.models.generate_content(
            model=model,
            contents=prompt,
            config=genai_types.GenerateContentConfig(system_instruction=system),
        )
    system_seen = fakes.by_name(upstream).last.seen.system
    assert SYSTEM_PROMPT in system_seen and SECOND_SYSTEM in system_seen, system_seen
    assert system_seen.index(SYSTEM_PROMPT) < system_seen.index(SECOND_SYSTEM), system_seen


@module_loop
@pytest.mark.parametrize("upstream", KINDS, ids=lambda k: f"to-{k}")
async def test_gemini_stream_without_alt_sse_is_a_json_array(fakes, router, upstream):
    """``:streamGenerateContent`` without ``alt=sse`` answers one JSON array, as Google does."""
    url = f"{router['gemini']}/v1beta/models/m-{upstream}:streamGenerateContent"
    body = {"contents": [{"role": "user", "parts": [{"text": "scenario:text"}]}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=body, headers={"x-goog-api-key": CLIENT_KEY}) as r:
            assert r.status == 200, await r.text()
            chunks = json.loads(await r.read())
    assert isinstance(chunks, list) and chunks, chunks
    for chunk in chunks:
        genai_types.GenerateContentResponse.model_validate_json(json.dumps(chunk))
    parts = [
        p
        for c in chunks
        for cand in c.get("candidates", [])
        for p in cand.get("content", {}).get("parts", [])
    ]
    text = "".join(p.get("text", "") for p in parts)
    assert text == TEXT_ANSWER
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    assert chunks[-1]["usageMetadata"]["promptTokenCount"] == INPUT_TOKENS


@module_loop
@pytest.mark.parametrize("upstream", KINDS, ids=lambda k: f"to-{k}")
@pytest.mark.parametrize("client", CLIENTS, ids=lambda k: f"from-{k}")
async def test_sampling_parameters_map(fakes, clients, client, upstream):
    """max tokens, temperature and stop sequences reach the provider under its own names
    (temperature only where the provider takes one)."""
    model, prompt = f"m-{upstream}", "scenario:text"
    messages = [{"role": "user", "content": prompt}]
    if client == "openai":
        await clients.openai.chat.completions.create(
            model=model, messages=messages, max_tokens=77, temperature=0.25, stop=["END"]
        )
    elif client == "anthropic":
        # anthropic SDK 2.x takes no temperature.
        await clients.anthropic.messages.create(
            model=model, messages=messages, max_tokens=77, stop_sequences=["END"]
        )
    elif client == "gemini":
        config = genai_types.GenerateContentConfig(
            max_output_tokens=77, temperature=0.25, stop_sequences=["END"]
        )
        await clients.gemini.aio.models.generate_content(
            model=model, contents=prompt, config=config
        )
    else:
        await clients.openai.responses.create(
            model=model, input=prompt, max_output_tokens=77, temperature=0.25
        )
    seen = fakes.by_name(upstream).last.seen
    assert seen.max_tokens == 77, seen
    if upstream == "anthropic":
        # anthropic SDK 2.x's MessageCreateParams has no temperature/top_p/top_k.
        assert seen.temperature is None, f"temperature sent to Anthropic: {seen.temperature}"
    elif client != "anthropic":
        assert seen.temperature == 0.25, seen
    if client != "responses":
        assert seen.stop == ["END"], seen.stop
