"""Structured output and tool calls on the local model, through the official async SDKs.

The router serves a tiny random SmolVLM checkpoint; with random weights only the constraint
makes the answers valid, so each answer is checked with `jsonschema` against its schema, tool
calls come back in each format's native shape (streamed as the format streams them), a tool
result round-trips, and a schema the constraint cannot enforce is a 400 naming it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import anthropic
import jsonschema
import openai
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from router import ir
from router.providers import mlx_structured
from tests.router.fakes import Clients, make_clients
from tests.router.helpers import client_roots, running_router
from tests.router.test_local_backend import MODEL, checkpoint, local_config  # noqa: F401

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "temperature": {"type": "number", "minimum": -50, "maximum": 60},
        "tags": {"type": "array", "items": {"enum": ["sun", "rain", "wind"]}, "maxItems": 3},
    },
    "required": ["city", "temperature", "tags"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
UNSUPPORTED = {"type": "object", "properties": {"day": {"type": "string", "format": "no-such"}}}
ASK = "What is the weather in Paris?"
MAX_TOKENS = 200

module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(checkpoint) -> AsyncIterator[TestServer]:  # noqa: F811
    async with running_router(local_config(checkpoint, max_context_tokens=2048)) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def clients(server) -> AsyncIterator[Clients]:
    made = make_clients(client_roots(server))
    yield made
    await made.close()


@module_loop
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_openai_response_format_json_schema(clients, stream):
    args = dict(
        model=MODEL,
        messages=[{"role": "user", "content": ASK}],
        max_tokens=MAX_TOKENS,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True},
        },
    )
    if stream:
        chunks = [
            c async for c in await clients.openai.chat.completions.create(**args, stream=True)
        ]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        response = await clients.openai.chat.completions.create(**args)
        text = response.choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)


@module_loop
async def test_openai_json_object(clients):
    response = await clients.openai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Reply in JSON."}],
        max_tokens=MAX_TOKENS,
        response_format={"type": "json_object"},
    )
    # Any object: random weights may fill it past max_tokens, but never leave JSON.
    text, finish = response.choices[0].message.content, response.choices[0].finish_reason
    assert text.startswith("{") and (finish == "length" or isinstance(json.loads(text), dict))


@module_loop
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_anthropic_output_config_format(clients, stream):
    args = dict(
        model=MODEL,
        max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": ASK}],
        extra_body={"output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}},
    )
    if stream:
        async with clients.anthropic.messages.stream(**args) as s:
            message = await s.get_final_message()
    else:
        message = await clients.anthropic.messages.create(**args)
    jsonschema.validate(json.loads(message.content[0].text), SCHEMA)


@module_loop
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_gemini_response_schema(clients, stream):
    args = dict(
        model=MODEL,
        contents=ASK,
        config=genai_types.GenerateContentConfig(
            max_output_tokens=MAX_TOKENS,
            response_mime_type="application/json",
            response_json_schema=SCHEMA,
        ),
    )
    if stream:
        chunks = [c async for c in await clients.gemini.aio.models.generate_content_stream(**args)]
        text = "".join(c.text or "" for c in chunks)
    else:
        text = (await clients.gemini.aio.models.generate_content(**args)).text
    jsonschema.validate(json.loads(text), SCHEMA)


OPENAI_TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER},
    }
]


@module_loop
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_openai_tool_call_and_its_result_round_trip(clients, stream):
    messages = [{"role": "user", "content": ASK}]
    args = dict(model=MODEL, tools=OPENAI_TOOLS, tool_choice="required", max_tokens=MAX_TOKENS)
    if stream:
        chunks = [
            c
            async for c in await clients.openai.chat.completions.create(
                **args, messages=messages, stream=True
            )
        ]
        deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
        call_id, name = deltas[0].id, deltas[0].function.name
        assert len(deltas) > 2  # the name first, then the arguments as they are generated
        arguments = "".join(d.function.arguments or "" for d in deltas)
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
    else:
        response = await clients.openai.chat.completions.create(**args, messages=messages)
        assert response.choices[0].finish_reason == "tool_calls"
        call = response.choices[0].message.tool_calls[0]
        call_id, name, arguments = call.id, call.function.name, call.function.arguments
    assert name == "get_weather"
    jsonschema.validate(json.loads(arguments), WEATHER)
    messages += [
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "18 degrees and sunny"},
    ]
    answer = await clients.openai.chat.completions.create(
        model=MODEL, messages=messages, tools=OPENAI_TOOLS, tool_choice="none", max_tokens=8
    )
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].message.content


@module_loop
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_anthropic_tool_use_and_its_result_round_trip(clients, stream):
    tools = [{"name": "get_weather", "description": "Weather now", "input_schema": WEATHER}]
    messages = [{"role": "user", "content": ASK}]
    args = dict(model=MODEL, max_tokens=MAX_TOKENS, tools=tools, tool_choice={"type": "any"})
    if stream:
        async with clients.anthropic.messages.stream(**args, messages=messages) as s:
            message = await s.get_final_message()
    else:
        message = await clients.anthropic.messages.create(**args, messages=messages)
    assert message.stop_reason == "tool_use"
    use = message.content[0]
    assert use.type == "tool_use" and use.name == "get_weather"
    jsonschema.validate(use.input, WEATHER)
    messages += [
        {"role": "assistant", "content": [use.model_dump(exclude_none=True)]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C"}],
        },
    ]
    answer = await clients.anthropic.messages.create(
        model=MODEL, max_tokens=8, tools=tools, messages=messages, tool_choice={"type": "none"}
    )
    assert answer.content[0].type == "text"


@module_loop
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_gemini_function_call_and_its_response_round_trip(clients, stream):
    declaration = genai_types.FunctionDeclaration(
        name="get_weather", description="Weather now", parameters_json_schema=WEATHER
    )
    config = genai_types.GenerateContentConfig(
        max_output_tokens=MAX_TOKENS,
        tools=[genai_types.Tool(function_declarations=[declaration])],
        tool_config=genai_types.ToolConfig(
            function_calling_config=genai_types.FunctionCallingConfig(mode="ANY")
        ),
    )
    contents = [genai_types.Content(role="user", parts=[genai_types.Part.from_text(text=ASK)])]
    if stream:
        chunks = [
            c
            async for c in await clients.gemini.aio.models.generate_content_stream(
                model=MODEL, contents=contents, config=config
            )
        ]
        calls = [call for c in chunks for call in c.function_calls or []]
        content = next(c for c in chunks if c.function_calls).candidates[0].content
    else:
        response = await clients.gemini.aio.models.generate_content(
            model=MODEL, contents=contents, config=config
        )
        calls, content = response.function_calls, response.candidates[0].content
    assert len(calls) == 1 and calls[0].name == "get_weather"
    jsonschema.validate(calls[0].args, WEATHER)
    contents += [
        content,
        genai_types.Content(
            role="user",
            parts=[
                genai_types.Part.from_function_response(
                    name="get_weather", response={"result": "18 C"}
                )
            ],
        ),
    ]
    answer = await clients.gemini.aio.models.generate_content(
        model=MODEL,
        contents=contents,
        config=genai_types.GenerateContentConfig(max_output_tokens=8),
    )
    assert answer.text


@module_loop
async def test_a_schema_the_constraint_cannot_enforce_is_a_400_naming_it(clients):
    with pytest.raises(openai.BadRequestError) as err:
        await clients.openai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": ASK}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": UNSUPPORTED},
            },
        )
    assert "no-such" in str(err.value) and err.value.body["param"] == "response_format.schema"
    with pytest.raises(anthropic.BadRequestError, match=r"tools\[0\]\.parameters.*no-such"):
        await clients.anthropic.messages.create(
            model=MODEL,
            max_tokens=8,
            messages=[{"role": "user", "content": ASK}],
            tools=[{"name": "f", "input_schema": UNSUPPORTED}],
        )
    declaration = genai_types.FunctionDeclaration(name="f", parameters_json_schema=UNSUPPORTED)
    with pytest.raises(genai_errors.ClientError, match="no-such") as err:
        await clients.gemini.aio.models.generate_content(
            model=MODEL,
            contents=ASK,
            config=genai_types.GenerateContentConfig(
                tools=[genai_types.Tool(function_declarations=[declaration])]
            ),
        )
    assert err.value.code == 400


@module_loop
async def test_prompt_cache_hits_show_in_the_metrics(server, clients):
    system = {"role": "system", "content": "You are a weather bot. " * 20}
    for question in ("Rain in Oslo?", "Sun in Rome?"):
        await clients.openai.chat.completions.create(
            model=MODEL, messages=[system, {"role": "user", "content": question}], max_tokens=2
        )
    async with aiohttp.ClientSession() as session:
        async with session.get(str(server.make_url("/metrics"))) as response:
            text = await response.text()
    values = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("router_provider_prompt_cache") and 'provider="local"' in line
    }
    assert values["router_provider_prompt_cache_hits"] >= 1
    assert values["router_provider_prompt_cache_reused_tokens"] >= 100  # the system prompt
    assert 0 < values["router_provider_prompt_cache_bytes"]


@pytest.mark.parametrize("incremental", [True, False])
def test_a_tool_call_streams_or_comes_whole_and_a_cut_one_is_never_broken_json(incremental):
    pieces = ['{"na', 'me":"get_weather","argu', 'ments":{"city":"Par', 'is","unit":"celsius"}}']
    call = mlx_structured.ToolCallStream(incremental)
    events = [event for piece in pieces for event in call.add(piece)]
    last, whole = call.finish()
    response = ir.collect_stream(
        [ir.StreamStart("id", MODEL), *events, *last, ir.StreamEnd("tool_calls")]
    )
    (part,) = response.parts
    assert whole and part.name == "get_weather"
    assert json.loads(part.arguments) == {"city": "Paris", "unit": "celsius"}
    assert len(events) == (3 if incremental else 0)  # start, then two argument pieces

    cut = mlx_structured.ToolCallStream(incremental)
    events = [event for piece in pieces[:3] for event in cut.add(piece)]
    last, whole = cut.finish()
    (part,) = ir.collect_stream(
        [ir.StreamStart("id", MODEL), *events, *last, ir.StreamEnd("length")]
    ).parts
    assert not whole
    if incremental:  # as OpenAI and Anthropic stream a call cut by max_tokens
        assert part.arguments == '{"city":"Par'
    else:  # a complete response never holds arguments that are not JSON
        assert part.text == "".join(pieces[:3])


@module_loop
async def test_a_tool_result_with_an_image_is_a_400_naming_it(clients):
    image = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
    messages = [
        {"role": "user", "content": ASK},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {}}],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "t1",
                    "content": [{"type": "image", "source": image}],
                }
            ],
        },
    ]
    with pytest.raises(anthropic.BadRequestError, match=r"messages\[2\].*text only"):
        await clients.anthropic.messages.create(model=MODEL, max_tokens=8, messages=messages)


@module_loop
async def test_an_earlier_tool_call_with_arguments_not_json_is_a_400_naming_it(clients):
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{"}}
    messages = [
        {"role": "user", "content": ASK},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\].*not valid JSON"):
        await clients.openai.chat.completions.create(model=MODEL, max_tokens=8, messages=messages)
