"""The router app end to end against a small fake upstream: routing, translation through a
live server, fallback, key pooling, bad input, body limits and stream grammar basics."""

from __future__ import annotations

import base64
import json
import statistics
import time

import pytest

from router.config import Config, ConfigError, load_config
from router.keys import KEY_POOLS
from router.sse import SSEDecoder
from tests.router.helpers import (
    ANTHROPIC_BODY,
    GEMINI_BODY,
    OPENAI_BODY,
    PNG_BYTES,
    Answer,
    anthropic_events,
    make_config,
    openai_chunk,
    openai_tool_chunk,
)


async def sse_events(resp) -> list:
    decoder = SSEDecoder()
    events = decoder.feed(await resp.read()) + decoder.flush()
    return [(e.event, e.data if e.data == "[DONE]" else json.loads(e.data)) for e in events]


# ---- happy paths through each client format ---------------------------------------------------


async def test_openai_client_to_anthropic_upstream(client, fake):
    resp = await client.post("/v1/chat/completions", json={**OPENAI_BODY, "model": "claude"})
    assert resp.status == 200
    body = await resp.json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert body["usage"]["prompt_tokens"] == 5
    seen = fake.seen[-1]
    assert seen.path == "/v1/messages"
    assert seen.headers["x-api-key"] in ("ak-1", "ak-2")
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert seen.body["model"] == "claude-up"


async def test_anthropic_client_to_gemini_upstream(client, fake):
    resp = await client.post("/v1/messages", json={**ANTHROPIC_BODY, "model": "gemini"})
    assert resp.status == 200
    body = await resp.json()
    assert body["content"] == [{"type": "text", "text": "hello"}]
    assert body["stop_reason"] == "end_turn"
    seen = fake.seen[-1]
    assert seen.path == "/v1beta/models/gemini-up:generateContent"
    assert seen.headers["x-goog-api-key"] == "gk-1"


async def test_gemini_client_to_openai_upstream(client, fake):
    resp = await client.post("/v1beta/models/gpt:generateContent", json=GEMINI_BODY)
    assert resp.status == 200
    body = await resp.json()
    assert body["candidates"][0]["content"]["parts"] == [{"text": "hello"}]
    assert body["usageMetadata"]["totalTokenCount"] == 7
    assert fake.seen[-1].headers["Authorization"] == "Bearer sk-1"


async def test_upstream_cookies_are_not_kept_for_the_next_request(router_client, fake):
    # One client's upstream session cookie must not ride on another client's request. By name,
    # not IP: aiohttp's default jar ignores cookies of IP addresses.
    client = await router_client(make_config(fake.base_url.replace("127.0.0.1", "localhost")))
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]}
    fake.queue("openai", Answer(body=body, headers={"Set-Cookie": "session=alice; Path=/"}))
    for _ in range(2):
        resp = await client.post("/v1/chat/completions", json={**OPENAI_BODY, "model": "gpt"})
        assert resp.status == 200
    assert "Cookie" not in fake.seen[-1].headers


async def test_provider_slash_model_routes_without_alias(client, fake):
    resp = await client.post("/v1/chat/completions", json={**OPENAI_BODY, "model": "oai/other"})
    assert resp.status == 200
    assert fake.seen[-1].body["model"] == "other"


