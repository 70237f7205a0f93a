"""Hostile clients and misbehaving upstreams, on loopback: every upstream 2xx checked for its
format (an error or a body missing its fields falls back and counts for the key), strict request
validation (400s in the client's shape naming the field, never a 500), and OpenAI-only options
passed through to OpenAI upstreams, translated where another format has them, refused where not.
"""

from __future__ import annotations

import json
import logging

import pytest

from router.config import Config
from router.errors import InvalidRequestError
from router.formats.fields import decode_body
from router.keys import KEY_POOLS
from router.sse import SSEDecoder
from tests.router.helpers import (
    ANTHROPIC_BODY,
    GEMINI_BODY,
    OPENAI_BODY,
    Answer,
    anthropic_text,
    anthropic_text_stream,
    gemini_text,
    make_config,
    openai_chunk,
    openai_text,
)

# Each client format's path and where its error body keeps the message.
OPENAI_PATH = "/v1/chat/completions"
RESPONSES_PATH = "/v1/responses"
ANTHROPIC_PATH = "/v1/messages"
GEMINI_PATH = "/v1beta/models/gpt:generateContent"


def error_message(path: str, body: dict) -> str:
    """The message of an error body, checking that it has the client format's shape."""
    if path == ANTHROPIC_PATH:
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        return body["error"]["message"]
    if path.startswith("/v1beta/"):
        assert set(body["error"]) == {"code", "message", "status"}, body
        return body["error"]["message"]
    assert {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]["message"]


def states(client, provider: str) -> list[str]:
    return [k["state"] for k in client.server.app[KEY_POOLS][provider].snapshot()]


async def sse_data(resp) -> list:
    decoder = SSEDecoder()
    events = decoder.feed(await resp.read()) + decoder.flush()
    return [e.data if e.data == "[DONE]" else json.loads(e.data) for e in events]


@pytest.fixture
def router_config(fake) -> Config:
    """`make_config`, plus a model that falls back from Anthropic to OpenAI."""
    cfg = make_config(fake.base_url)
    cfg.models["claude-then-gpt"] = cfg.models["claude"] + cfg.models["gpt"]
    return cfg


# ---- upstream 2xx bodies are checked --------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"id": "x", "object": "chat.completion", "usage": {}},
        {"id": "x", "choices": []},
        {"id": "x", "choices": [{"index": 0, "finish_reason": "stop"}]},
        {"id": "x", "choices": ["hello"]},
        {"id": "x", "choices": {"0": {}}},
    ],
)
async def test_openai_200_without_usable_choices_falls_back(client, fake, body):
    fake.queue("openai", Answer(body=body))
    resp = await client.post(OPENAI_PATH, json={**OPENAI_BODY, "model": "fallback"})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["choices"][0]["message"]["content"] == "hello"
    assert [s.path for s in fake.seen] == ["/v1/chat/completions", "/v1/messages"]


async def test_openai_200_without_choices_is_a_502_when_nothing_is_left(client, fake):
    fake.queue("openai", Answer(body={"id": "x", "object": "chat.completion"}))
    resp = await client.post(OPENAI_PATH, json=OPENAI_BODY)
    assert resp.status == 502
    error = (await resp.json())["error"]
    assert "no choices" in error["message"] and error["type"] == "server_error"


async def test_openai_200_rate_limit_error_cools_the_key_and_falls_back(client, fake):
    error = {"error": {"message": "slow down", "type": "rate_limit_error", "code": None}}
    fake.queue("openai", Answer(body=error))
    resp = await client.post(OPENAI_PATH, json={**OPENAI_BODY, "model": "fallback"})
    assert resp.status == 200
    assert [s.path for s in fake.seen] == ["/v1/chat/completions", "/v1/messages"]
    assert states(client, "oai") == ["cooling"]


