"""Ollama's API on the router, through the official ``ollama`` Python SDK on loopback.

The router serves each model from one of the SDK-validating fake providers (OpenAI, Anthropic,
Gemini; see `tests.router.fakes`), so every case checks both what the Ollama client gets back
and what the upstream received. The raw wire (NDJSON lines, the exact fields of each object,
error bodies and statuses) is checked with plain aiohttp. Then a tiny random SmolVLM checkpoint
is served with the local MLX provider and compared with `generate` run directly, and a second
router whose ``ollama`` provider is the first router's Ollama API tests the upstream side.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import ollama
import openai
import pytest
import pytest_asyncio

from mlx_smolvlm.generate import generate
from mlx_smolvlm.load import load
from router import ir
from router.config import Config
from router.errors import InvalidRequestError, UpstreamError
from router.formats.ollama import upstream
from router.formats.ollama.client import OLLAMA_VERSION
from tests.mlx_smolvlm.conftest import build_hf_checkpoint
from tests.router.fakes import (
    ANTHROPIC_KEYS,
    ERROR_MESSAGE,
    GEMINI_KEYS,
    IMAGE_ANSWER,
    INPUT_TOKENS,
    KINDS,
    OPENAI_KEYS,
    OUTPUT_TOKENS,
    PARALLEL_ANSWER,
    REASONING_ANSWER,
    REASONING_TEXT,
    RED_PIXEL_PNG,
    SYSTEM_PROMPT,
    TEXT_ANSWER,
    TOOL_SPECS,
    TRUNCATED_ANSWER,
    WEATHER_ARGS,
    WEATHER_RESULT,
)
from tests.router.helpers import running_router

module_loop = pytest.mark.asyncio(loop_scope="module")

UPSTREAM_MODELS = {"openai": "gpt-fake", "anthropic": "claude-fake", "gemini": "gemini-fake"}
# What every final object carries, and every object before it.
FINAL_FIELDS = {
    "model",
    "created_at",
    "done",
    "done_reason",
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
}
TOOLS = [
    {"type": "function", "function": {"name": n, "description": d, "parameters": p}}
    for n, d, p in TOOL_SPECS
]


def router_config(roots: dict[str, str]) -> Config:
    """Model ``m-<kind>`` is served by the fake provider of that kind."""
    return Config.from_dict(
        {
            "providers": {
                "oai": {"type": "openai", "base_url": f"{roots['openai']}/v1", "keys": OPENAI_KEYS},
                "claude": {
                    "type": "anthropic",
                    "base_url": roots["anthropic"],
                    "keys": ANTHROPIC_KEYS,
                },
                "gem": {"type": "gemini", "base_url": roots["gemini"], "keys": GEMINI_KEYS},
            },
            "models": {
                f"m-{kind}": [{"provider": provider, "model": UPSTREAM_MODELS[kind]}]
                for kind, provider in (
                    ("openai", "oai"),
                    ("anthropic", "claude"),
                    ("gemini", "gem"),
                )
            },
        }
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def root(upstreams) -> AsyncIterator[str]:
    """The router on loopback in front of the module's fakes; yields its root URL."""
    async with running_router(router_config(upstreams.roots)) as server:
        yield str(server.make_url("")).rstrip("/")


@pytest.fixture
def client(root) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=root)


def chat_messages(text: str, **user: Any) -> list[dict[str, Any]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text, **user}]


async def chat(
    client: ollama.AsyncClient, stream: bool, **kwargs: Any
) -> list[ollama.ChatResponse]:
    """The answer's objects: one, or every object of the stream."""
    if not stream:
        return [await client.chat(**kwargs)]
    return [part async for part in await client.chat(stream=True, **kwargs)]


def joined(parts: list[ollama.ChatResponse]) -> str:
    return "".join(p.message.content or "" for p in parts)


def check_final(parts: list, model: str, done_reason: str = "stop") -> None:
    """Only the last object is done; it carries the counts and durations."""
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    last = parts[-1]
    assert last.model == model
    assert last.done_reason == done_reason
    assert last.prompt_eval_count == INPUT_TOKENS
    assert last.eval_count == OUTPUT_TOKENS
    assert last.load_duration == 0
    assert last.total_duration > 0
    assert last.total_duration == last.prompt_eval_duration + last.eval_duration
    for part in parts:
        assert datetime.fromisoformat(part.created_at).tzinfo is not None


