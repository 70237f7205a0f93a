"""The official SDKs pointed straight at the fake providers.

If every SDK parses every fake answer and stream, and the grammar checkers accept them, the fakes
are shaped as the providers document. The checkers and the fakes' request validation are also
shown to reject the known-bad cases they exist to catch.
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

from tests.router import grammar
from tests.router.fakes import (
    ANTHROPIC_KEYS,
    ERROR_MESSAGE,
    GEMINI_KEYS,
    INPUT_TOKENS,
    KINDS,
    MIDSTREAM_ERRORS,
    OPENAI_KEYS,
    SCENARIOS,
    Clients,
    ask,
    check_typed,
    make_clients,
    read_first_text_then_leave,
    run_scenario,
)

# Async tests share the module-scoped fakes, so they run on the module's event loop.
module_loop = pytest.mark.asyncio(loop_scope="module")

FAKE_KEYS = {"openai": OPENAI_KEYS[0], "anthropic": ANTHROPIC_KEYS[-1], "gemini": GEMINI_KEYS[0]}


@pytest_asyncio.fixture(loop_scope="module")
async def direct_clients(fakes) -> AsyncIterator[Clients]:
    """SDK clients that talk straight to the fakes, each with a key its fake accepts."""
    clients = make_clients(fakes.roots, FAKE_KEYS)
    yield clients
    await clients.close()


@module_loop
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("kind", KINDS)
async def test_sdk_against_fake(fakes, direct_clients, kind, scenario, stream):
    fake = fakes.by_name(kind)
    await run_scenario(kind, direct_clients, f"{kind}-upstream-model", scenario, stream, fake)


@module_loop
@pytest.mark.parametrize("status", [400, 401, 429, 500])
async def test_fake_errors_map_to_sdk_exceptions(direct_clients, status):
    clients = direct_clients
    prompt = f"scenario:error-{status}"
    expected = {
        400: (openai.BadRequestError, anthropic.BadRequestError, genai_errors.ClientError),
        401: (openai.AuthenticationError, anthropic.AuthenticationError, genai_errors.ClientError),
        429: (openai.RateLimitError, anthropic.RateLimitError, genai_errors.ClientError),
        500: (openai.InternalServerError, anthropic.InternalServerError, genai_errors.ServerError),
    }[status]
    with pytest.raises(expected[0], match=ERROR_MESSAGE):
        await clients.openai.chat.completions.create(
            model="m", messages=[{"role": "user", "content": prompt}]
        )
    with pytest.raises(expected[1], match=ERROR_MESSAGE):
        await clients.anthropic.messages.create(
            model="m", max_tokens=10, messages=[{"role": "user", "content": prompt}]
        )
    with pytest.raises(expected[2], match=ERROR_MESSAGE) as info:
        await clients.gemini.aio.models.generate_content(model="m", contents=prompt)
    assert info.value.code == status


@module_loop
@pytest.mark.parametrize("kind", KINDS)
async def test_midstream_error_raises_in_sdk(direct_clients, kind):
    with pytest.raises(MIDSTREAM_ERRORS[kind], match=ERROR_MESSAGE):
        await ask(kind, direct_clients, "m", "scenario:midstream-error", stream=True)


@module_loop
@pytest.mark.parametrize("kind", KINDS)
async def test_fakes_notice_a_reader_leaving(fakes, direct_clients, kind):
    await read_first_text_then_leave(kind, direct_clients, fakes.roots, "m", GEMINI_KEYS[0])
    for _ in range(40):
        if fakes.by_name(kind).disconnects:
            break
        await asyncio.sleep(0.05)
    assert fakes.by_name(kind).disconnects == 1


@module_loop
async def test_count_tokens_against_fakes(direct_clients):
    messages = [{"role": "user", "content": "hi"}]
    counted = await direct_clients.anthropic.messages.count_tokens(model="m", messages=messages)
    assert counted.input_tokens == INPUT_TOKENS
    gemini = await direct_clients.gemini.aio.models.count_tokens(model="m", contents="hi")
    assert gemini.total_tokens == INPUT_TOKENS


@module_loop
async def test_fakes_reject_bad_keys(fakes):
    async with aiohttp.ClientSession() as http:
        url = f"{fakes.roots['openai']}/v1/chat/completions"
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(url, json=body, headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "invalid_api_key"
        url = f"{fakes.roots['anthropic']}/v1/messages"
        headers = {"x-api-key": "nope", "anthropic-version": "2023-06-01"}
        async with http.post(url, json=body, headers=headers) as r:
            assert r.status == 401
            assert (await r.json())["error"]["type"] == "authentication_error"
        url = f"{fakes.roots['gemini']}/v1beta/models/m:generateContent"
        gemini_body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
        async with http.post(url, json=gemini_body, headers={"x-goog-api-key": "nope"}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["status"] == "INVALID_ARGUMENT"


@module_loop
@pytest.mark.parametrize(
    ("kind", "path", "body", "culprit"),
    [
        (
            "openai",
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], "thinking": {}},
            "thinking",
        ),
        (
            "openai",
            "/v1/chat/completions",
            {
                "model": "m",
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "x", "thinking_blocks": []},
                ],
            },
            "messages[1].thinking_blocks",
        ),
        (
            "openai",
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "robot", "content": "hi"}]},
            "'robot'",
        ),
        (
            "anthropic",
            "/v1/messages",
            {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            "max_tokens",
        ),
        (
            "anthropic",
            "/v1/messages",
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": [{"type": "text", "text": ""}]},
                ],
            },
            "text content blocks must be non-empty",
        ),
        (
            "anthropic",
            "/v1/messages",
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [
                    {"role": "user", "content": "hi"},
                    {
                        "role": "assistant",
                        "content": [{"type": "thinking", "thinking": "t", "signature": "s"}],
                        "reasoning_content": "t",
                    },
                ],
            },
            "messages[1].reasoning_content",
        ),
        (
            "gemini",
            "/v1beta/models/m:generateContent",
            {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "max_tokens": 5},
            "max_tokens",
        ),
        (
            "gemini",
            "/v1beta/models/m:generateContent",
            {"contents": [{"role": "assistant", "parts": [{"text": "hi"}]}]},
            "role",
        ),
        (
            "gemini",
            "/v1beta/models/m:generateContent",
            {"contents": [{"role": "user", "parts": [{"text": "hi", "signature": "x"}]}]},
            "signature",
        ),
    ],
)
async def test_fakes_reject_invalid_requests(fakes, kind, path, body, culprit):
    headers = {
        "openai": {"Authorization": f"Bearer {OPENAI_KEYS[0]}"},
        "anthropic": {"x-api-key": ANTHROPIC_KEYS[0], "anthropic-version": "2023-06-01"},
        "gemini": {"x-goog-api-key": GEMINI_KEYS[0]},
    }[kind]
    async with aiohttp.ClientSession() as http:
        async with http.post(fakes.roots[kind] + path, json=body, headers=headers) as r:
            assert r.status == 400
            error = await r.json()
    message = error["error"]["message"]
    assert culprit in message
    assert fakes.by_name(kind).problems, "an invalid request must be recorded as a problem"
    fakes.by_name(kind).problems.clear()


def test_check_typed_reports_nested_unknown_keys():
    from openai.types.chat import completion_create_params as ccp

    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi", "extra": 1}]},
            {"role": "tool", "tool_call_id": "a", "content": "r"},
        ],
    }
    message = check_typed(body, ccp.CompletionCreateParamsNonStreaming, set())
    assert message == "unknown fields: messages[0].content[0].extra"


# ---------------------------------------------------------------------------------------------
# Grammar checkers reject the hard cases from peer gateways' issue trackers.
# ---------------------------------------------------------------------------------------------


def anthropic_sse(*payloads: dict) -> bytes:
    return b"".join(f"event: {p['type']}\ndata: {json.dumps(p)}\n\n".encode() for p in payloads)


START = {
    "type": "message_start",
    "message": {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 1},
    },
}
DELTA = {
    "type": "message_delta",
    "delta": {"stop_reason": "tool_use", "stop_sequence": None},
    "usage": {"output_tokens": 5},
}
STOP = {"type": "message_stop"}


def tool_start(index: int, name: str) -> dict:
    block = {"type": "tool_use", "id": f"toolu_{index}", "name": name, "input": {}}
    return {"type": "content_block_start", "index": index, "content_block": block}


def json_delta(index: int, text: str) -> dict:
    delta = {"type": "input_json_delta", "partial_json": text}
    return {"type": "content_block_delta", "index": index, "delta": delta}


def block_stop(index: int) -> dict:
    return {"type": "content_block_stop", "index": index}


def test_anthropic_grammar_accepts_parallel_tools_and_pings():
    raw = anthropic_sse(
        START,
        {"type": "ping"},
        tool_start(0, "a"),
        json_delta(0, "{}"),
        block_stop(0),
        {"type": "ping"},
        tool_start(1, "b"),
        json_delta(1, "{}"),
        block_stop(1),
        DELTA,
        STOP,
    )
    assert len(grammar.check_anthropic_stream(raw)) == 11


@pytest.mark.parametrize(
    ("events", "why"),
    [
        # llms anthropic.transformer.ts: a late delta for a block already closed.
        (
            [START, tool_start(0, "a"), block_stop(0), tool_start(1, "b"), json_delta(0, "{}")],
            "while block 1 is open",
        ),
        # OmniRoute #682: the id repeated on every delta opened a new block each time.
        ([START, tool_start(0, "a"), tool_start(1, "a"), block_stop(1)], "inside open 0"),
        ([START, tool_start(1, "a"), block_stop(1), DELTA, STOP], "want 0"),
        # A delta type that does not match its block.
        (
            [
                START,
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
                json_delta(0, "{}"),
            ],
            "input_json_delta inside a text block",
        ),
        # Thinking closed without its signature (bitrouter #592, CLIProxyAPI #2172).
        (
            [
                START,
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "thinking", "thinking": "", "signature": ""},
                },
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "thinking_delta", "thinking": "hm"},
                },
                block_stop(0),
            ],
            "closed unsigned",
        ),
        ([START, tool_start(0, "a"), block_stop(0), DELTA, DELTA, STOP], "exactly one"),
        ([START, tool_start(0, "a"), block_stop(0), STOP], "exactly one message_delta"),
        ([tool_start(0, "a"), block_stop(0), DELTA, START, STOP], "message_start"),
    ],
)
def test_anthropic_grammar_rejects(events, why):
    with pytest.raises(grammar.GrammarError, match=why):
        grammar.check_anthropic_stream(anthropic_sse(*events))


def test_anthropic_grammar_rejects_done_sentinel():
    # 1rgs/claude-code-proxy sent an OpenAI-style [DONE] in an Anthropic stream.
    raw = anthropic_sse(START, tool_start(0, "a"), block_stop(0), DELTA, STOP) + b"data: [DONE]\n\n"
    with pytest.raises(grammar.GrammarError):
        grammar.check_anthropic_stream(raw)


def openai_sse(*chunks: dict, done: bool = True) -> bytes:
    body = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks)
    return body + (b"data: [DONE]\n\n" if done else b"")


def chunk(delta: dict, finish: str | None = None, cid: str = "c1") -> dict:
    return {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def tc(index: int, call_id: str | None = None, name: str | None = None, args: str = "") -> dict:
    out: dict = {"index": index, "function": {"arguments": args}}
    if call_id:
        out.update(id=call_id, type="function")
        out["function"]["name"] = name
    return {"tool_calls": [out]}


def usage_chunk() -> dict:
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }


ROLE = chunk({"role": "assistant", "content": ""})


def test_openai_grammar_accepts_parallel_tools_with_usage():
    raw = openai_sse(
        ROLE,
        chunk(tc(0, "call_a", "a")),
        chunk(tc(0, args="{}")),
        chunk(tc(1, "call_b", "b")),
        chunk(tc(1, args="{}")),
        chunk({}, "tool_calls"),
        usage_chunk(),
    )
    assert len(grammar.check_openai_stream(raw, expect_usage=True)) == 7


@pytest.mark.parametrize(
    ("chunks", "expect_usage", "why"),
    [
        # OmniRoute #682: id and name repeated on argument deltas.
        (
            [
                ROLE,
                chunk(tc(0, "call_a", "a")),
                chunk(tc(0, "call_a", "a", "{}")),
                chunk({}, "stop"),
            ],
            False,
            "repeated",
        ),
        # LiteLLM PR #37792: every call got index 0 (the second call lost its own index).
        (
            [ROLE, chunk(tc(0, "call_a", "a")), chunk(tc(2, "call_b", "b")), chunk({}, "stop")],
            False,
            "skips",
        ),
        # LiteLLM #39796: the re-chunker dropped id/name of the second call.
        (
            [ROLE, chunk(tc(0, "call_a", "a")), chunk(tc(1, args="{}")), chunk({}, "stop")],
            False,
            "needs id",
        ),
        ([chunk({"content": "x"}), chunk({}, "stop")], False, "role"),
        ([ROLE, chunk({}, "stop"), chunk({}, "stop")], False, "exactly one"),
        # ccs PR #1574 / claude-code-proxy: the usage chunk missing or dropped.
        ([ROLE, chunk({}, "stop")], True, "usage"),
        ([ROLE, chunk({}, "stop"), usage_chunk()], False, "without include_usage"),
        ([ROLE, chunk({"content": "x"}, cid="c2"), chunk({}, "stop")], False, "one id"),
    ],
)
def test_openai_grammar_rejects(chunks, expect_usage, why):
    with pytest.raises(grammar.GrammarError, match=why):
        grammar.check_openai_stream(openai_sse(*chunks), expect_usage=expect_usage)


def test_openai_grammar_requires_done_last():
    with pytest.raises(grammar.GrammarError, match=r"\[DONE\]"):
        grammar.check_openai_stream(openai_sse(ROLE, chunk({}, "stop"), done=False), False)


def gemini_sse(*events: dict) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\r\n\r\n".encode() for e in events)


def candidate(text: str, finish: str | None = None) -> dict:
    out: dict = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
    if finish:
        out["finishReason"] = finish
    return {"candidates": [out]}


USAGE = {"usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 2, "totalTokenCount": 3}}


def test_gemini_grammar_accepts_usage_at_end():
    raw = gemini_sse(candidate("a"), {**candidate("b", "STOP"), **USAGE})
    assert len(grammar.check_gemini_stream(raw)) == 2


@pytest.mark.parametrize(
    ("events", "why"),
    [
        ([candidate("a", "STOP"), {**candidate("b", "STOP"), **USAGE}], "last candidate chunk"),
        ([candidate("a"), candidate("b", "STOP")], "usageMetadata"),
        ([{**candidate("a", "STOP"), **USAGE, "choices": []}], "GenerateContentResponse"),
    ],
)
def test_gemini_grammar_rejects(events, why):
    with pytest.raises(grammar.GrammarError, match=why):
        grammar.check_gemini_stream(gemini_sse(*events))


def test_parse_sse_handles_crlf_comments_and_multiline_data():
    raw = b": keep-alive\r\nevent: x\r\ndata: a\r\ndata: b\r\n\r\ndata: c\n\n"
    events = grammar.parse_sse(raw)
    assert [(e.event, e.data) for e in events] == [("x", "a\nb"), ("", "c")]
    with pytest.raises(grammar.GrammarError, match="ended inside"):
        grammar.parse_sse(b"data: cut")


def responses_sse(*payloads: dict) -> bytes:
    out = b""
    for seq, p in enumerate(payloads):
        p = {**p, "sequence_number": seq}
        out += f"event: {p['type']}\ndata: {json.dumps(p)}\n\n".encode()
    return out


RESPONSE = {"id": "resp_1", "object": "response", "status": "in_progress", "output": []}
CALL = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "a", "arguments": ""}


def call_events(index: int) -> list[dict]:
    item = {**CALL, "id": f"fc_{index}", "call_id": f"call_{index}"}
    return [
        {"type": "response.output_item.added", "output_index": index, "item": item},
        {
            "type": "response.function_call_arguments.delta",
            "output_index": index,
            "item_id": item["id"],
            "delta": "{}",
        },
        {"type": "response.output_item.done", "output_index": index, "item": item},
    ]


def completed(items: int) -> dict:
    return {"type": "response.completed", "response": {**RESPONSE, "output": [CALL] * items}}


def test_responses_grammar_accepts_two_calls():
    raw = responses_sse(
        {"type": "response.created", "response": RESPONSE},
        *call_events(0),
        *call_events(1),
        completed(2),
    )
    assert len(grammar.check_responses_stream(raw)) == 8


@pytest.mark.parametrize(
    ("events", "why"),
    [
        ([*call_events(0), completed(1)], "response.created"),
        ([{"type": "response.created", "response": RESPONSE}, *call_events(0)], "terminal"),
        (
            [{"type": "response.created", "response": RESPONSE}, *call_events(1), completed(1)],
            "output_index 1, want 0",
        ),
        (
            [
                {"type": "response.created", "response": RESPONSE},
                *call_events(0)[:2],
                *call_events(1),
                completed(2),
            ],
            "inside open item",
        ),
        (
            [{"type": "response.created", "response": RESPONSE}, *call_events(0), completed(2)],
            "final response has 2 items",
        ),
    ],
)
def test_responses_grammar_rejects(events, why):
    with pytest.raises(grammar.GrammarError, match=why):
        grammar.check_responses_stream(responses_sse(*events))