async def test_anthropic_200_error_body_cools_the_key_and_tries_the_next(client, fake):
    error = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    fake.queue("anthropic", Answer(body=error))
    resp = await client.post(ANTHROPIC_PATH, json=ANTHROPIC_BODY)
    assert resp.status == 200
    assert (await resp.json())["content"] == [{"type": "text", "text": "hello"}]
    assert sorted(states(client, "claude")) == ["active", "cooling"]
    assert len(fake.seen) == 2


async def test_anthropic_200_overloaded_falls_back_to_the_next_target(client, fake):
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    fake.queue("anthropic", Answer(body=error))
    resp = await client.post(OPENAI_PATH, json={**OPENAI_BODY, "model": "claude-then-gpt"})
    assert resp.status == 200
    assert [s.path for s in fake.seen] == ["/v1/messages", "/v1/chat/completions"]
    # Overload is the provider's trouble, not the key's.
    assert states(client, "claude") == ["active", "active"]


async def test_anthropic_200_overloaded_alone_is_a_retryable_503(client, fake):
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    fake.queue("anthropic", Answer(body=error))
    resp = await client.post(ANTHROPIC_PATH, json=ANTHROPIC_BODY)
    assert resp.status in (503, 529)
    body = await resp.json()
    assert body["error"]["type"] == "overloaded_error", body


@pytest.mark.parametrize(
    "body", [{"id": "msg_1", "type": "message"}, {"id": "m", "content": "hello"}]
)
async def test_anthropic_200_without_content_falls_back(client, fake, body):
    fake.queue("anthropic", Answer(body=body))
    resp = await client.post(OPENAI_PATH, json={**OPENAI_BODY, "model": "claude-then-gpt"})
    assert resp.status == 200
    assert [s.path for s in fake.seen] == ["/v1/messages", "/v1/chat/completions"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({}, 502),
        ({"candidates": []}, 502),
        ({"error": {"status": "RESOURCE_EXHAUSTED", "message": "slow down"}}, 429),
        ({"error": {"code": 503, "message": "busy", "status": "UNAVAILABLE"}}, 503),
    ],
)
async def test_gemini_200_without_candidates_or_with_an_error_is_mapped(client, fake, body, status):
    fake.queue("gemini", Answer(body=body))
    resp = await client.post(OPENAI_PATH, json={**OPENAI_BODY, "model": "gemini"})
    assert resp.status == status, await resp.text()
    if status == 429:
        assert states(client, "gem") == ["cooling"]


async def test_gemini_prompt_block_without_candidates_is_still_an_answer(client, fake):
    fake.queue("gemini", Answer(body={"promptFeedback": {"blockReason": "SAFETY"}}))
    resp = await client.post(OPENAI_PATH, json={**OPENAI_BODY, "model": "gemini"})
    assert resp.status == 200
    assert (await resp.json())["choices"][0]["finish_reason"] == "content_filter"


async def test_openai_stream_opening_with_an_error_falls_back_and_cools_the_key(client, fake):
    error = {"error": {"message": "slow down", "type": "rate_limit_error"}}
    fake.queue("openai", Answer(events=[(None, error)]))
    body = {**OPENAI_BODY, "model": "fallback", "stream": True}
    resp = await client.post(OPENAI_PATH, json=body)
    assert resp.status == 200
    data = await sse_data(resp)
    assert data[-1] == "[DONE]" and not any("error" in d for d in data[:-1])
    assert [s.path for s in fake.seen] == ["/v1/chat/completions", "/v1/messages"]
    assert states(client, "oai") == ["cooling"]


async def test_anthropic_stream_opening_with_overloaded_falls_back(client, fake):
    events = anthropic_text_stream("never")
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    fake.queue("anthropic", Answer(events=[events[0], ("error", overloaded)]))
    body = {**OPENAI_BODY, "model": "claude-then-gpt", "stream": True}
    resp = await client.post(OPENAI_PATH, json=body)
    assert resp.status == 200
    text = "".join(
        d["choices"][0]["delta"].get("content") or ""
        for d in await sse_data(resp)
        if d != "[DONE]" and d["choices"]
    )
    assert text == "hello"
    assert [s.path for s in fake.seen] == ["/v1/messages", "/v1/chat/completions"]


