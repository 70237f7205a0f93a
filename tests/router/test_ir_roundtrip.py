"""Wire -> IR -> wire round trips on golden JSON, per format, plus the cross-format cases
that peer gateways got wrong (ids through Gemini, signatures, system prompts, empty text)."""

from __future__ import annotations

import copy
import json

import pytest

from router import ir
from router.errors import UpstreamError
from router.formats.anthropic import client as anthropic_client
from router.formats.anthropic import content as anthropic_content
from router.formats.anthropic import upstream as anthropic_upstream
from router.formats.gemini import client as gemini_client
from router.formats.gemini import upstream as gemini_upstream
from router.formats.gemini.schema import to_gemini_schema as clean_schema
from router.formats.openai import client as openai_client
from router.formats.openai import upstream as openai_upstream
from router.formats.openai_responses import client as openai_responses

PNG = "iVBORw0KGgo="

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "description": "City name"}},
    "required": ["city"],
}

# ---- OpenAI Chat Completions -------------------------------------------------------------------

OPENAI_REQUEST = {
    "model": "gpt-up",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "system", "content": "Answer in English."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in the image, and the weather?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "Two lookups.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Rome"}'},
                    "extra_content": {"google": {"thought_signature": "Z2VtaW5pLXNpZw=="}},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": '{"sky":"rain"}'},
        {"role": "system", "content": "From now on, answer in French."},
        {"role": "user", "content": "Merci"},
    ],
    "tools": [
        {
            "type": "function",
            "function": {"name": "weather", "description": "Weather", "parameters": WEATHER_SCHEMA},
        }
    ],
    "tool_choice": {"type": "function", "function": {"name": "weather"}},
    "parallel_tool_calls": True,
    "max_tokens": 300,
    "temperature": 0.3,
    "top_p": 0.9,
    "seed": 7,
    "stop": ["END"],
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": WEATHER_SCHEMA, "strict": True},
    },
    "reasoning_effort": "low",
    "stream": True,
    "stream_options": {"include_usage": True},
}

OPENAI_RESPONSE = {
    "id": "chatcmpl-9",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-up",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Checking both.",
                "reasoning_content": "Need two calls.",
                "thinking_blocks": [
                    {"type": "thinking", "thinking": "Need two calls.", "signature": "U0lH"}
                ],
                "tool_calls": [
                    {
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                    },
                    {
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Rome"}'},
                    },
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {
        "prompt_tokens": 50,
        "completion_tokens": 30,
        "total_tokens": 80,
        "prompt_tokens_details": {"cached_tokens": 20},
        "completion_tokens_details": {"reasoning_tokens": 12},
    },
}


def _chunk(delta: dict, finish: str | None = None) -> dict:
    return {
        "id": "chatcmpl-9",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-up",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        "usage": None,
    }


OPENAI_STREAM = [
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"content": "Checking"}),
    _chunk({"content": " both."}),
    _chunk(
        {
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "index": 0,
                    "function": {"name": "weather", "arguments": ""},
                }
            ]
        }
    ),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
    _chunk(
        {
            "tool_calls": [
                {
                    "id": "call_b",
                    "type": "function",
                    "index": 1,
                    "function": {"name": "weather", "arguments": ""},
                }
            ]
        }
    ),
    _chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"city":"Rome"}'}}]}),
    _chunk({}, "tool_calls"),
    {
        "id": "chatcmpl-9",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-up",
        "choices": [],
        "usage": {
            "prompt_tokens": 50,
            "completion_tokens": 30,
            "total_tokens": 80,
            "prompt_tokens_details": {"cached_tokens": 20},
            "completion_tokens_details": {"reasoning_tokens": 12},
        },
    },
]


def test_openai_request_round_trip():
    request = openai_client.parse_request(copy.deepcopy(OPENAI_REQUEST))
    assert openai_upstream.render_request(request, compatible=True) == OPENAI_REQUEST


def test_openai_request_ir_shape():
    request = openai_client.parse_request(copy.deepcopy(OPENAI_REQUEST))
    roles = [m.role for m in request.messages]
    # Two tool messages fold into one user turn; the mid-conversation system stays in place.
    assert roles == ["system", "system", "user", "assistant", "user", "system", "user"]
    results = request.messages[4].parts
    assert [(r.call_id, r.name) for r in results] == [("call_1", "weather"), ("call_2", "weather")]
    assert request.messages[3].parts[2].signature == "Z2VtaW5pLXNpZw=="
    assert request.include_usage and request.stream