async def test_openai_stream_from_anthropic_thinking_and_parallel_tools(client, fake):
    fake.queue(
        "anthropic",
        Answer(
            events=anthropic_events(
                (
                    {"type": "thinking", "thinking": "", "signature": ""},
                    [
                        {"type": "thinking_delta", "thinking": "hmm"},
                        {"type": "signature_delta", "signature": "SIG"},
                    ],
                ),
                (
                    {"type": "tool_use", "id": "toolu_1", "name": "a", "input": {}},
                    [
                        {"type": "input_json_delta", "partial_json": '{"x":'},
                        {"type": "input_json_delta", "partial_json": "1}"},
                    ],
                ),
                (
                    {"type": "tool_use", "id": "toolu_2", "name": "b", "input": {}},
                    [{"type": "input_json_delta", "partial_json": "{}"}],
                ),
                stop_reason="tool_use",
            )
        ),
    )
    body = {
        **OPENAI_BODY,
        "model": "claude",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200
    events = [data for _, data in await sse_events(resp)]
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "hmm"
    blocks = [b for d in deltas for b in d.get("thinking_blocks", [])]
    assert blocks == [{"type": "thinking", "thinking": "hmm", "signature": "SIG"}]
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    firsts = [c for c in calls if "id" in c]
    assert [(c["index"], c["id"], c["function"]["name"]) for c in firsts] == [
        (0, "toolu_1", "a"),
        (1, "toolu_2", "b"),
    ]
    assert all("id" not in c and "name" not in c["function"] for c in calls if c not in firsts)
    args = {
        i: "".join(c["function"]["arguments"] for c in calls if c["index"] == i) for i in (0, 1)
    }
    assert args == {0: '{"x":1}', 1: "{}"}
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert [f for f in finishes if f] == ["tool_calls"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 9
    assert len({c["id"] for c in chunks}) == 1


async def test_anthropic_stream_from_openai_parallel_tool_calls(client, fake):
    fake.queue(
        "openai",
        Answer(
            events=[
                (None, openai_chunk({"role": "assistant", "content": None})),
                (None, openai_tool_chunk(0, "", "c1", "a")),
                (None, openai_tool_chunk(0, '{"q":2}')),
                (None, openai_tool_chunk(1, "{}", "c2", "b")),
                (None, openai_chunk({}, "tool_calls")),
                (
                    None,
                    {
                        **openai_chunk({}),
                        "choices": [],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
                    },
                ),
                (None, "[DONE]"),
            ]
        ),
    )
    resp = await client.post(
        "/v1/messages", json={**ANTHROPIC_BODY, "model": "gpt", "stream": True}
    )
    assert resp.status == 200
    events = await sse_events(resp)
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    starts = [d for n, d in events if n == "content_block_start"]
    assert [(s["index"], s["content_block"]["id"]) for s in starts] == [(0, "c1"), (1, "c2")]
    delta = next(d for n, d in events if n == "message_delta")
    assert delta["delta"]["stop_reason"] == "tool_use"
    assert delta["usage"]["output_tokens"] == 4 and delta["usage"]["input_tokens"] == 3
    # The router asked the OpenAI upstream for usage in the stream.
    assert fake.seen[-1].body["stream_options"] == {"include_usage": True}


async def test_gemini_stream_sse_and_json_array(client, fake):
    resp = await client.post(
        "/v1beta/models/claude:streamGenerateContent?alt=sse", json=GEMINI_BODY
    )
    assert resp.status == 200
    chunks = [d for _, d in await sse_events(resp)]
    text = "".join(
        p["text"]
        for c in chunks
        for cand in c["candidates"]
        for p in cand.get("content", {}).get("parts", [])
    )
    assert text == "hello"
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    assert chunks[-1]["usageMetadata"]["candidatesTokenCount"] == 9

    resp = await client.post("/v1beta/models/claude:streamGenerateContent", json=GEMINI_BODY)
    assert resp.status == 200
    array = json.loads(await resp.text())
    assert isinstance(array, list) and array[-1]["candidates"][0]["finishReason"] == "STOP"


async def test_responses_api_text_and_stream(client, fake):
    body = {"model": "gpt", "input": "hi", "instructions": "be brief"}
    resp = await client.post("/v1/responses", json=body)
    assert resp.status == 200
    out = await resp.json()
    assert out["object"] == "response" and out["status"] == "completed"
    assert out["output"][0]["content"][0]["text"] == "hello"
    assert fake.seen[-1].body["messages"][0] == {"role": "system", "content": "be brief"}

    resp = await client.post("/v1/responses", json={**body, "stream": True})
    events = await sse_events(resp)
    names = [n for n, _ in events]
    assert names[:2] == ["response.created", "response.in_progress"]
    assert names[-1] == "response.completed"
    assert "response.output_text.delta" in names
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    assert events[-1][1]["response"]["output"][0]["content"][0]["text"] == "hello"


async def test_count_tokens_and_models(client, fake):
    resp = await client.post(
        "/v1/messages/count_tokens",
        json={"model": "claude", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert resp.status == 200 and await resp.json() == {"input_tokens": 42}
    resp = await client.post("/v1beta/models/gpt:countTokens", json=GEMINI_BODY)
    assert resp.status == 200 and (await resp.json())["totalTokens"] >= 1
    models = await (await client.get("/v1/models")).json()
    assert {m["id"] for m in models["data"]} == {"gpt", "claude", "gemini", "fallback"}
    gmodels = await (await client.get("/v1beta/models")).json()
    assert "models/gpt" in {m["name"] for m in gmodels["models"]}
    amodels = await (await client.get("/v1/models", headers={"anthropic-version": "x"})).json()
    assert amodels["data"][0]["type"] == "model"


# ---- images ------------------------------------------------------------------------------------


def image_request(url: str) -> dict:
    return {
        "model": "gemini",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this"},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
    }


async def test_image_url_is_fetched_and_inlined_for_gemini(client, fake):
    resp = await client.post(
        "/v1/chat/completions", json=image_request(f"{fake.base_url}/image.png")
    )
    assert resp.status == 200
    part = fake.seen[-1].body["contents"][0]["parts"][1]
    assert part["inlineData"]["mimeType"] == "image/png"
    assert base64.b64decode(part["inlineData"]["data"]) == PNG_BYTES


async def test_image_url_is_passed_as_url_to_anthropic(client, fake):
    body = image_request(f"{fake.base_url}/image.png") | {"model": "claude"}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200
    block = fake.seen[-1].body["messages"][0]["content"][1]
    assert block == {
        "type": "image",
        "source": {"type": "url", "url": f"{fake.base_url}/image.png"},
    }


@pytest.mark.parametrize(
    "path,status_word", [("/hang.png", "timed out"), ("/missing.png", "HTTP 404")]
)
async def test_bad_image_url_is_a_400_naming_it_and_server_keeps_serving(
    client, fake, path, status_word
):
    url = f"{fake.base_url}{path}"
    resp = await client.post("/v1/chat/completions", json=image_request(url))
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert url in error["message"] and status_word in error["message"]
    assert error["type"] == "invalid_request_error"
    resp = await client.post("/v1/chat/completions", json=OPENAI_BODY)
    assert resp.status == 200


# ---- bad input ---------------------------------------------------------------------------------

FORMAT_CASES = [
    ("/v1/chat/completions", lambda b: b["error"]["message"]),
    ("/v1/responses", lambda b: b["error"]["message"]),
    ("/v1/messages", lambda b: b["type"] == "error" and b["error"]["message"]),
    ("/v1beta/models/gpt:generateContent", lambda b: b["error"]["message"]),
]


@pytest.mark.parametrize("path,message", FORMAT_CASES)
async def test_malformed_json_is_400_in_client_format(client, path, message):
    resp = await client.post(path, data=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert "not valid JSON" in message(await resp.json())
    resp = await client.post(path, data=b"[1, 2]")
    assert resp.status == 400
    assert "JSON object" in message(await resp.json())


@pytest.mark.parametrize(
    "path,body,culprit",
    [
        ("/v1/chat/completions", {"model": "gpt"}, "messages"),
        ("/v1/chat/completions", {"model": 3, "messages": []}, "model"),
        ("/v1/chat/completions", {**OPENAI_BODY, "temperature": "hot"}, "temperature"),
        (
            "/v1/chat/completions",
            {**OPENAI_BODY, "messages": [{"role": "user", "content": 5}]},
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            {**OPENAI_BODY, "messages": [{"role": "wizard", "content": "x"}]},
            "messages[0].role",
        ),
        ("/v1/messages", {"model": "claude", "messages": []}, "max_tokens"),
        ("/v1/messages", {**ANTHROPIC_BODY, "messages": [{"role": "user"}]}, "messages[0].content"),
        (
            "/v1/messages",
            {**ANTHROPIC_BODY, "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
            "messages[0].content[0].type",
        ),
        ("/v1beta/models/gpt:generateContent", {"contents": "hi"}, "contents"),
        (
            "/v1beta/models/gpt:generateContent",
            {"contents": [{"parts": [{"foo": 1}]}]},
            "contents[0].parts[0]",
        ),
        ("/v1/responses", {"model": "gpt"}, "input"),
    ],
)
async def test_invalid_fields_are_400_naming_the_field(client, path, body, culprit):
    resp = await client.post(path, json=body)
    assert resp.status == 400
    text = json.dumps(await resp.json())
    assert culprit in text


async def test_audio_to_anthropic_is_a_400_naming_the_field(client, fake):
    body = {
        "model": "claude",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
                ],
            }
        ],
    }
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert "messages[0].content[0]" in error["message"] and "audio/wav" in error["message"]
    assert not fake.seen


async def test_json_object_to_anthropic_is_a_400(client, fake):
    body = {**OPENAI_BODY, "model": "claude", "response_format": {"type": "json_object"}}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "response_format"


@pytest.mark.parametrize(
    "path,body,check",
    [
        (
            "/v1/chat/completions",
            OPENAI_BODY,
            lambda b: b["error"]["code"] == "model_not_found" and b["error"]["param"] == "model",
        ),
        ("/v1/messages", ANTHROPIC_BODY, lambda b: b["error"]["type"] == "not_found_error"),
        (
            "/v1beta/models/nope:generateContent",
            GEMINI_BODY,
            lambda b: b["error"]["status"] == "NOT_FOUND" and b["error"]["code"] == 404,
        ),
    ],
)
async def test_unknown_model_is_404_in_client_format(client, path, body, check):
    resp = await client.post(path, json={**body, "model": "nope"} if "model" in body else body)
    assert resp.status == 404
    assert check(await resp.json())


async def test_unknown_route_is_404_in_client_format(client):
    resp = await client.post("/v1/messages/nothing", json={})
    assert resp.status == 404
    assert (await resp.json())["type"] == "error"


@pytest.mark.parametrize(
    "path,kind",
    [
        ("/v1/chat/completions", lambda b: b["error"]["code"] == "request_too_large"),
        ("/v1/messages", lambda b: b["error"]["type"] == "request_too_large"),
        ("/v1beta/models/gpt:generateContent", lambda b: b["error"]["code"] == 413),
    ],
)
async def test_50mb_body_is_413_and_server_keeps_serving(client, path, kind):
    big = b'{"model": "gpt", "messages": [], "pad": "' + b"x" * (50 * 1024 * 1024) + b'"}'
    resp = await client.post(path, data=big, headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert kind(await resp.json())
    resp = await client.post("/v1/chat/completions", json=OPENAI_BODY)
    assert resp.status == 200


# ---- upstream failures, fallback and keys ------------------------------------------------------


async def test_fallback_on_5xx_before_first_byte(client, fake):
    fake.queue("openai", Answer(status=503, body={"error": {"message": "busy"}}))
    resp = await client.post("/v1/chat/completions", json={**OPENAI_BODY, "model": "fallback"})
    assert resp.status == 200
    assert [s.path for s in fake.seen] == ["/v1/chat/completions", "/v1/messages"]


async def test_no_fallback_on_400(client, fake):
    fake.queue("openai", Answer(status=400, body={"error": {"message": "bad tool schema"}}))
    resp = await client.post("/v1/messages", json={**ANTHROPIC_BODY, "model": "fallback"})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"]["type"] == "invalid_request_error"
    assert "bad tool schema" in body["error"]["message"]
    assert len(fake.seen) == 1


async def test_stream_falls_back_on_overloaded_event_before_content(client, fake):
    fake.queue("openai", Answer(status=500, body={"error": {"message": "boom"}}))
    overloaded = [
        ("message_start", anthropic_events()[0][1]),
        (
            "error",
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        ),
    ]
    fake.queue("anthropic", Answer(events=overloaded))
    resp = await client.post(
        "/v1/messages", json={**ANTHROPIC_BODY, "model": "fallback", "stream": True}
    )
    # Both targets failed before any content: the client gets a clean HTTP error.
    assert resp.status == 529
    assert (await resp.json())["error"]["type"] == "overloaded_error"


async def test_error_after_stream_started_is_an_error_event(client, fake):
    events = anthropic_text_stream_broken()
    fake.queue("anthropic", Answer(events=events))
    resp = await client.post(
        "/v1/chat/completions", json={**OPENAI_BODY, "model": "claude", "stream": True}
    )
    assert resp.status == 200
    chunks = [d for _, d in await sse_events(resp)]
    assert "error" in chunks[-1] and "Overloaded" in chunks[-1]["error"]["message"]
    resp = await client.post("/v1/chat/completions", json=OPENAI_BODY)
    assert resp.status == 200


def anthropic_text_stream_broken() -> list:
    events = anthropic_events(
        ({"type": "text", "text": ""}, [{"type": "text_delta", "text": "partial"}])
    )
    return events[:4] + [
        ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    ]


async def test_429_cools_the_key_and_uses_the_next_one(client, fake):
    fake.queue(
        "anthropic",
        Answer(
            status=429,
            body={"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}},
            headers={"Retry-After": "30"},
        ),
    )
    resp = await client.post("/v1/messages", json=ANTHROPIC_BODY)
    assert resp.status == 200
    keys = [s.headers["x-api-key"] for s in fake.seen]
    assert len(keys) == 2 and keys[0] != keys[1]
    # The cooled key is skipped on the next requests.
    for _ in range(2):
        await client.post("/v1/messages", json=ANTHROPIC_BODY)
    assert {s.headers["x-api-key"] for s in fake.seen[2:]} == {keys[1]}


async def test_429_on_all_keys_reaches_client_with_retry_after(client, fake):
    fake.queue(
        "openai",
        Answer(status=429, body={"error": {"message": "rate"}}, headers={"Retry-After": "7"}),
    )
    resp = await client.post("/v1beta/models/gpt:generateContent", json=GEMINI_BODY)
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "7"
    assert (await resp.json())["error"]["status"] == "RESOURCE_EXHAUSTED"


async def test_connection_refused_is_502(router_client, unused_tcp_port):
    cfg = make_config(f"http://127.0.0.1:{unused_tcp_port}")
    client = await router_client(cfg)
    resp = await client.post("/v1/chat/completions", json=OPENAI_BODY)
    assert resp.status == 502
    assert "connection failed" in (await resp.json())["error"]["message"]


# ---- config ------------------------------------------------------------------------------------


def test_load_config_expands_env_and_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("K1", "secret")
    path = tmp_path / "router.yaml"
    path.write_text(
        "providers:\n  oai: {type: openai, keys: ['${K1}']}\n  gem: {type: gemini}\n"
        "models:\n  fast: [{provider: oai, model: gpt-4o-mini}]\n"
    )
    cfg = load_config(path)
    assert cfg.providers["oai"].keys == ["secret"]
    assert cfg.providers["oai"].base_url == "https://api.openai.com/v1"
    assert cfg.providers["gem"].base_url == "https://generativelanguage.googleapis.com"
    assert cfg.listen.port == 8080


@pytest.mark.parametrize(
    "data,culprit",
    [
        ({"providers": {"x": {"type": "nope"}}, "models": {}}, "providers.x.type"),
        ({"providers": {"x": {"type": "openai", "colour": 1}}, "models": {}}, "colour"),
        (
            {"providers": {}, "models": {"m": [{"provider": "y", "model": "z"}]}},
            "models.m[0].provider",
        ),
        ({"providers": {"x": {"type": "openai", "keys": "k"}}, "models": {}}, "providers.x.keys"),
        ({"providers": {}, "models": {}, "listen": {"port": "80"}}, "listen.port"),
        (
            {"providers": {"x": {"type": "openai", "headers": {"X-Org": 1}}}, "models": {}},
            "providers.x.headers.X-Org",
        ),
        ({"providers": {}}, "models"),
    ],
)
def test_bad_config_names_the_key(data, culprit):
    with pytest.raises(ConfigError, match=culprit.replace("[", r"\[").replace("]", r"\]")):
        Config.from_dict(data)


def test_missing_env_var_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("NOPE_KEY", raising=False)
    path = tmp_path / "router.yaml"
    path.write_text("providers:\n  a: {type: anthropic, keys: ['${NOPE_KEY}']}\nmodels: {}\n")
    with pytest.raises(ConfigError, match="NOPE_KEY"):
        load_config(path)


async def test_google_retry_info_sets_the_cool_down(client, fake):
    body = {
        "error": {
            "code": 429,
            "message": "quota",
            "status": "RESOURCE_EXHAUSTED",
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "31s"}],
        }
    }
    fake.queue("gemini", Answer(status=429, body=body))
    resp = await client.post("/v1/chat/completions", json={**OPENAI_BODY, "model": "gemini"})
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "31"


async def test_gemini_daily_quota_parks_the_key_until_the_reset(client, fake):
    body = {
        "error": {
            "code": 429,
            "message": "You exceeded your current quota, please check your plan.",
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [{"quotaId": "GenerateRequestsPerDayPerProjectPerModel"}],
                },
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "28s"},
            ],
        }
    }
    fake.queue("gemini", Answer(status=429, body=body))
    resp = await client.post("/v1/chat/completions", json={**OPENAI_BODY, "model": "gemini"})
    assert resp.status == 429
    (key,) = client.app[KEY_POOLS]["gem"].snapshot()
    # Parked until Google's daily reset (midnight Pacific), not cooled for the 28 s retry delay.
    assert key["state"] == "parked" and key["until"] - time.time() > 60