async def test_gemini_stream_opening_with_an_error_is_mapped_before_the_first_byte(client, fake):
    error = {"error": {"message": "slow down", "status": "RESOURCE_EXHAUSTED"}}
    fake.queue("gemini", Answer(events=[(None, error)]))
    body = {**OPENAI_BODY, "model": "gemini", "stream": True}
    resp = await client.post(OPENAI_PATH, json=body)
    assert resp.status == 429
    assert (await resp.json())["error"]["type"] == "rate_limit_error"
    assert states(client, "gem") == ["cooling"]


# ---- bodies: JSON depth, non-finite and huge numbers ----------------------------------------


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("path", [OPENAI_PATH, RESPONSES_PATH, ANTHROPIC_PATH, GEMINI_PATH])
@pytest.mark.parametrize("depth", [65, 1_000, 100_000])
async def test_deep_json_is_a_400_without_a_traceback(client, fake, caplog, path, depth):
    raw = '{"model": "gpt", "messages": ' + nested(depth) + "}"
    with caplog.at_level(logging.INFO):
        resp = await client.post(path, data=raw.encode())
    assert resp.status == 400
    assert "nested deeper than 64" in error_message(path, await resp.json())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not fake.seen


def test_the_depth_bound_is_exact_and_names_the_field():
    assert decode_body(b'{"a": ' + nested(63).encode() + b"}")["a"]
    with pytest.raises(InvalidRequestError) as info:
        decode_body(b'{"a": ' + nested(64).encode() + b"}")
    assert info.value.param == "a" + "[0]" * 63


async def test_json_at_the_depth_bound_is_accepted(client, fake):
    schema: dict = {"type": "object"}
    for _ in range(25):
        schema = {"type": "object", "properties": {"x": schema}}
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    resp = await client.post(OPENAI_PATH, json={**OPENAI_BODY, "tools": [tool]})
    assert resp.status == 200, await resp.text()


@pytest.mark.parametrize(
    ("raw", "culprit"),
    [
        ('"temperature": NaN', "temperature"),
        ('"temperature": Infinity', "temperature"),
        ('"top_p": -Infinity', "top_p"),
        ('"temperature": 1e999', "temperature"),
        ('"metadata": {"a": [1, NaN]}', "metadata.a[1]"),
    ],
)
async def test_non_finite_numbers_are_a_400_naming_the_field(client, fake, raw, culprit):
    body = '{"model": "gpt", "messages": [{"role": "user", "content": "hi"}], ' + raw + "}"
    resp = await client.post(OPENAI_PATH, data=body.encode())
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == culprit and "finite" in error["message"], error
    assert not fake.seen


async def test_an_integer_beyond_the_digit_limit_is_a_400(client, fake):
    body = '{"model": "gpt", "messages": [], "max_tokens": ' + "9" * 5000 + "}"
    resp = await client.post(OPENAI_PATH, data=body.encode())
    assert resp.status == 400
    assert "not valid JSON" in (await resp.json())["error"]["message"]


async def test_json_that_cannot_be_sent_on_is_a_400(client, fake):
    """A lone surrogate escape is JSON that Python reads but no UTF-8 upstream body can carry."""
    body = '{"model": "gpt", "messages": [{"role": "user", "content": "hi \\ud800"}]}'
    resp = await client.post(OPENAI_PATH, data=body.encode())
    assert resp.status == 400
    assert "request body" in (await resp.json())["error"]["message"]
    assert not fake.seen


# ---- requests: ranges, empty conversations, orphan tool results -----------------------------

TOOL_CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
}

