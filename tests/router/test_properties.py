"""Property-based tests: generated requests in the four client formats (OpenAI Chat, OpenAI
Responses, Anthropic, Gemini), valid and mutated, sent through the router app against the
loopback fake upstream.

For every request: never a 5xx, never an ERROR log record (a traceback), and every 4xx in the
caller's own error shape. Valid requests reach each upstream type translated (every text the
client wrote arrives) and come back as a success in the caller's shape.

The profile is deterministic (derandomized, no example database) so CI runs the same examples
every time.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.sse import SSEDecoder
from tests.router.helpers import Answer, FakeUpstream, gemini_text

PROFILE = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

MODELS = ("gpt", "claude", "gemini")
OPENAI, RESPONSES, ANTHROPIC, GEMINI = "openai", "responses", "anthropic", "gemini"

# Unicode text, never empty or blank (Anthropic and Gemini refuse empty text).
TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=24).filter(str.strip)


# ---- valid requests ---------------------------------------------------------------------------


def turns(draw: st.DrawFn) -> list[tuple[str, str]]:
    """Alternating user/assistant turns ending with the user: (role, text) pairs."""
    count = draw(st.integers(0, 2))
    pairs = []
    for _ in range(count):
        pairs += [("user", draw(TEXT)), ("assistant", draw(TEXT))]
    return [*pairs, ("user", draw(TEXT))]


@dataclass
class ToolRound:
    """An answered tool call, placed before the last user turn."""

    name: str
    call_id: str
    args: dict
    # Never valid JSON on its own ("r:" first), so it reaches every upstream as text.
    result: str


def tool_round(draw: st.DrawFn) -> ToolRound | None:
    if not draw(st.booleans()):
        return None
    key = st.text("abcdefgh", min_size=1, max_size=5)
    return ToolRound(
        name=draw(st.sampled_from(["lookup", "get_weather"])),
        call_id=f"call_{draw(st.integers(0, 10**6))}",
        args=draw(st.dictionaries(key, st.integers() | TEXT, max_size=2)),
        result="r:" + draw(TEXT),
    )


def sampling(draw: st.DrawFn, temperature_max: float) -> dict[str, object]:
    """Portable sampling options, under their IR names."""
    options: dict[str, object] = {}
    if draw(st.booleans()):
        options["temperature"] = draw(st.floats(0, temperature_max))
    if draw(st.booleans()):
        options["top_p"] = draw(st.floats(0, 1))
    if draw(st.booleans()):
        options["max_tokens"] = draw(st.integers(1, 100_000))
    if draw(st.booleans()):
        options["stop"] = draw(st.lists(TEXT, min_size=1, max_size=3))
    return options


@st.composite
def openai_request(draw: st.DrawFn) -> tuple[str, dict, list[str]]:
    model = draw(st.sampled_from(MODELS))
    conversation = turns(draw)
    system = draw(st.none() | TEXT)
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": role, "content": text} for role, text in conversation]
    body: dict = {"model": model, "messages": messages, **sampling(draw, 2)}
    tool = tool_round(draw)
    if tool:
        call = {"name": tool.name, "arguments": json.dumps(tool.args)}
        messages[-1:-1] = [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": tool.call_id, "type": "function", "function": call}],
            },
            {"role": "tool", "tool_call_id": tool.call_id, "content": tool.result},
        ]
        body["tools"] = [{"type": "function", "function": {"name": tool.name}}]
    if model == "gpt" and draw(st.booleans()):
        # OpenAI-only options travel to the OpenAI upstream.
        body |= {"seed": draw(st.integers(0, 2**31)), "logprobs": True, "top_logprobs": 2}
        body |= {"n": draw(st.integers(1, 3)), "store": False, "user": draw(TEXT)}
    texts = [text for _, text in conversation] + ([system] if system else [])
    return OPENAI, body, texts + ([tool.result] if tool else [])


@st.composite
def responses_request(draw: st.DrawFn) -> tuple[str, dict, list[str]]:
    conversation = turns(draw)
    body: dict = {
        "model": draw(st.sampled_from(MODELS)),
        "input": [{"role": role, "content": text} for role, text in conversation],
    }
    options = sampling(draw, 2)
    for name in ("temperature", "top_p"):
        if name in options:
            body[name] = options[name]
    if "max_tokens" in options:
        body["max_output_tokens"] = options["max_tokens"]
    instructions = draw(st.none() | TEXT)
    if instructions:
        body["instructions"] = instructions
    tool = tool_round(draw)
    if tool:
        arguments = json.dumps(tool.args)
        body["input"][-1:-1] = [
            {"type": "function_call", "call_id": tool.call_id, "name": tool.name}
            | {"arguments": arguments},
            {"type": "function_call_output", "call_id": tool.call_id, "output": tool.result},
        ]
        body["tools"] = [{"type": "function", "name": tool.name, "parameters": {}}]
    texts = [text for _, text in conversation] + ([instructions] if instructions else [])
    return RESPONSES, body, texts + ([tool.result] if tool else [])


@st.composite
def anthropic_request(draw: st.DrawFn) -> tuple[str, dict, list[str]]:
    conversation = turns(draw)
    body: dict = {
        "model": draw(st.sampled_from(MODELS)),
        "max_tokens": draw(st.integers(1, 100_000)),
        "messages": [{"role": role, "content": text} for role, text in conversation],
    }
    for message in body["messages"]:
        if draw(st.booleans()):
            message["content"] = [{"type": "text", "text": message["content"]}]
    options = sampling(draw, 1)
    for name in ("temperature", "top_p"):
        if name in options:
            body[name] = options[name]
    if "stop" in options:
        body["stop_sequences"] = options["stop"]
    system = draw(st.none() | TEXT)
    if system:
        body["system"] = system
    tool = tool_round(draw)
    if tool:
        use = {"type": "tool_use", "id": tool.call_id, "name": tool.name, "input": tool.args}
        result = {"type": "tool_result", "tool_use_id": tool.call_id, "content": tool.result}
        body["messages"][-1:-1] = [
            {"role": "assistant", "content": [use]},
            {"role": "user", "content": [result]},
        ]
        body["tools"] = [{"name": tool.name, "input_schema": {"type": "object"}}]
    texts = [text for _, text in conversation] + ([system] if system else [])
    return ANTHROPIC, body, texts + ([tool.result] if tool else [])


@st.composite
def gemini_request(draw: st.DrawFn) -> tuple[str, dict, list[str]]:
    conversation = turns(draw)
    roles = {"user": "user", "assistant": "model"}
    body: dict = {
        "contents": [
            {"role": roles[role], "parts": [{"text": text}]} for role, text in conversation
        ],
    }
    options = sampling(draw, 2)
    names = {"temperature": "temperature", "top_p": "topP", "max_tokens": "maxOutputTokens"}
    config = {names[k]: v for k, v in options.items() if k in names}
    if "stop" in options:
        config["stopSequences"] = options["stop"]
    if config:
        body["generationConfig"] = config
    system = draw(st.none() | TEXT)
    if system:
        body["systemInstruction"] = {"parts": [{"text": system}]}
    tool = tool_round(draw)
    if tool:
        call = {"functionCall": {"name": tool.name, "args": tool.args}}
        answer = {"functionResponse": {"name": tool.name, "response": {"output": tool.result}}}
        body["contents"][-1:-1] = [
            {"role": "model", "parts": [call]},
            {"role": "user", "parts": [answer]},
        ]
        body["tools"] = [{"functionDeclarations": [{"name": tool.name}]}]
    body["model"] = draw(st.sampled_from(MODELS))  # moved into the path by `send`
    texts = [text for _, text in conversation] + ([system] if system else [])
    return GEMINI, body, texts + ([tool.result] if tool else [])


VALID = openai_request() | responses_request() | anthropic_request() | gemini_request()


# ---- mutations --------------------------------------------------------------------------------

ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1e308, -1e308, 5e-324, 2**63, -(2**63)]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(codec="utf-8"), max_size=12),
    st.just([]),
    st.just({}),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def paths(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside a JSON document."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            found += paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            found += paths(child, (*prefix, i))
    return found


@st.composite
def mutated_request(draw: st.DrawFn) -> tuple[str, bytes, str]:
    """A valid request with one thing broken, as raw bytes (some breakages are not JSON)."""
    kind, body, _ = draw(VALID)
    model = body["model"]
    if kind != GEMINI and model != "gemini" and draw(st.booleans()):
        # (The fake answers Gemini streams only when told to.)
        body["stream"] = True
    targets = [p for p in paths(body) if p != ("model",)]
    path = draw(st.sampled_from(targets))
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    action = draw(st.sampled_from(["replace", "delete", "deep", "nan", "extra"]))
    raw_value = None
    if action == "replace":
        parent[path[-1]] = draw(ODD_VALUES)
    elif action == "delete":
        del parent[path[-1]]
    elif action == "deep":
        # Written as text: json.dumps itself gives up near 1,000 levels.
        depth = draw(st.integers(60, 5_000))
        raw_value = "[" * depth + "]" * depth
        parent[path[-1]] = "__RAW__"
    elif action == "nan":
        raw_value = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999"]))
        parent[path[-1]] = "__RAW__"
    else:
        name = draw(st.sampled_from(["n", "temperature", "top_k", "max_tokens", "contents"]))
        body[name] = draw(ODD_VALUES)
    body["model"] = model
    text = json.dumps(body)
    if raw_value is not None:
        text = text.replace('"__RAW__"', raw_value)
    return kind, text.encode(), model


# ---- sending and checking ---------------------------------------------------------------------

PATHS = {OPENAI: "/v1/chat/completions", RESPONSES: "/v1/responses", ANTHROPIC: "/v1/messages"}


def endpoint(kind: str, model: str, stream: bool = False) -> str:
    if kind == GEMINI:
        method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        return f"/v1beta/models/{model}:{method}"
    return PATHS[kind]


def check_stream(kind: str, raw: bytes) -> None:
    """A complete stream in the caller's grammar, carrying the fake's answer."""
    decoder = SSEDecoder()
    events = decoder.feed(raw) + decoder.flush()
    data = [e.data if e.data == "[DONE]" else json.loads(e.data) for e in events]
    if kind == OPENAI:
        assert data[-1] == "[DONE]", data
        text = "".join(d["choices"][0]["delta"].get("content") or "" for d in data[:-1])
    elif kind == RESPONSES:
        assert data[-1]["type"] == "response.completed", data
        text = data[-1]["response"]["output"][0]["content"][0]["text"]
    elif kind == ANTHROPIC:
        assert data[-1]["type"] == "message_stop", data
        text = "".join(d["delta"].get("text", "") for d in data if "delta" in d)
    else:
        assert data[-1]["candidates"][0]["finishReason"] == "STOP", data
        text = "".join(
            p.get("text", "")
            for d in data
            for p in d["candidates"][0].get("content", {}).get("parts", [])
        )
    assert text == "hello", data


def check_error_shape(kind: str, body: dict) -> None:
    """A 4xx body in the caller's own error shape."""
    if kind == ANTHROPIC:
        assert body["type"] == "error", body
        assert isinstance(body["error"]["type"], str) and body["error"]["message"], body
    elif kind == GEMINI:
        error = body["error"]
        assert isinstance(error["code"], int) and error["message"], body
        assert isinstance(error["status"], str), body
    else:
        error = body["error"]
        assert error["message"] and isinstance(error["type"], str), body
        assert "param" in error and "code" in error, body