async def test_responses_stream_with_parallel_function_calls(client, fake):
    fake.queue(
        "openai",
        Answer(
            events=[
                (None, openai_chunk({"role": "assistant", "content": None})),
                (None, openai_tool_chunk(0, '{"x":', "c1", "a")),
                (None, openai_tool_chunk(0, "1}")),
                (None, openai_tool_chunk(1, "{}", "c2", "b")),
                (None, openai_chunk({}, "tool_calls")),
                (None, "[DONE]"),
            ]
        ),
    )
    resp = await client.post("/v1/responses", json={"model": "gpt", "input": "hi", "stream": True})
    events = await sse_events(resp)
    names = [n for n, _ in events]
    item = ["response.output_item.added", "response.function_call_arguments.delta"]
    assert names[2:4] == item
    assert names.count("response.function_call_arguments.done") == 2
    done = [d for n, d in events if n == "response.function_call_arguments.done"]
    assert [(d["name"], d["arguments"]) for d in done] == [("a", '{"x":1}'), ("b", "{}")]
    output = events[-1][1]["response"]["output"]
    assert [(o["call_id"], o["name"]) for o in output] == [("c1", "a"), ("c2", "b")]
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))


async def test_keepalive_comments_during_a_slow_first_token(router_client, fake):
    client = await router_client(make_config(fake.base_url, keepalive_s=0.05))
    events = anthropic_events(({"type": "text", "text": ""}, [{"type": "text_delta", "text": "x"}]))
    fake.queue("anthropic", Answer(events=events, delay_s=0.3))
    body = {**ANTHROPIC_BODY, "stream": True}
    resp = await client.post("/v1/messages", json=body)
    raw = await resp.read()
    assert resp.status == 200
    assert raw.startswith(b"event: ping\n")  # Anthropic's own keep-alive, which clients skip
    decoder = SSEDecoder()
    names = [e.event for e in decoder.feed(raw) + decoder.flush() if e.event != "ping"]
    assert names[0] == "message_start" and names[-1] == "message_stop"