INVALID = [
    # Token limits.
    (OPENAI_PATH, {**OPENAI_BODY, "max_tokens": -1}, "max_tokens"),
    (OPENAI_PATH, {**OPENAI_BODY, "max_completion_tokens": 0}, "max_completion_tokens"),
    (ANTHROPIC_PATH, {**ANTHROPIC_BODY, "max_tokens": 0}, "max_tokens"),
    (RESPONSES_PATH, {"model": "gpt", "input": "hi", "max_output_tokens": -5}, "max_output_tokens"),
    (
        GEMINI_PATH,
        {**GEMINI_BODY, "generationConfig": {"maxOutputTokens": 0}},
        "generationConfig.maxOutputTokens",
    ),
    (
        ANTHROPIC_PATH,
        {**ANTHROPIC_BODY, "thinking": {"type": "enabled", "budget_tokens": -1}},
        "thinking.budget_tokens",
    ),
    # Sampling values.
    (OPENAI_PATH, {**OPENAI_BODY, "temperature": 2.5}, "temperature"),
    (OPENAI_PATH, {**OPENAI_BODY, "top_p": 1.5}, "top_p"),
    (OPENAI_PATH, {**OPENAI_BODY, "top_k": -2}, "top_k"),
    (OPENAI_PATH, {**OPENAI_BODY, "presence_penalty": 3}, "presence_penalty"),
    (OPENAI_PATH, {**OPENAI_BODY, "frequency_penalty": -2.5}, "frequency_penalty"),
    (OPENAI_PATH, {**OPENAI_BODY, "n": 0}, "n"),
    (OPENAI_PATH, {**OPENAI_BODY, "n": 1000}, "n"),
    (OPENAI_PATH, {**OPENAI_BODY, "top_logprobs": 21}, "top_logprobs"),
    (OPENAI_PATH, {**OPENAI_BODY, "logit_bias": {"42": 101}}, "logit_bias.42"),
    (OPENAI_PATH, {**OPENAI_BODY, "stop": ["a", 1]}, "stop[1]"),
    (OPENAI_PATH, {**OPENAI_BODY, "metadata": {"a": 1}}, "metadata.a"),
    (OPENAI_PATH, {**OPENAI_BODY, "n": 2, "stream": True}, "n"),
    (OPENAI_PATH, {**OPENAI_BODY, "function_call": "auto"}, "function_call"),
    (OPENAI_PATH, {**OPENAI_BODY, "modalities": ["text", "audio"]}, "modalities"),
    (ANTHROPIC_PATH, {**ANTHROPIC_BODY, "temperature": 1.5}, "temperature"),
    (ANTHROPIC_PATH, {**ANTHROPIC_BODY, "top_k": -3}, "top_k"),
    (ANTHROPIC_PATH, {**ANTHROPIC_BODY, "service_tier": "flex"}, "service_tier"),
    (RESPONSES_PATH, {"model": "gpt", "input": "hi", "top_p": -0.1}, "top_p"),
    (
        GEMINI_PATH,
        {**GEMINI_BODY, "generationConfig": {"temperature": 9}},
        "generationConfig.temperature",
    ),
    (GEMINI_PATH, {**GEMINI_BODY, "generationConfig": {"topK": -1}}, "generationConfig.topK"),
    (
        GEMINI_PATH,
        {**GEMINI_BODY, "generationConfig": {"logprobs": 99}},
        "generationConfig.logprobs",
    ),
    # Empty conversations.
    (ANTHROPIC_PATH, {**ANTHROPIC_BODY, "messages": []}, "messages"),
    (
        ANTHROPIC_PATH,
        {**ANTHROPIC_BODY, "messages": [{"role": "user", "content": ""}]},
        "messages[0].content",
    ),
    (
        ANTHROPIC_PATH,
        {**ANTHROPIC_BODY, "messages": [{"role": "user", "content": []}]},
        "messages[0].content",
    ),
    (GEMINI_PATH, {"contents": []}, "contents"),
    (GEMINI_PATH, {"contents": [{"role": "user", "parts": []}]}, "contents[0].parts"),
    (RESPONSES_PATH, {"model": "gpt", "input": []}, "input"),
    (RESPONSES_PATH, {"model": "gpt", "input": ""}, "input"),
    # Orphan tool results.
    (
        RESPONSES_PATH,
        {
            "model": "gpt",
            "input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}],
        },
        "input[0].call_id",
    ),
    (
        OPENAI_PATH,
        {**OPENAI_BODY, "messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]},
        "messages[0].tool_call_id",
    ),
    (
        OPENAI_PATH,
        {
            **OPENAI_BODY,
            "messages": [TOOL_CALL, {"role": "tool", "tool_call_id": "c2", "content": "x"}],
        },
        "messages[1].tool_call_id",
    ),
    (
        ANTHROPIC_PATH,
        {
            **ANTHROPIC_BODY,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "nope", "content": "x"}],
                }
            ],
        },
        "messages[0].content[0].tool_use_id",
    ),
    (
        GEMINI_PATH,
        {"contents": [{"parts": [{"functionResponse": {"name": "f", "response": {}}}]}]},
        "contents[0].parts[0].functionResponse",
    ),
]