def test_openai_request_for_api_openai_com():
    request = openai_client.parse_request(copy.deepcopy(OPENAI_REQUEST))
    body = openai_upstream.render_request(request, compatible=False)
    assert body["max_completion_tokens"] == 300 and "max_tokens" not in body
    assistant = body["messages"][3]
    assert "reasoning_content" not in assistant
    assert all("extra_content" not in c for c in assistant["tool_calls"])


def test_openai_response_round_trip():
    response = openai_upstream.parse_response(copy.deepcopy(OPENAI_RESPONSE))
    assert openai_client.render_response(response, _request()) == OPENAI_RESPONSE


def test_openai_stream_round_trip():
    events = _parse_openai_stream(OPENAI_STREAM)
    renderer = openai_client.StreamRenderer(_request(include_usage=True))
    out = [e.data for ev in events for e in renderer.render_stream_event(ev)]
    assert out[-1] == "[DONE]"
    assert [json.loads(d) for d in out[:-1]] == OPENAI_STREAM


def test_openai_stream_parser_survives_ollama_style_indexes():
    chunks = [
        _chunk({"role": "assistant"}),
        _chunk(
            {
                "tool_calls": [
                    {"index": 0, "id": "a", "function": {"name": "f", "arguments": {"x": 1}}}
                ]
            }
        ),
        _chunk(
            {"tool_calls": [{"index": 0, "id": "b", "function": {"name": "g", "arguments": {}}}]}
        ),
        _chunk({}, "stop"),
    ]
    response = ir.collect_stream(_parse_openai_stream(chunks))
    calls = [(p.id, p.name, p.arguments) for p in response.parts]
    assert calls == [("a", "f", '{"x":1}'), ("b", "g", "{}")]
    assert response.finish_reason == "tool_calls"


def _parse_openai_stream(chunks: list[dict]) -> list[ir.StreamEvent]:
    parser = openai_upstream.StreamParser()
    events = [e for c in copy.deepcopy(chunks) for e in parser.parse_stream_event(c)]
    return events + parser.finish()


def _request(**kwargs: object) -> ir.Request:
    return ir.Request(model="m", messages=[], **kwargs)


# ---- Anthropic ---------------------------------------------------------------------------------

ANTHROPIC_REQUEST = {
    "model": "claude-up",
    "max_tokens": 5000,
    "system": [
        {"type": "text", "text": "You are terse."},
        {"type": "text", "text": "Answer in English.", "cache_control": {"type": "ephemeral"}},
    ],
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look at these."},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                },
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Two lookups.", "signature": "EqQBCkYIBxgC"},
                {"type": "redacted_thinking", "data": "EmwKAhgBEgy"},
                {"type": "text", "text": "Checking."},
                {
                    "type": "tool_use",
                    "id": "toolu_01",
                    "name": "weather",
                    "input": {"city": "Paris"},
                },
                {
                    "type": "tool_use",
                    "id": "toolu_02",
                    "name": "weather",
                    "input": {"city": "Rome"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01",
                    "content": [{"type": "text", "text": "sunny"}],
                },
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_02",
                    "content": [{"type": "text", "text": "unknown city"}],
                    "is_error": True,
                },
                {"type": "text", "text": "And?", "cache_control": {"type": "ephemeral"}},
            ],
        },
    ],
    "tools": [
        {
            "name": "weather",
            "description": "Weather",
            "input_schema": WEATHER_SCHEMA,
            "cache_control": {"type": "ephemeral", "ttl": "1h"},
        }
    ],
    "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
    "stop_sequences": ["END"],
    "thinking": {"type": "enabled", "budget_tokens": 2048},
    "metadata": {"user_id": "u-1"},
    "stream": True,
}