async def test_failure_after_keepalives_is_an_error_event(router_client, fake):
    client = await router_client(make_config(fake.base_url, keepalive_s=0.05))
    fake.queue("openai", Answer(status=500, body={"error": {"message": "boom"}}, delay_s=0.2))
    resp = await client.post("/v1/chat/completions", json={**OPENAI_BODY, "stream": True})
    assert resp.status == 200
    chunks = [d for _, d in await sse_events(resp)]
    assert chunks == [
        {
            "error": {
                "message": chunks[0]["error"]["message"],
                "type": "server_error",
                "param": None,
                "code": None,
            }
        }
    ]
    assert "boom" in chunks[0]["error"]["message"]


@pytest.mark.slow
async def test_overhead_benchmark(client, fake, capsys):
    """Added latency of the router over calling the (loopback) upstream directly.

    Run: python -m pytest tests/router/test_server.py -m slow -s -k overhead
    """
    upstream = f"{fake.base_url}/v1/chat/completions"
    direct_body = {"model": "gpt-up", "messages": OPENAI_BODY["messages"]}

    async def timed(send) -> list[float]:
        samples = []
        for _ in range(300):
            start = time.perf_counter()
            await send()
            samples.append((time.perf_counter() - start) * 1000)
        return sorted(samples)

    async def direct() -> None:
        async with client.session.post(upstream, json=direct_body) as resp:
            await resp.read()

    async def same_format() -> None:
        await (await client.post("/v1/chat/completions", json=OPENAI_BODY)).read()

    async def cross_format() -> None:
        await (await client.post("/v1/messages", json={**ANTHROPIC_BODY, "model": "gpt"})).read()

    async def cross_stream() -> None:
        body = {**ANTHROPIC_BODY, "model": "gpt", "stream": True}
        await (await client.post("/v1/messages", json=body)).read()

    results = {
        name: await timed(fn)
        for name, fn in [
            ("direct upstream", direct),
            ("openai->openai", same_format),
            ("anthropic->openai", cross_format),
            ("anthropic->openai stream", cross_stream),
        ]
    }
    base = statistics.median(results["direct upstream"])
    with capsys.disabled():
        for name, samples in results.items():
            p50, p95 = statistics.median(samples), samples[int(len(samples) * 0.95)]
            print(
                f"{name:26s} p50 {p50:6.2f} ms  p95 {p95:6.2f} ms  added p50 {p50 - base:5.2f} ms"
            )
    assert statistics.median(results["anthropic->openai"]) - base < 50