@pytest.mark.parametrize(("path", "body", "culprit"), INVALID)
async def test_invalid_requests_are_400s_naming_the_field(
    client, fake, caplog, path, body, culprit
):
    with caplog.at_level(logging.INFO):
        resp = await client.post(path, json=body)
    assert resp.status == 400, await resp.text()
    payload = await resp.json()
    assert culprit in error_message(path, payload), payload
    if path in (OPENAI_PATH, RESPONSES_PATH):
        assert payload["error"]["param"] == culprit, payload
    assert not fake.seen
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("messages", "model"),
    [
        ([{"role": "system", "content": "only a system prompt"}], "claude"),
        ([{"role": "system", "content": "only a system prompt"}], "gemini"),
        ([{"role": "user", "content": ""}], "claude"),
        ([{"role": "user", "content": []}], "gemini"),
    ],
)
async def test_conversations_left_empty_for_the_target_are_400s(client, fake, messages, model):
    resp = await client.post(OPENAI_PATH, json={"model": model, "messages": messages})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == "messages" and "no user" in error["message"], error
    assert not fake.seen


async def test_a_system_only_chat_still_reaches_an_openai_upstream(client, fake):
    messages = [{"role": "system", "content": "Say hi."}]
    resp = await client.post(OPENAI_PATH, json={"model": "gpt", "messages": messages})
    assert resp.status == 200
    assert fake.seen[-1].body["messages"] == messages


async def test_vllm_top_k_of_minus_one_means_no_top_k(client, fake):
    resp = await client.post(OPENAI_PATH, json={**OPENAI_BODY, "model": "gemini", "top_k": -1})
    assert resp.status == 200
    assert "topK" not in fake.seen[-1].body.get("generationConfig", {})


async def test_answered_tool_calls_still_pass(client, fake):
    messages = [
        {"role": "user", "content": "call f"},
        TOOL_CALL,
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
    ]
    resp = await client.post(OPENAI_PATH, json={**OPENAI_BODY, "messages": messages})
    assert resp.status == 200
    body = {
        "model": "gpt",
        "input": [
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "done"},
        ],
    }
    assert (await client.post(RESPONSES_PATH, json=body)).status == 200


# ---- OpenAI-only options ----------------------------------------------------------------------

OPENAI_ONLY = {
    "logprobs": True,
    "top_logprobs": 2,
    "logit_bias": {"50256": -100},
    "seed": 7,
    "service_tier": "flex",
    "store": True,
    "metadata": {"team": "a"},
    "user": "u-1",
    "stop": ["END"],
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "prediction": {"type": "content", "content": "hello world"},
}