ANTHROPIC_RESPONSE = {
    "id": "msg_01",
    "type": "message",
    "role": "assistant",
    "model": "claude-up",
    "content": [
        {"type": "thinking", "thinking": "Need two calls.", "signature": "EqQBCkYIBxgC"},
        {"type": "redacted_thinking", "data": "EmwKAhgBEgy"},
        {"type": "text", "text": "Checking both."},
        {"type": "tool_use", "id": "toolu_01", "name": "weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_02", "name": "weather", "input": {"city": "Rome"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 30,
        "output_tokens": 40,
        "cache_creation_input_tokens": 5,
        "cache_read_input_tokens": 15,
    },
}


def _a(name: str, **data: object) -> tuple[str, dict]:
    return name, {"type": name, **data}


ANTHROPIC_STREAM = [
    _a(
        "message_start",
        message={
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": "claude-up",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 30,
                "output_tokens": 1,
                "cache_creation_input_tokens": 5,
                "cache_read_input_tokens": 15,
            },
        },
    ),
    _a(
        "content_block_start",
        index=0,
        content_block={"type": "thinking", "thinking": "", "signature": ""},
    ),
    _a("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "Need "}),
    _a("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "two."}),
    _a(
        "content_block_delta",
        index=0,
        delta={"type": "signature_delta", "signature": "EqQBCkYIBxgC"},
    ),
    _a("content_block_stop", index=0),
    _a("content_block_start", index=1, content_block={"type": "text", "text": ""}),
    _a("content_block_delta", index=1, delta={"type": "text_delta", "text": "Checking."}),
    _a("content_block_stop", index=1),
    _a(
        "content_block_start",
        index=2,
        content_block={"type": "tool_use", "id": "toolu_01", "name": "weather", "input": {}},
    ),
    _a(
        "content_block_delta",
        index=2,
        delta={"type": "input_json_delta", "partial_json": '{"city":'},
    ),
    _a(
        "content_block_delta",
        index=2,
        delta={"type": "input_json_delta", "partial_json": '"Paris"}'},
    ),
    _a("content_block_stop", index=2),
    _a(
        "content_block_start",
        index=3,
        content_block={"type": "tool_use", "id": "toolu_02", "name": "weather", "input": {}},
    ),
    _a(
        "content_block_delta",
        index=3,
        delta={"type": "input_json_delta", "partial_json": '{"city":"Rome"}'},
    ),
    _a("content_block_stop", index=3),
    _a(
        "message_delta",
        delta={"stop_reason": "tool_use", "stop_sequence": None},
        usage={
            "input_tokens": 30,
            "output_tokens": 40,
            "cache_creation_input_tokens": 5,
            "cache_read_input_tokens": 15,
        },
    ),
    _a("message_stop"),
]


def test_anthropic_request_round_trip():
    request = anthropic_client.parse_request(copy.deepcopy(ANTHROPIC_REQUEST))
    assert anthropic_upstream.render_request(request) == ANTHROPIC_REQUEST


def test_anthropic_response_round_trip():
    response = anthropic_upstream.parse_response(copy.deepcopy(ANTHROPIC_RESPONSE))
    assert response.usage.input_tokens == 50  # 30 + 5 written + 15 read
    assert anthropic_client.render_response(response, _request()) == ANTHROPIC_RESPONSE


def test_anthropic_stream_round_trip():
    parser = anthropic_upstream.StreamParser()
    events = [
        e
        for name, data in copy.deepcopy(ANTHROPIC_STREAM)
        for e in parser.parse_stream_event(name, data)
    ] + parser.finish()
    renderer = anthropic_client.StreamRenderer(_request())
    out = [(e.event, json.loads(e.data)) for ev in events for e in renderer.render_stream_event(ev)]
    assert out == ANTHROPIC_STREAM


def test_anthropic_stream_ping_and_truncation():
    parser = anthropic_upstream.StreamParser()
    assert parser.parse_stream_event("ping", {"type": "ping"}) == []
    with pytest.raises(UpstreamError, match="message_stop"):
        parser.finish()


# ---- Gemini ------------------------------------------------------------------------------------

GEMINI_REQUEST = {
    "systemInstruction": {"parts": [{"text": "You are terse."}, {"text": "Be exact."}]},
    "contents": [
        {
            "role": "user",
            "parts": [{"text": "Look"}, {"inlineData": {"mimeType": "image/png", "data": PNG}}],
        },
        {
            "role": "model",
            "parts": [
                {
                    "functionCall": {"id": "call_a", "name": "weather", "args": {"city": "Paris"}},
                    "thoughtSignature": "Z2VtaW5pLXNpZw==",
                },
                {"functionCall": {"id": "call_b", "name": "weather", "args": {"city": "Rome"}}},
            ],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"id": "call_a", "name": "weather", "response": {"temp": 20}}},
                {
                    "functionResponse": {
                        "id": "call_b",
                        "name": "weather",
                        "response": {"output": "rainy"},
                    }
                },
            ],
        },
        {"role": "model", "parts": [{"text": "Done.", "thoughtSignature": "dGV4dC1zaWc="}]},
        {"role": "user", "parts": [{"text": "Thanks"}]},
    ],
    "tools": [
        {
            "functionDeclarations": [
                {"name": "weather", "description": "Weather", "parameters": WEATHER_SCHEMA}
            ]
        }
    ],
    "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["weather"]}},
    "generationConfig": {
        "maxOutputTokens": 100,
        "temperature": 0.2,
        "topP": 0.9,
        "topK": 40,
        "stopSequences": ["END"],
        "responseMimeType": "application/json",
        "responseSchema": {"type": "object", "properties": {"a": {"type": "string"}}},
        "thinkingConfig": {"includeThoughts": True, "thinkingBudget": 1024},
    },
}