@module_loop
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("upstream", KINDS, ids=lambda k: f"to-{k}")
async def test_chat(fakes, client, upstream, stream):
    parts = await chat(
        client, stream, model=f"m-{upstream}", messages=chat_messages("scenario:text hi")
    )
    assert joined(parts) == TEXT_ANSWER
    assert all(p.message.role == "assistant" for p in parts)
    check_final(parts, f"m-{upstream}")
    if stream:
        assert len(parts) > 2  # the text arrives in pieces
    seen = fakes.by_name(upstream).last.seen
    assert seen.system == SYSTEM_PROMPT
    assert seen.user_texts == ["scenario:text hi"]
    assert seen.stream == stream


@module_loop
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_generate(fakes, client, stream):
    kwargs = dict(model="m-anthropic", prompt="scenario:text hi", system=SYSTEM_PROMPT)
    if stream:
        parts = [p async for p in await client.generate(stream=True, **kwargs)]
    else:
        parts = [await client.generate(**kwargs)]
    assert "".join(p.response for p in parts) == TEXT_ANSWER
    check_final(parts, "m-anthropic")
    seen = fakes.anthropic.last.seen
    assert (seen.system, seen.user_texts) == (SYSTEM_PROMPT, ["scenario:text hi"])


@module_loop
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("upstream", KINDS, ids=lambda k: f"to-{k}")
async def test_image(fakes, client, upstream, stream):
    # The SDK sends bytes as base64; the fake checks that the same PNG bytes arrive.
    messages = chat_messages("scenario:image what is this?", images=[RED_PIXEL_PNG])
    parts = await chat(client, stream, model=f"m-{upstream}", messages=messages)
    assert joined(parts) == IMAGE_ANSWER
    assert fakes.by_name(upstream).last.seen.images == [RED_PIXEL_PNG]


@module_loop
async def test_generate_with_an_image(fakes, client):
    answer = await client.generate(
        model="m-gemini", prompt="scenario:image what is this?", images=[RED_PIXEL_PNG]
    )
    assert answer.response == IMAGE_ANSWER
    assert fakes.gemini.last.seen.images == [RED_PIXEL_PNG]


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "temp": {"type": "number"}},
    "required": ["city", "temp"],
}


@module_loop
async def test_format_json_and_schema_reach_the_upstream(fakes, client):
    messages = chat_messages("scenario:text hi")
    await client.chat(model="m-openai", messages=messages, format="json")
    assert fakes.openai.last.body["response_format"] == {"type": "json_object"}
    await client.chat(model="m-openai", messages=messages, format=SCHEMA)
    sent = fakes.openai.last.body["response_format"]
    assert sent["type"] == "json_schema"
    assert sent["json_schema"]["schema"] == SCHEMA
    await client.generate(model="m-gemini", prompt="scenario:text hi", format=SCHEMA)
    config = fakes.gemini.last.body["generationConfig"]
    assert config["responseMimeType"] == "application/json"


OPTIONS = {
    "temperature": 0.3,
    "top_p": 0.9,
    "seed": 7,
    "num_predict": 12,
    "stop": ["END", "STOP"],
    "presence_penalty": 0.5,
    "frequency_penalty": 0.25,
    # Options the IR has no field for: accepted and not sent (as Ollama ignores options a
    # model does not use).
    "repeat_penalty": 1.1,
    "num_ctx": 4096,
    "mirostat": 0,
    "num_thread": 2,
}


@module_loop
async def test_options_map_onto_sampling(fakes, client):
    await client.chat(model="m-openai", messages=chat_messages("scenario:text hi"), options=OPTIONS)
    body = fakes.openai.last.body
    expected = {
        "temperature": 0.3,
        "top_p": 0.9,
        "seed": 7,
        "max_tokens": 12,
        "stop": ["END", "STOP"],
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
    }
    assert {k: body.get(k) for k in expected} == expected
    assert not {"repeat_penalty", "num_ctx", "mirostat", "num_thread", "options"} & set(body)
    # The SDK's typed Options reach Gemini as its own fields (OpenAI has no top_k).
    sampling = ollama.Options(temperature=0.2, top_k=5, num_predict=30, stop=["END"])
    await client.generate(model="m-gemini", prompt="scenario:text hi", options=sampling)
    config = fakes.gemini.last.body["generationConfig"]
    assert config == {
        "temperature": 0.2,
        "topK": 5,
        "maxOutputTokens": 30,
        "stopSequences": ["END"],
    }