TOKENS = {
    "content": [
        {
            "token": "hello",
            "logprob": -0.25,
            "bytes": [104, 101, 108, 108, 111],
            "top_logprobs": [
                {"token": "hello", "logprob": -0.25, "bytes": [104, 101, 108, 108, 111]},
                {"token": "hi", "logprob": -1.5, "bytes": [104, 105]},
            ],
        }
    ],
    "refusal": None,
}


async def test_openai_only_options_pass_through_unchanged(client, fake):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {**OPENAI_BODY, **OPENAI_ONLY, "n": 2, "tools": tools, "parallel_tool_calls": False}
    answer = openai_text("hello")
    answer["choices"][0]["logprobs"] = TOKENS
    second = {**answer["choices"][0], "index": 1, "message": {"role": "assistant", "content": "2"}}
    answer["choices"].append({**second, "logprobs": None, "finish_reason": "length"})
    fake.queue("openai", Answer(body=answer))
    resp = await client.post(OPENAI_PATH, json=body)
    assert resp.status == 200, await resp.text()
    sent = fake.seen[-1].body
    for key, value in {**OPENAI_ONLY, "n": 2, "parallel_tool_calls": False}.items():
        assert sent[key] == value, key
    choices = (await resp.json())["choices"]
    assert choices[0]["logprobs"] == TOKENS
    assert choices[0]["message"]["content"] == "hello"
    assert choices[1] == {
        "index": 1,
        "message": {"role": "assistant", "content": "2"},
        "logprobs": None,
        "finish_reason": "length",
    }


async def test_logprobs_come_back_in_stream_chunks(client, fake):
    chunk = openai_chunk({"content": "hello"})
    chunk["choices"][0]["logprobs"] = TOKENS
    events = [(None, openai_chunk({"role": "assistant", "content": ""})), (None, chunk)]
    events += [(None, openai_chunk({}, "stop")), (None, "[DONE]")]
    fake.queue("openai", Answer(events=events))
    body = {**OPENAI_BODY, "logprobs": True, "top_logprobs": 2, "stream": True}
    resp = await client.post(OPENAI_PATH, json=body)
    assert resp.status == 200
    chunks = [d for d in await sse_data(resp) if d != "[DONE]"]
    with_logprobs = [c["choices"][0] for c in chunks if c["choices"][0]["logprobs"]]
    assert with_logprobs == [
        {"index": 0, "delta": {"content": "hello"}, "logprobs": TOKENS, "finish_reason": None}
    ]
    assert fake.seen[-1].body["logprobs"] is True


async def test_responses_logprobs_and_storage_options_reach_openai(client, fake):
    answer = openai_text("hello")
    answer["choices"][0]["logprobs"] = TOKENS
    fake.queue("openai", Answer(body=answer))
    body = {
        "model": "gpt",
        "input": "hi",
        "include": ["message.output_text.logprobs"],
        "top_logprobs": 2,
        "store": True,
        "metadata": {"team": "a"},
        "service_tier": "priority",
    }
    resp = await client.post(RESPONSES_PATH, json=body)
    assert resp.status == 200, await resp.text()
    sent = fake.seen[-1].body
    assert (sent["logprobs"], sent["top_logprobs"], sent["store"]) == (True, 2, True)
    assert (sent["metadata"], sent["service_tier"]) == ({"team": "a"}, "priority")
    out = await resp.json()
    assert out["store"] is True and out["metadata"] == {"team": "a"}
    assert out["output"][0]["content"][0]["logprobs"] == TOKENS["content"]