def check_success_shape(kind: str, body: dict) -> None:
    """A success in the caller's shape, carrying the fake's answer."""
    if kind == OPENAI:
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == "hello"
    elif kind == RESPONSES:
        assert body["object"] == "response"
        assert body["output"][0]["content"][0]["text"] == "hello"
    elif kind == ANTHROPIC:
        assert body["type"] == "message"
        assert body["content"] == [{"type": "text", "text": "hello"}]
    else:
        assert body["candidates"][0]["content"]["parts"] == [{"text": "hello"}]


def strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


@PROFILE
@given(request=VALID, stream=st.booleans())
async def test_valid_requests_translate_and_round_trip(
    client, fake: FakeUpstream, caplog, request, stream
):
    kind, body, texts = request
    model = body.pop("model") if kind == GEMINI else body["model"]
    if stream and kind != GEMINI:
        body["stream"] = True
        body.pop("n", None)  # a stream carries one answer
    if stream and model == "gemini":
        # The fake answers Gemini streams only when told to.
        fake.queue("gemini", Answer(events=[(None, gemini_text("hello"))]))
    caplog.clear()
    seen_before = len(fake.seen)
    with caplog.at_level(logging.INFO):
        resp = await client.post(endpoint(kind, model, stream), json=body)
        raw = await resp.read()
    assert resp.status == 200, raw
    if stream:
        check_stream(kind, raw)
    else:
        check_success_shape(kind, json.loads(raw))
    # The request reached the upstream translated: every text the client wrote is there.
    [seen] = fake.seen[seen_before:]
    sent = strings(seen.body)
    for text in texts:
        assert any(text in s for s in sent), (text, seen.body)
    for name in ("temperature", "top_p"):
        value = body.get(name, body.get("generationConfig", {}).get(name))
        if value is not None and model != "claude":
            assert any(
                isinstance(v, float | int) and math.isclose(v, value) for v in _numbers(seen.body)
            ), (name, seen.body)
    no_errors_logged(caplog)


def _numbers(value: object) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [value]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


@PROFILE
@given(request=mutated_request())
async def test_mutated_requests_are_never_5xx_and_errors_keep_the_callers_shape(
    client, fake: FakeUpstream, caplog, request
):
    kind, raw, model = request
    caplog.clear()
    seen_before = len(fake.seen)
    with caplog.at_level(logging.INFO):
        resp = await client.post(
            endpoint(kind, model if isinstance(model, str) else "gpt"),
            data=raw,
            headers={"Content-Type": "application/json"},
        )
        answer = await resp.read()
    assert resp.status < 500, answer
    if resp.status >= 400:
        check_error_shape(kind, json.loads(answer))
    # What reached the upstream is strict JSON (no NaN or Infinity).
    for seen in fake.seen[seen_before:]:
        json.dumps(seen.body, allow_nan=False)
    no_errors_logged(caplog)