GEMINI_RESPONSE = {
    "candidates": [
        {
            "content": {
                "role": "model",
                "parts": [
                    {"text": "Thinking it over.", "thought": True},
                    {"text": "Checking."},
                    {
                        "functionCall": {
                            "id": "call_a",
                            "name": "weather",
                            "args": {"city": "Paris"},
                        },
                        "thoughtSignature": "Z2VtaW5pLXNpZw==",
                    },
                ],
            },
            "finishReason": "STOP",
            "index": 0,
        }
    ],
    "usageMetadata": {
        "promptTokenCount": 40,
        "candidatesTokenCount": 10,
        "totalTokenCount": 58,
        "cachedContentTokenCount": 16,
        "thoughtsTokenCount": 8,
    },
    "modelVersion": "gemini-up",
    "responseId": "resp-1",
}


def _g(parts: list[dict] | None = None, **extra: object) -> dict:
    candidate: dict = {"index": 0, **extra}
    if parts is not None:
        candidate = {"content": {"role": "model", "parts": parts}, **candidate}
    return {"candidates": [candidate], "modelVersion": "gemini-up", "responseId": "resp-1"}


GEMINI_STREAM = [
    _g([{"text": "Hmm", "thought": True}]),
    _g([{"text": "Hel"}]),
    _g([{"text": "lo"}]),
    {
        **_g(
            [
                {
                    "functionCall": {"id": "call_a", "name": "weather", "args": {"city": "Paris"}},
                    "thoughtSignature": "Z2VtaW5pLXNpZw==",
                }
            ],
            finishReason="STOP",
        ),
        "usageMetadata": {
            "promptTokenCount": 40,
            "candidatesTokenCount": 10,
            "totalTokenCount": 50,
        },
    },
]


def test_gemini_request_round_trip():
    request = gemini_client.parse_request(copy.deepcopy(GEMINI_REQUEST), "gemini-up")
    assert gemini_upstream.render_request(request) == GEMINI_REQUEST


def test_gemini_request_snake_case_is_accepted():
    body = {
        "system_instruction": {"parts": [{"text": "S"}]},
        "contents": [
            {"role": "user", "parts": [{"inline_data": {"mime_type": "image/png", "data": PNG}}]}
        ],
        "generation_config": {"max_output_tokens": 5},
    }
    request = gemini_client.parse_request(body, "g")
    assert request.max_tokens == 5
    assert request.messages[1].parts[0].media_type == "image/png"


def test_gemini_response_round_trip():
    response = gemini_upstream.parse_response(copy.deepcopy(GEMINI_RESPONSE))
    assert response.finish_reason == "tool_calls"
    assert response.usage.output_tokens == 18 and response.usage.reasoning_tokens == 8
    assert gemini_client.render_response(response, _request()) == GEMINI_RESPONSE


def test_gemini_stream_round_trip():
    parser = gemini_upstream.StreamParser()
    events = [e for c in copy.deepcopy(GEMINI_STREAM) for e in parser.parse_stream_event(c)]
    events += parser.finish()
    renderer = gemini_client.StreamRenderer(_request())
    out = [json.loads(e.data) for ev in events for e in renderer.render_stream_event(ev)]
    assert out == GEMINI_STREAM


# ---- cross-format: the hard cases --------------------------------------------------------------


def test_gemini_calls_without_ids_pair_with_responses_by_name_in_order():
    body = {
        "contents": [
            {"role": "user", "parts": [{"text": "weather in Paris and Rome"}]},
            {
                "role": "model",
                "parts": [
                    {"functionCall": {"name": "weather", "args": {"city": "Paris"}}},
                    {"functionCall": {"name": "weather", "args": {"city": "Rome"}}},
                ],
            },
            {
                "role": "user",
                "parts": [
                    {"functionResponse": {"name": "weather", "response": {"output": "sunny"}}},
                    {"functionResponse": {"name": "weather", "response": {"output": "rainy"}}},
                ],
            },
        ]
    }
    request = gemini_client.parse_request(body, "m")
    wire = openai_upstream.render_request(request, compatible=True)
    calls = wire["messages"][1]["tool_calls"]
    results = wire["messages"][2:]
    assert len({c["id"] for c in calls}) == 2
    assert [r["tool_call_id"] for r in results] == [c["id"] for c in calls]
    assert [r["content"] for r in results] == ["sunny", "rainy"]