async def test_seed_and_logprobs_are_translated_for_gemini(client, fake):
    answer = gemini_text("hello")
    answer["candidates"][0]["logprobsResult"] = {
        "topCandidates": [
            {
                "candidates": [
                    {"token": "hello", "logProbability": -0.25},
                    {"token": "hi", "logProbability": -1.5},
                ]
            }
        ],
        "chosenCandidates": [{"token": "hello", "logProbability": -0.25}],
    }
    fake.queue("gemini", Answer(body=answer))
    body = {**OPENAI_BODY, "model": "gemini", "seed": 7, "logprobs": True, "top_logprobs": 2}
    body |= {"presence_penalty": 0.5}
    resp = await client.post(OPENAI_PATH, json=body)
    assert resp.status == 200, await resp.text()
    config = fake.seen[-1].body["generationConfig"]
    assert config["seed"] == 7 and config["presencePenalty"] == 0.5
    assert config["responseLogprobs"] is True and config["logprobs"] == 2
    [token] = (await resp.json())["choices"][0]["logprobs"]["content"]
    assert (token["token"], token["logprob"]) == ("hello", -0.25)
    assert [t["token"] for t in token["top_logprobs"]] == ["hello", "hi"]


async def test_gemini_client_logprobs_round_trip_through_openai(client, fake):
    answer = openai_text("hello")
    answer["choices"][0]["logprobs"] = TOKENS
    fake.queue("openai", Answer(body=answer))
    config = {"responseLogprobs": True, "logprobs": 2}
    resp = await client.post(GEMINI_PATH, json={**GEMINI_BODY, "generationConfig": config})
    assert resp.status == 200, await resp.text()
    sent = fake.seen[-1].body
    assert (sent["logprobs"], sent["top_logprobs"]) == (True, 2)
    result = (await resp.json())["candidates"][0]["logprobsResult"]
    assert result["chosenCandidates"] == [{"token": "hello", "logProbability": -0.25}]
    assert [c["token"] for c in result["topCandidates"][0]["candidates"]] == ["hello", "hi"]


async def test_openai_options_anthropic_has_are_translated(client, fake):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {**OPENAI_BODY, "model": "claude", "tools": tools, "parallel_tool_calls": False}
    body |= {"service_tier": "default", "user": "u-1", "store": False, "n": 1}
    fake.queue("anthropic", Answer(body=anthropic_text("hello")))
    resp = await client.post(OPENAI_PATH, json=body)
    assert resp.status == 200, await resp.text()
    sent = fake.seen[-1].body
    assert sent["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    assert sent["service_tier"] == "standard_only"
    assert sent["metadata"] == {"user_id": "u-1"}


@pytest.mark.parametrize(
    ("model", "extra", "culprit"),
    [
        ("claude", {"n": 2}, "n"),
        ("claude", {"seed": 1}, "seed"),
        ("claude", {"logprobs": True}, "logprobs"),
        ("claude", {"logit_bias": {"1": 5}}, "logit_bias"),
        ("claude", {"store": True}, "store"),
        ("claude", {"metadata": {"a": "b"}}, "metadata"),
        ("claude", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ("claude", {"presence_penalty": 1}, "presence_penalty"),
        ("claude", {"service_tier": "flex"}, "service_tier"),
        ("gemini", {"n": 3}, "n"),
        ("gemini", {"service_tier": "priority"}, "service_tier"),
        ("gemini", {"logit_bias": {"1": 5}}, "logit_bias"),
        (
            "gemini",
            {
                "parallel_tool_calls": False,
                "tools": [{"type": "function", "function": {"name": "f"}}],
            },
            "parallel_tool_calls",
        ),
    ],
)
async def test_options_a_target_cannot_honour_are_400s(client, fake, model, extra, culprit):
    resp = await client.post(OPENAI_PATH, json={**OPENAI_BODY, "model": model, **extra})
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert error["param"] == culprit and culprit in error["message"], error
    assert not fake.seen


async def test_n_above_one_is_served_by_an_openai_upstream(client, fake):
    answer = openai_text("a")
    answer["choices"].append({**answer["choices"][0], "index": 1})
    fake.queue("openai", Answer(body=answer))
    resp = await client.post(OPENAI_PATH, json={**OPENAI_BODY, "n": 2})
    assert resp.status == 200
    assert [c["index"] for c in (await resp.json())["choices"]] == [0, 1]