async def test_gemini_v1_paths_as_google_genai_3_uses(client, fake):
    resp = await client.post("/v1/models/gpt:generateContent", json=GEMINI_BODY)
    assert resp.status == 200
    assert (await resp.json())["candidates"][0]["content"]["parts"] == [{"text": "hello"}]
    resp = await client.post("/v1/models/nope:generateContent", json=GEMINI_BODY)
    assert resp.status == 404 and (await resp.json())["error"]["status"] == "NOT_FOUND"
    listing = await client.get("/v1/models", headers={"x-goog-api-key": "k"})
    assert "models" in await listing.json()


@pytest.mark.parametrize(
    "body",
    [
        {"choices": "nope"},
        {"choices": [{"message": {"role": "assistant", "content": 5}}]},
        {"choices": [{"message": {"tool_calls": [{"function": "x"}]}}]},
    ],
)
async def test_malformed_upstream_response_is_502(client, fake, body):
    fake.queue("openai", Answer(body=body))
    resp = await client.post("/v1/messages", json={**ANTHROPIC_BODY, "model": "gpt"})
    assert resp.status == 502
    assert (await resp.json())["error"]["type"] == "api_error"


async def test_stream_falls_back_when_overloaded_after_block_start(router_client, fake):
    cfg = make_config(fake.base_url)
    cfg.models["claude-first"] = [cfg.models["claude"][0], cfg.models["gpt"][0]]
    client = await router_client(cfg)
    busy = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    broken = anthropic_events(({"type": "text", "text": ""}, []))[:3] + [("error", busy)]
    fake.queue("anthropic", Answer(events=broken))
    body = {**ANTHROPIC_BODY, "model": "claude-first", "stream": True}
    resp = await client.post("/v1/messages", json=body)
    assert resp.status == 200
    events = await sse_events(resp)
    text = "".join(d["delta"].get("text", "") for n, d in events if n == "content_block_delta")
    assert text == "hello" and events[-1][0] == "message_stop"
    assert [s.path for s in fake.seen] == ["/v1/messages", "/v1/chat/completions"]