def test_openai_tool_ids_survive_gemini_and_names_are_resolved():
    request = openai_client.parse_request(copy.deepcopy(OPENAI_REQUEST))
    body = gemini_upstream.render_request(request)
    calls = [p["functionCall"] for p in body["contents"][1]["parts"]]
    responses = [p["functionResponse"] for p in body["contents"][2]["parts"]]
    assert [c["id"] for c in calls] == ["call_1", "call_2"]
    assert [(r["id"], r["name"]) for r in responses] == [
        ("call_1", "weather"),
        ("call_2", "weather"),
    ]
    assert responses[0]["response"] == {"output": "sunny"}
    assert responses[1]["response"] == {"sky": "rain"}
    # The Gemini signature carried by the OpenAI client comes back on its call.
    assert body["contents"][1]["parts"][1]["thoughtSignature"] == "Z2VtaW5pLXNpZw=="


def test_gemini_signature_round_trips_through_an_openai_client():
    response = gemini_upstream.parse_response(copy.deepcopy(GEMINI_RESPONSE))
    message = openai_client.render_response(response, _request())["choices"][0]["message"]
    call = message["tool_calls"][0]
    assert call["extra_content"] == {"google": {"thought_signature": "Z2VtaW5pLXNpZw=="}}
    next_request = openai_client.parse_request(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "hi"},
                message,
                {"role": "tool", "tool_call_id": call["id"], "content": "sunny"},
            ],
        }
    )
    parts = gemini_upstream.render_request(next_request)["contents"][1]["parts"]
    assert parts[-1]["thoughtSignature"] == "Z2VtaW5pLXNpZw=="


def test_anthropic_signature_round_trips_through_an_openai_client():
    response = anthropic_upstream.parse_response(copy.deepcopy(ANTHROPIC_RESPONSE))
    message = openai_client.render_response(response, _request())["choices"][0]["message"]
    assert message["thinking_blocks"][0]["signature"] == "EqQBCkYIBxgC"
    next_request = openai_client.parse_request(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "hi"},
                message,
                {"role": "tool", "tool_call_id": "toolu_01", "content": "sunny"},
                {"role": "tool", "tool_call_id": "toolu_02", "content": "rainy"},
            ],
        }
    )
    blocks = anthropic_upstream.render_request(next_request)["messages"][1]["content"]
    assert blocks[0] == {
        "type": "thinking",
        "thinking": "Need two calls.",
        "signature": "EqQBCkYIBxgC",
    }
    assert blocks[1] == {"type": "redacted_thinking", "data": "EmwKAhgBEgy"}


def test_anthropic_signature_round_trips_through_a_responses_client():
    response = anthropic_upstream.parse_response(copy.deepcopy(ANTHROPIC_RESPONSE))
    output = openai_responses.render_response(response, _request())["output"]
    next_request = openai_responses.parse_request(
        {
            "model": "m",
            "input": [
                {"role": "user", "content": "hi"},
                *output,
                {"type": "function_call_output", "call_id": "toolu_01", "output": "sunny"},
                {"type": "function_call_output", "call_id": "toolu_02", "output": "rainy"},
            ],
        }
    )
    blocks = anthropic_upstream.render_request(next_request)["messages"][1]["content"]
    assert blocks[0]["signature"] == "EqQBCkYIBxgC"
    assert [b["type"] for b in blocks] == [
        "thinking",
        "redacted_thinking",
        "text",
        "tool_use",
        "tool_use",
    ]