@module_loop
async def test_num_predict_cut_is_done_reason_length(fakes, client):
    parts = await chat(
        client, True, model="m-gemini", messages=chat_messages("scenario:truncated hi")
    )
    assert joined(parts) == TRUNCATED_ANSWER
    check_final(parts, "m-gemini", done_reason="length")


@module_loop
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_thinking(fakes, client, stream):
    parts = await chat(
        client,
        stream,
        model="m-anthropic",
        messages=chat_messages("scenario:reasoning"),
        think=True,
    )
    assert "".join(p.message.thinking or "" for p in parts) == REASONING_TEXT
    assert joined(parts) == REASONING_ANSWER
    assert fakes.anthropic.last.body["thinking"]["type"] == "enabled"


@module_loop
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("upstream", KINDS, ids=lambda k: f"to-{k}")
async def test_tool_call_round_trip(fakes, client, upstream, stream):
    model = f"m-{upstream}"
    messages = chat_messages("scenario:tool weather in Paris?")
    parts = await chat(client, stream, model=model, messages=messages, tools=TOOLS)
    calls = [c for p in parts for c in p.message.tool_calls or []]
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [
        ("get_weather", WEATHER_ARGS)
    ]
    assert parts[-1].done_reason == "stop"
    # The client sends the assistant turn back and the result by tool name (what the SDK's
    # examples do); the upstream must see it answer the call it made.
    messages += [
        {"role": "assistant", "content": "", "tool_calls": [c.model_dump() for c in calls]},
        {"role": "tool", "content": WEATHER_RESULT, "tool_name": "get_weather"},
    ]
    parts = await chat(client, stream, model=model, messages=messages, tools=TOOLS)
    assert joined(parts) == PARALLEL_ANSWER
    seen = fakes.by_name(upstream).last.seen
    (result,) = seen.tool_results
    assert WEATHER_RESULT in result.content  # Gemini wraps it as {"output": ...}
    made = seen.assistant_tool_calls[0]
    if made.id:  # Gemini pairs by name
        assert result.call_id == made.id
    assert seen.tool_names == ["get_weather", "get_time"]


@module_loop
async def test_discovery_routes(client, root):
    listed = await client.list()
    assert [m.model for m in listed.models] == ["m-openai", "m-anthropic", "m-gemini"]
    assert listed.models[1].details.family == "anthropic"
    shown = await client.show("m-gemini")
    assert set(shown.capabilities) == {"completion", "tools", "vision"}
    assert shown.details.format == "remote"
    # ``provider/model`` names work as in every other format.
    assert (await client.show("oai/gpt-4o")).details.family == "openai"
    assert (await client.ps()).models == []  # cloud models are never loaded here
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{root}/api/version") as resp:
            assert await resp.json() == {"version": OLLAMA_VERSION}
        # Clients before Ollama 0.3 name the model ``name``.
        async with http.post(f"{root}/api/show", json={"name": "m-openai"}) as resp:
            assert resp.status == 200