async def test_anthropic_beta_header_reaches_anthropic_only(client, fake):
    headers = {"anthropic-beta": "interleaved-thinking-2025-05-14, context-1m-2025-08-07"}
    resp = await client.post("/v1/messages", json=ANTHROPIC_BODY, headers=headers)
    assert resp.status == 200
    beta = fake.seen[-1].headers["anthropic-beta"]
    assert beta == "interleaved-thinking-2025-05-14,context-1m-2025-08-07"
    resp = await client.post(
        "/v1/messages", json={**ANTHROPIC_BODY, "model": "gpt"}, headers=headers
    )
    assert resp.status == 200
    assert "anthropic-beta" not in fake.seen[-1].headers


async def test_get_one_model_in_each_format(client):
    assert (await (await client.get("/v1/models/gpt")).json())["id"] == "gpt"
    anth = await client.get("/v1/models/claude", headers={"anthropic-version": "2023-06-01"})
    assert (await anth.json())["type"] == "model"
    gem = await (await client.get("/v1beta/models/gemini")).json()
    assert gem["name"] == "models/gemini"
    missing = await client.get("/v1beta/models/nope")
    assert missing.status == 404 and (await missing.json())["error"]["status"] == "NOT_FOUND"
    assert (await client.get("/v1/models/nope")).status == 404