def test_unsigned_reasoning_reaches_anthropic_clients_marked_and_never_anthropic():
    response = openai_upstream.parse_response(
        {
            **OPENAI_RESPONSE,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "Hi", "reasoning_content": "r"},
                }
            ],
        }
    )
    marked = {
        "type": "thinking",
        "thinking": "r",
        "signature": anthropic_content.UNSIGNED_SIGNATURE,
    }
    content = anthropic_client.render_response(response, _request())["content"]
    assert content == [marked, {"type": "text", "text": "Hi"}]
    renderer = anthropic_client.StreamRenderer(_request())
    events = [
        ir.StreamStart("x", "m"),
        ir.PartStart(0, ir.ThinkingPart("")),
        ir.PartDelta(0, text="r"),
        ir.PartStart(1, ir.TextPart("")),
        ir.PartDelta(1, text="Hi"),
        ir.StreamEnd(),
    ]
    out = [json.loads(e.data) for ev in events for e in renderer.render_stream_event(ev)]
    deltas = [e["delta"] for e in out if e["type"] == "content_block_delta"]
    assert deltas[:2] == [
        {"type": "thinking_delta", "thinking": "r"},
        {"type": "signature_delta", "signature": anthropic_content.UNSIGNED_SIGNATURE},
    ]
    # Sent back: Anthropic never sees the marker; an OpenAI-compatible server gets the text.
    follow_up = anthropic_client.parse_request(
        {
            "model": "m",
            "max_tokens": 10,
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": content},
                {"role": "user", "content": "more"},
            ],
        }
    )
    assert anthropic_upstream.render_request(follow_up)["messages"][1]["content"] == [
        {"type": "text", "text": "Hi"}
    ]
    compat = openai_upstream.render_request(follow_up, compatible=True)["messages"][1]
    assert compat["reasoning_content"] == "r"


def test_gemini_text_signature_travels_on_the_reasoning_block_and_back():
    upstream = {
        "candidates": [
            {
                "content": {
                    "role": "model",
                    "parts": [
                        {"text": "thinking", "thought": True},
                        {"text": "Answer", "thoughtSignature": "c2ln"},
                    ],
                },
                "finishReason": "STOP",
            }
        ]
    }
    response = gemini_upstream.parse_response(upstream)
    message = openai_client.render_response(response, _request())["choices"][0]["message"]
    assert message["thinking_blocks"] == [
        {"type": "thinking", "thinking": "thinking", "signature": "c2ln"}
    ]
    follow_up = openai_client.parse_request(
        {"model": "m", "messages": [{"role": "user", "content": "q"}, message]}
    )
    parts = gemini_upstream.render_request(follow_up)["contents"][1]["parts"]
    assert parts == [{"text": "Answer", "thoughtSignature": "c2ln"}]


def test_gemini_client_pieces_of_a_thought_merge_and_urlsafe_base64_is_restored():
    body = {
        "contents": [
            {
                "role": "user",
                "parts": [{"inline_data": {"mime_type": "image/png", "data": "_-8="}}],
            },
            {
                "role": "model",
                "parts": [
                    {"text": "a ", "thought": True},
                    {"text": "b", "thought": True},
                    {"text": "", "thought": True, "thoughtSignature": "YW_-"},
                    {"text": "ok"},
                ],
            },
        ]
    }
    request = gemini_client.parse_request(body, "m")
    assert request.messages[0].parts[0].data == "/+8="
    thinking = request.messages[1].parts[0]
    assert (thinking.text, thinking.signature) == ("a b", "YW/+")
    assert len(request.messages[1].parts) == 2


def test_empty_text_in_tool_call_turn_is_not_sent_to_anthropic():
    request = openai_client.parse_request(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c", "content": "ok"},
            ],
        }
    )
    messages = anthropic_upstream.render_request(request)["messages"]
    assert messages[1]["content"] == [{"type": "tool_use", "id": "c", "name": "f", "input": {}}]


def test_system_prompts_are_never_collapsed_or_dropped():
    request = openai_client.parse_request(copy.deepcopy(OPENAI_REQUEST))
    request.seed = None  # Anthropic has no seed (a 400: tests/router/test_validation.py)
    body = anthropic_upstream.render_request(request)
    assert body["system"] == [
        {"type": "text", "text": "You are terse."},
        {"type": "text", "text": "Answer in English."},
    ]
    mid = body["messages"][-2]
    assert mid == {
        "role": "user",
        "content": [
            {"type": "text", "text": "<system>\nFrom now on, answer in French.\n</system>"}
        ],
    }
    gem = gemini_upstream.render_request(request)
    assert gem["systemInstruction"]["parts"] == [
        {"text": "You are terse."},
        {"text": "Answer in English."},
    ]
    assert "From now on" in gem["contents"][-2]["parts"][0]["text"]