async def raw_post(root: str, path: str, body: bytes | dict) -> tuple[int, str, list[dict]]:
    """POST and read every NDJSON line: (status, content type, objects)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{root}{path}", data=data) as resp:
            text = await resp.text()
            return resp.status, resp.content_type, [json.loads(x) for x in text.splitlines()]


@module_loop
async def test_wire_shapes(fakes, root):
    body = {"model": "m-openai", "messages": chat_messages("scenario:text hi")}
    # ``stream`` defaults to true, as in Ollama.
    status, kind, lines = await raw_post(root, "/api/chat", body)
    assert (status, kind) == (200, "application/x-ndjson")
    for line in lines[:-1]:
        assert set(line) == {"model", "created_at", "message", "done"}
        assert set(line["message"]) == {"role", "content"}
    assert set(lines[-1]) == FINAL_FIELDS | {"message"}
    assert lines[-1]["message"] == {"role": "assistant", "content": ""}
    status, kind, lines = await raw_post(root, "/api/chat", {**body, "stream": False})
    assert (status, kind, len(lines)) == (200, "application/json", 1)
    assert set(lines[0]) == FINAL_FIELDS | {"message"}
    assert lines[0]["message"] == {"role": "assistant", "content": TEXT_ANSWER}
    generate = {"model": "m-openai", "prompt": "scenario:text hi", "stream": False}
    _, _, lines = await raw_post(root, "/api/generate", generate)
    assert set(lines[0]) == FINAL_FIELDS | {"response"}
    _, _, lines = await raw_post(root, "/api/generate", {**generate, "stream": True})
    assert all(set(line) == {"model", "created_at", "response", "done"} for line in lines[:-1])
    assert set(lines[-1]) == FINAL_FIELDS | {"response"}
    # A tool call: arguments as an object, as Ollama sends them.
    tool = {**body, "stream": False, "tools": TOOLS}
    tool["messages"] = chat_messages("scenario:tool weather?")
    _, _, lines = await raw_post(root, "/api/chat", tool)
    (call,) = lines[0]["message"]["tool_calls"]
    assert call["function"] == {"index": 0, "name": "get_weather", "arguments": WEATHER_ARGS}


PNG_B64 = base64.b64encode(RED_PIXEL_PNG).decode()

BAD_REQUESTS = [
    (
        "/api/chat",
        {"messages": [{"role": "user", "content": "hi"}]},
        400,
        "model: field is required",
    ),
    ("/api/chat", {"model": "m-openai", "messages": []}, 400, "messages: must not be empty"),
    (
        "/api/chat",
        {"model": "m-openai", "messages": [{"role": "user", "content": "hi", "images": ["%%%"]}]},
        400,
        "messages[0].images[0]: invalid base64 data",
    ),
    (
        "/api/chat",
        {
            "model": "m-openai",
            "messages": [{"role": "user", "content": "hi", "images": [PNG_B64, "aGVsbG8="]}],
        },
        400,
        "messages[0].images[1]: not a PNG, JPEG, GIF or WebP image",
    ),
    (
        "/api/chat",
        {
            "model": "m-openai",
            "messages": [{"role": "assistant", "content": "hi", "images": [PNG_B64]}],
        },
        400,
        "messages[0].images: only user messages take images, not 'assistant' ones",
    ),
    (
        "/api/chat",
        {"model": "m-openai", "messages": [{"role": "user", "content": "hi"}], "format": "xml"},
        400,
        'format: expected "json" or a JSON schema object',
    ),
    (
        "/api/chat",
        {
            "model": "m-openai",
            "messages": [{"role": "user", "content": "hi"}],
            "options": {"temperature": "hot"},
        },
        400,
        "options.temperature: expected a number, got str",
    ),
    (
        "/api/chat",
        {
            "model": "m-openai",
            "messages": [{"role": "user", "content": "hi"}],
            "options": {"num_predict": 0},
        },
        400,
        "options.num_predict: must be at least 1, got 0",
    ),
    (
        "/api/chat",
        {"model": "m-openai", "messages": [{"role": "tool", "content": "21C", "tool_name": "f"}]},
        400,
        "messages[0]: no unanswered assistant tool call of 'f' precedes this tool result",
    ),
    (
        "/api/generate",
        {"model": "m-openai", "prompt": "def f(", "suffix": "return 1"},
        400,
        "suffix: the router does not support fill-in-the-middle prompts",
    ),
    ("/api/generate", {"model": "m-openai"}, 400, "prompt: field is required"),
    (
        "/api/generate",
        {"model": "m-openai", "prompt": "hi", "keep_alive": [5]},
        400,
        "keep_alive: expected a duration string or a number of seconds",
    ),
    (
        "/api/chat",
        {"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
        404,
        "model 'nope' is not configured on this router",
    ),
    ("/api/show", {"model": "nope"}, 404, "model 'nope' is not configured on this router"),
    ("/api/show", {}, 400, "model: field is required"),
    ("/api/embed", {"model": "m-openai", "input": "hi"}, 404, "no such endpoint: POST /api/embed"),
]


@module_loop
@pytest.mark.parametrize(("path", "body", "status", "message"), BAD_REQUESTS)
async def test_bad_requests_get_ollama_errors(fakes, root, path, body, status, message):
    got, kind, lines = await raw_post(root, path, body)
    assert (got, kind) == (status, "application/json")
    assert lines == [{"error": lines[0]["error"]}]
    assert lines[0]["error"].startswith(message)
    assert not fakes.openai.exchanges


@module_loop
async def test_bad_json_and_sdk_errors(fakes, client, root):
    status, _, lines = await raw_post(root, "/api/chat", b"{not json")
    assert status == 400 and lines[0]["error"].startswith("request body is not valid JSON")
    with pytest.raises(ollama.ResponseError) as caught:
        await client.chat(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 404
    assert "nope" in caught.value.error
    # keep_alive is accepted (the router's models stay loaded).
    answer = await client.chat(
        model="m-openai", messages=chat_messages("scenario:text hi"), keep_alive="5m"
    )
    assert answer.message.content == TEXT_ANSWER


@module_loop
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_upstream_errors_in_ollama_shape(fakes, client, stream):
    # An upstream 400 before anything was sent: Ollama's status and body.
    with pytest.raises(ollama.ResponseError) as caught:
        await chat(client, stream, model="m-openai", messages=chat_messages("scenario:error-400"))
    assert caught.value.status_code == 400
    assert ERROR_MESSAGE in caught.value.error


@module_loop
async def test_error_after_the_stream_started_is_an_error_line(fakes, client, root):
    with pytest.raises(ollama.ResponseError) as caught:
        await chat(
            client, True, model="m-anthropic", messages=chat_messages("scenario:midstream-error")
        )
    assert ERROR_MESSAGE in caught.value.error
    body = {"model": "m-gemini", "messages": chat_messages("scenario:midstream-error")}
    status, _, lines = await raw_post(root, "/api/chat", body)
    assert status == 200
    assert lines[0]["message"]["content"] and lines[0]["done"] is False
    assert set(lines[-1]) == {"error"}


# The local model: a tiny random SmolVLM checkpoint behind the mlx provider.
IMAGE_BYTES = (Path(__file__).parents[2] / "mlx_smolvlm" / "assets" / "example.jpg").read_bytes()
QUESTION = "What is in this picture?"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_hf_checkpoint(tmp_path_factory.mktemp("tiny_vlm"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def local_root(checkpoint) -> AsyncIterator[str]:
    cfg = Config.from_dict(
        {
            "providers": {
                "local": {
                    "type": "mlx",
                    "mlx": {"model": str(checkpoint), "max_context_tokens": 256},
                }
            },
            "models": {"tiny-vlm": [{"provider": "local", "model": "tiny-vlm"}]},
        }
    )
    async with running_router(cfg) as server:
        yield str(server.make_url("")).rstrip("/")


@module_loop
async def test_local_model(checkpoint, local_root):
    model, processor = load(str(checkpoint))
    content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    expected = generate(
        model,
        processor,
        [{"role": "user", "content": content}],
        images=[IMAGE_BYTES],
        max_tokens=MAX_TOKENS,
    )
    client = ollama.AsyncClient(host=local_root)
    messages = [{"role": "user", "content": QUESTION, "images": [IMAGE_BYTES]}]
    options = {"num_predict": MAX_TOKENS, "temperature": 0}
    for stream in (False, True):
        parts = await chat(client, stream, model="tiny-vlm", messages=messages, options=options)
        assert joined(parts) == expected.text
        last = parts[-1]
        assert (last.prompt_eval_count, last.eval_count) == (
            expected.prompt_tokens,  # image tokens included
            expected.generation_tokens,
        )
        assert last.model == "tiny-vlm"
    answer = await client.generate(
        model="tiny-vlm", prompt=QUESTION, images=[IMAGE_BYTES], options=options
    )
    assert (answer.response, answer.eval_count) == (expected.text, expected.generation_tokens)
    shown = await client.show("tiny-vlm")
    assert shown.capabilities == ["completion", "tools", "vision"]
    # JSON by a schema: with random weights only the constraint makes it valid.
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 0, "maximum": 9},
            "ok": {"type": "boolean"},
        },
        "required": ["n", "ok"],
        "additionalProperties": False,
    }
    shaped = await client.chat(
        model="tiny-vlm", messages=messages, format=schema, options={"num_predict": 100}
    )
    jsonschema.validate(json.loads(shaped.message.content), schema)
    assert shown.modelinfo["smolvlm.context_length"] == 256
    (running,) = (await client.ps()).models
    assert (running.model, running.context_length) == ("tiny-vlm", 256)
    assert running.size > 0


# Ollama as an upstream: a second router whose provider of type ``ollama`` is the first
# router's Ollama API, so a request crosses Ollama's wire both ways (client side and upstream
# side) before it reaches a fake provider.


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chained_root(root) -> AsyncIterator[str]:
    cfg = Config.from_dict(
        {
            "providers": {"olla": {"type": "ollama", "base_url": root}},
            "models": {
                f"via-{kind}": [{"provider": "olla", "model": f"m-{kind}"}] for kind in KINDS
            },
        }
    )
    async with running_router(cfg) as server:
        yield str(server.make_url("")).rstrip("/")


@pytest_asyncio.fixture(loop_scope="module")
async def chained_openai(chained_root) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{chained_root}/v1", api_key="unused", max_retries=0)
    yield client
    await client.close()


async def openai_chat(client: openai.AsyncOpenAI, stream: bool, **kwargs: Any) -> dict:
    """Text, tool calls, finish reason and usage of a Chat Completions answer."""
    if not stream:
        r = await client.chat.completions.create(**kwargs)
        message = r.choices[0].message
        calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []]
        return {
            "text": message.content or "",
            "calls": calls,
            "finish": r.choices[0].finish_reason,
            "usage": (r.usage.prompt_tokens, r.usage.completion_tokens),
        }
    chunks = [
        c
        async for c in await client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs
        )
    ]
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = calls.setdefault(call.index, [call.id, call.function.name, ""])
            entry[2] += call.function.arguments or ""
    return {
        "text": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
        "calls": [tuple(v) for v in calls.values()],
        "finish": next(c.choices[0].finish_reason for c in chunks[::-1] if c.choices),
        "usage": (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens),
    }


@module_loop
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("upstream", KINDS, ids=lambda k: f"to-{k}")
async def test_ollama_upstream_text_and_image(fakes, chained_openai, upstream, stream):
    image = "data:image/png;base64," + base64.b64encode(RED_PIXEL_PNG).decode()
    content = [
        {"type": "text", "text": "scenario:image what is this?"},
        {"type": "image_url", "image_url": {"url": image}},
    ]
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]
    got = await openai_chat(
        chained_openai,
        stream,
        model=f"via-{upstream}",
        messages=messages,
        temperature=0.5,
        max_tokens=40,
        stop=["END"],
    )
    assert (got["text"], got["finish"]) == (IMAGE_ANSWER, "stop")
    assert got["usage"] == (INPUT_TOKENS, OUTPUT_TOKENS)
    seen = fakes.by_name(upstream).last.seen
    assert (seen.system, seen.images, seen.stream) == (SYSTEM_PROMPT, [RED_PIXEL_PNG], stream)
    assert seen.max_tokens == 40 and seen.stop == ["END"]


@module_loop
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_ollama_upstream_tool_round_trip(fakes, chained_openai, stream):
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "scenario:tool weather in Paris?"}
    ]
    got = await openai_chat(
        chained_openai, stream, model="via-anthropic", messages=messages, tools=TOOLS
    )
    ((call_id, name, arguments),) = got["calls"]
    assert (name, json.loads(arguments), got["finish"]) == (
        "get_weather",
        WEATHER_ARGS,
        "tool_calls",
    )
    # The tool call's id survives both hops: Anthropic's own id comes back to the client.
    assert call_id == fakes.anthropic.last.reply.tool_calls[0].id
    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": WEATHER_RESULT},
    ]
    got = await openai_chat(
        chained_openai, stream, model="via-anthropic", messages=messages, tools=TOOLS
    )
    assert got["text"] == PARALLEL_ANSWER
    seen = fakes.anthropic.last.seen
    assert [(r.call_id, r.content) for r in seen.tool_results] == [(call_id, WEATHER_RESULT)]


@module_loop
async def test_ollama_upstream_errors(fakes, chained_openai):
    with pytest.raises(openai.BadRequestError) as caught:
        await chained_openai.chat.completions.create(
            model="via-openai", messages=[{"role": "user", "content": "scenario:error-400"}]
        )
    assert ERROR_MESSAGE in caught.value.message
    with pytest.raises(openai.APIError) as caught:
        await openai_chat(
            chained_openai,
            True,
            model="via-gemini",
            messages=[{"role": "user", "content": "scenario:midstream-error"}],
        )
    assert ERROR_MESSAGE in str(caught.value)


def test_upstream_renders_every_field():
    image = ir.MediaPart("image/png", data=base64.b64encode(RED_PIXEL_PNG).decode())
    call = ir.ToolCallPart("call_1", "get_weather", '{"city":"Paris"}')
    request = ir.Request(
        model="llama3.2",
        messages=[
            ir.Message("system", [ir.TextPart(SYSTEM_PROMPT)]),
            ir.Message("user", [ir.TextPart("weather?"), image]),
            ir.Message("assistant", [ir.ThinkingPart("hm"), call]),
            ir.Message("user", [ir.ToolResultPart("call_1", "get_weather", [ir.TextPart("21C")])]),
        ],
        tools=[ir.Tool("get_weather", "Weather.", TOOL_SPECS[0][2])],
        temperature=0.2,
        top_p=0.9,
        top_k=5,
        seed=3,
        max_tokens=50,
        stop=["END"],
        response_format=ir.ResponseFormat("json_schema", schema=SCHEMA),
        reasoning=ir.Reasoning(effort="low"),
        stream=True,
    )
    assert upstream.render_request(request) == {
        "model": "llama3.2",
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": "weather?", "images": [image.data]},
            {
                "role": "assistant",
                "content": "",
                "thinking": "hm",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "function": {
                            "index": 0,
                            "name": "get_weather",
                            "arguments": {"city": "Paris"},
                        },
                    }
                ],
            },
            {
                "role": "tool",
                "content": "21C",
                "tool_call_id": "call_1",
                "tool_name": "get_weather",
            },
        ],
        "stream": True,
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": TOOL_SPECS[0][2],
                    "description": "Weather.",
                },
            }
        ],
        "options": {
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 5,
            "seed": 3,
            "num_predict": 50,
            "stop": ["END"],
        },
        "format": SCHEMA,
        "think": "low",
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tool_choice": ir.ToolChoice("required")}, "tool_choice: Ollama cannot be made to call"),
        ({"n": 2}, "n: not supported by Ollama"),
        (
            {"messages": [ir.Message("user", [ir.MediaPart("image/*", url="https://x/a.png")])]},
            "Ollama takes inline images only",
        ),
    ],
)
def test_upstream_refuses_what_ollama_cannot_take(change, message):
    request = ir.Request(
        **{"model": "m", "messages": [ir.Message("user", [ir.TextPart("hi")])], **change}
    )
    with pytest.raises(InvalidRequestError, match=message):
        upstream.render_request(request)


def test_upstream_refuses_tool_call_arguments_that_are_not_a_json_object():
    call = ir.ToolCallPart("c1", "get_weather", "{")
    request = ir.Request(
        model="m",
        messages=[ir.Message("user", [ir.TextPart("hi")]), ir.Message("assistant", [call])],
    )
    with pytest.raises(InvalidRequestError, match=r"messages\[1\]\.tool_calls: .*not valid JSON"):
        upstream.render_request(request)


def test_upstream_stream_parser():
    parser = upstream.StreamParser()
    chunks = [
        {"model": "llama3.2", "message": {"role": "assistant", "content": "", "thinking": "hm"}},
        {"model": "llama3.2", "message": {"role": "assistant", "content": "Hi"}},
        {"model": "llama3.2", "message": {"role": "assistant", "content": " there"}},
        {
            "model": "llama3.2",
            "message": {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}],
            },
        },
        {
            "model": "llama3.2",
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": "stop",
            "prompt_eval_count": 3,
            "eval_count": 4,
        },
    ]
    events = [
        e for chunk in chunks for e in parser.feed({**chunk, "done": chunk.get("done", False)})
    ]
    response = ir.collect_stream(events + parser.finish())
    thinking, text, call = response.parts
    assert (thinking.text, text.text) == ("hm", "Hi there")
    assert (call.name, json.loads(call.arguments)) == ("f", {"a": 1})
    assert response.finish_reason == "tool_calls"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (3, 4)
    cut = upstream.StreamParser()
    cut.feed(chunks[1])
    with pytest.raises(UpstreamError, match="ended before its done object"):
        cut.finish()