def test_gemini3_history_call_without_signature_gets_the_documented_placeholder():
    body = copy.deepcopy(ANTHROPIC_REQUEST)
    del body["messages"][0]["content"][2]  # the URL image (inlined by the provider, not here)
    del body["messages"][1]["content"][:2]  # Anthropic's thinking blocks
    del body["tool_choice"]  # Gemini cannot disable parallel calls (a 400 of its own)
    request = anthropic_client.parse_request(body)
    request.model = "gemini-3-pro-preview"
    parts = gemini_upstream.render_request(request)["contents"][1]["parts"]
    calls = [p for p in parts if "functionCall" in p]
    assert calls[0]["thoughtSignature"] == gemini_upstream.SKIP_SIGNATURE
    assert "thoughtSignature" not in calls[1]
    request.model = "gemini-2.5-flash"
    parts = gemini_upstream.render_request(request)["contents"][1]["parts"]
    assert not any("thoughtSignature" in p for p in parts)


def test_tool_choice_and_thinking_mappings():
    request = openai_client.parse_request(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "tools": OPENAI_REQUEST["tools"],
            "tool_choice": "required",
            "reasoning_effort": "high",
            "temperature": 0.2,
            "max_tokens": 100,
        }
    )
    body = anthropic_upstream.render_request(request)
    assert body["tool_choice"] == {"type": "any"}
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 24576}
    assert body["max_tokens"] > 24576 and "temperature" not in body
    gem = gemini_upstream.render_request(request)
    assert gem["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    assert gem["generationConfig"]["thinkingConfig"]["thinkingBudget"] == 24576
    request.tool_choice = ir.ToolChoice("none")
    assert anthropic_upstream.render_request(request)["tool_choice"] == {"type": "none"}


def test_json_schema_maps_to_anthropic_output_config_and_gemini_schema():
    request = openai_client.parse_request(copy.deepcopy(OPENAI_REQUEST))
    request.seed = None  # Anthropic has no seed (a 400: tests/router/test_validation.py)
    assert anthropic_upstream.render_request(request)["output_config"] == {
        "format": {"type": "json_schema", "schema": WEATHER_SCHEMA}
    }
    config = gemini_upstream.render_request(request)["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert config["responseSchema"] == WEATHER_SCHEMA


def test_gemini_schema_cleaning():
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "when": {"type": "string", "format": "date-time", "default": "now"},
            "mail": {"type": "string", "format": "email"},
            "tags": {"type": "array", "items": {"$ref": "#/$defs/Tag"}},
            "note": {"type": ["string", "null"]},
            "kind": {"const": "a"},
            "n": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        },
        "required": ["when", "ghost"],
        "$defs": {
            "Tag": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"name": {"type": "string"}},
            }
        },
    }
    assert clean_schema(schema) == {
        "type": "object",
        "properties": {
            "when": {"type": "string", "format": "date-time"},
            "mail": {"type": "string"},
            "tags": {
                "type": "array",
                "items": {"type": "object", "properties": {"name": {"type": "string"}}},
            },
            "note": {"type": "string", "nullable": True},
            "kind": {"type": "string", "enum": ["a"]},
            "n": {"type": "integer", "nullable": True},
        },
        "required": ["when"],
    }


def test_usage_semantics_across_formats():
    response = anthropic_upstream.parse_response(copy.deepcopy(ANTHROPIC_RESPONSE))
    usage = openai_client.render_response(response, _request())["usage"]
    assert usage["prompt_tokens"] == 50 and usage["prompt_tokens_details"]["cached_tokens"] == 15
    meta = gemini_client.render_response(response, _request())["usageMetadata"]
    assert meta["promptTokenCount"] == 50 and meta["totalTokenCount"] == 90


def test_gemini_function_call_signature_after_thoughts_round_trips_via_anthropic():
    upstream = {
        "candidates": [
            {
                "content": {
                    "role": "model",
                    "parts": [
                        {"text": "plan", "thought": True},
                        {
                            "functionCall": {"name": "weather", "args": {}},
                            "thoughtSignature": "c2ln",
                        },
                    ],
                },
                "finishReason": "STOP",
            }
        ]
    }
    response = gemini_upstream.parse_response(upstream)
    content = anthropic_client.render_response(response, _request())["content"]
    assert content[0] == {"type": "thinking", "thinking": "plan", "signature": "c2ln"}
    call = content[1]
    follow_up = anthropic_client.parse_request(
        {
            "model": "m",
            "max_tokens": 10,
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": content},
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "x"}],
                },
            ],
        }
    )
    follow_up.model = "gemini-3-pro"
    parts = gemini_upstream.render_request(follow_up)["contents"][1]["parts"]
    assert parts == [
        {
            "functionCall": {"id": call["id"], "name": "weather", "args": {}},
            "thoughtSignature": "c2ln",
        }
    ]


def test_gemini_stream_start_carries_prompt_tokens():
    parser = gemini_upstream.StreamParser()
    first = {
        **GEMINI_STREAM[0],
        "usageMetadata": {"promptTokenCount": 40, "candidatesTokenCount": 1, "totalTokenCount": 41},
    }
    start = parser.parse_stream_event(first)[0]
    assert isinstance(start, ir.StreamStart)
    assert (start.usage.input_tokens, start.usage.output_tokens) == (40, 0)


def test_images_in_tool_results_follow_as_a_user_message_for_openai():
    request = anthropic_client.parse_request(
        {
            "model": "m",
            "max_tokens": 10,
            "messages": [
                {"role": "user", "content": "screenshot please"},
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t1", "name": "shot", "input": {}}],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t1",
                            "content": [
                                {"type": "text", "text": "done"},
                                {
                                    "type": "image",
                                    "source": {
                                        "type": "base64",
                                        "media_type": "image/png",
                                        "data": PNG,
                                    },
                                },
                            ],
                        }
                    ],
                },
            ],
        }
    )
    messages = openai_upstream.render_request(request, compatible=False)["messages"]
    assert messages[2] == {
        "role": "tool",
        "tool_call_id": "t1",
        "content": "done\n[1 attachment(s) in the next message]",
    }
    assert messages[3] == {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}],
    }
    parts = gemini_upstream.render_request(request)["contents"][2]["parts"]
    assert parts[1] == {"inlineData": {"mimeType": "image/png", "data": PNG}}


def test_openai_interleaved_parallel_call_deltas_become_sequential_parts():
    def call(index: int, arguments: str, **first: str) -> dict:
        fn = {"arguments": arguments, **({"name": first["name"]} if first else {})}
        wire = {"index": index, "function": fn}
        if first:
            wire.update(id=first["id"], type="function")
        return _chunk({"tool_calls": [wire]})

    chunks = [
        _chunk({"role": "assistant", "content": "Let me check."}),
        call(0, "", id="a", name="weather"),
        call(1, "", id="b", name="time"),
        call(0, '{"city":'),
        call(1, '{"tz":'),
        call(0, '"Paris"}'),
        call(1, '"UTC"}'),
        _chunk({}, "tool_calls"),
    ]
    events = _parse_openai_stream(chunks)
    starts = [e.index for e in events if isinstance(e, ir.PartStart)]
    assert starts == [0, 1, 2]
    # Once part 2 starts, no event refers to an earlier part.
    seen_max = 0
    for event in events:
        index = getattr(event, "index", None)
        if index is not None:
            assert index >= seen_max
            seen_max = max(seen_max, index)
    response = ir.collect_stream(events)
    calls = [(p.id, p.name, p.arguments) for p in response.parts[1:]]
    assert calls == [("a", "weather", '{"city":"Paris"}'), ("b", "time", '{"tz":"UTC"}')]
    renderer = anthropic_client.StreamRenderer(_request())
    out = [json.loads(e.data) for ev in events for e in renderer.render_stream_event(ev)]
    inputs = {}
    for event in out:
        if event["type"] == "content_block_delta" and "partial_json" in event["delta"]:
            inputs[event["index"]] = inputs.get(event["index"], "") + event["delta"]["partial_json"]
    assert inputs == {1: '{"city":"Paris"}', 2: '{"tz":"UTC"}'}


def test_reasoning_off_is_sent_only_in_the_clients_own_terms():
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    request = openai_client.parse_request({**base, "reasoning_effort": "none"})
    assert openai_upstream.render_request(request, compatible=False)["reasoning_effort"] == "none"
    assert anthropic_upstream.render_request(request)["thinking"] == {"type": "disabled"}
    assert "thinkingConfig" not in gemini_upstream.render_request(request).get(
        "generationConfig", {}
    )
    off = anthropic_client.parse_request(
        {**base, "max_tokens": 5, "thinking": {"type": "disabled"}}
    )
    assert "reasoning_effort" not in openai_upstream.render_request(off, compatible=False)
    gem = gemini_client.parse_request(
        {
            "contents": [{"parts": [{"text": "x"}]}],
            "generationConfig": {"thinkingConfig": {"thinkingBudget": 0}},
        },
        "m",
    )
    assert gemini_upstream.render_request(gem)["generationConfig"]["thinkingConfig"] == {
        "thinkingBudget": 0
    }
