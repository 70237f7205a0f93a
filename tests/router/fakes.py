"""Fake OpenAI, Anthropic and Gemini providers served by aiohttp on loopback.

Each fake validates every request against its provider's request schema, built from the
official SDK's own types, checks the provider's auth headers, records the exchange, and answers
with the payload or stream the provider documents. What it answers is chosen by a scenario
marker (``scenario:<name>``) found in the user text, so the same test sent through any client
format drives the same upstream behaviour:

- ``text``: a plain text answer.
- ``image``: the request must carry an image; the fake records the decoded bytes (or the URL
  where the provider takes URLs). The OpenAI fake also serves the image at ``/red.png``.
- ``tool``: one call of ``get_weather``.
- ``parallel``: two calls (``get_weather`` and ``get_time``); when the request ends with the
  tool results, the fake records them and answers with text.
- ``parallel-same``: two calls of the same function (``get_weather`` for Paris and Tokyo), so
  results can only be matched by call id or position, never by name.
- ``parallel-interleaved``: as ``parallel``, but the OpenAI fake streams the two calls'
  argument deltas interleaved (index 0, 1, 0, 1, ...), as some compatible servers do.
- ``truncated``: text cut by the token limit (``length`` / ``max_tokens`` / ``MAX_TOKENS``).
- ``reasoning``: a reasoning block (Anthropic ``thinking`` with a signature, Gemini
  ``thought: true`` part with a ``thoughtSignature``, OpenAI-compatible ``reasoning_content``)
  before the text.
- ``reasoning-tool``: a reasoning block and then a ``get_weather`` call (Gemini puts the
  ``thoughtSignature`` on the functionCall part, as Gemini 3 does); the results turn must bring
  the reasoning signature back with the call.
- ``followup``: a plain text answer; used as the next turn after ``reasoning``.
- ``midstream-error``: a stream that sends some text and then the provider's in-stream error
  event (OpenAI ``{"error": ...}`` data, Anthropic ``event: error`` overloaded_error, Gemini an
  ``{"error": ...}`` chunk); a non-streaming request gets a 500.
- ``slow``: a text stream of about 3 s (many pieces 50 ms apart), to walk away from.
- ``error-400``, ``error-401``, ``error-429``, ``error-500``: the provider's own error body.

Tests can also make the next requests fail whatever their scenario (``FakeProvider.fail_next``),
and read ``FakeProvider.disconnects``: streams whose reader went away before the end.

Invalid requests get the provider's 400 shape and are kept in ``FakeProvider.problems`` so a test
fixture can fail loudly.
"""

from __future__ import annotations

import asyncio
import base64
import collections.abc
import functools
import json
import re
import time
import types
import typing
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx2
import openai
import pydantic
import typing_extensions
from aiohttp import ClientSession, web
from anthropic.types import message_count_tokens_params, message_create_params
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types
from openai.types.chat import completion_create_params

from tests.router import grammar

SCENARIO_RE = re.compile(r"scenario:([a-z0-9-]+)")

# A 1x1 red PNG: the image scenario sends these bytes and asserts they arrive intact.
RED_PIXEL_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)

TEXT_ANSWER = "Hello from the fake upstream, all good."
IMAGE_ANSWER = "I see one red pixel."
PARALLEL_ANSWER = "Paris is sunny and it is 09:00 in Tokyo."
REASONING_TEXT = "The user asks 2+2.\nAdding gives 4."
REASONING_ANSWER = "2 + 2 = 4."
REASONING_TOOL_ANSWER = "It is sunny in Paris."
FOLLOWUP_ANSWER = "Follow-up answered."
# Real signatures are opaque base64 strings; keep them canonical base64 so clients that decode
# them (google-genai turns thoughtSignature into bytes) round-trip them unchanged.
# The bytes are chosen so that standard base64 contains "+" and "/": google-genai re-encodes
# bytes URL-safe, so a router that passes its string through unchanged alters the signature.
ANTHROPIC_SIGNATURE = base64.b64encode(b"anthropic-sig-\xfb\xff\xbf\xfb\xef-opaque").decode()
GEMINI_SIGNATURE = base64.b64encode(b"gemini-thought-sig-\xfb\xff\xbf\xfe").decode()

WEATHER_ARGS = {"city": "Paris", "unit": "celsius"}
TOKYO_ARGS = {"city": "Tokyo", "unit": "celsius"}
TIME_ARGS = {"timezone": "Asia/Tokyo"}
WEATHER_RESULT = "sunny, 21C"
TOKYO_RESULT = "rainy, 12C"
TIME_RESULT = "09:00"
TRUNCATED_ANSWER = "The answer is cut"

INPUT_TOKENS = 123
OUTPUT_TOKENS = 45
REASONING_TOKENS = 17

SLOW_PIECES = 60
SLOW_TEXT = " ".join(f"w{i}" for i in range(SLOW_PIECES))

ERROR_STATUSES = {"error-400": 400, "error-401": 401, "error-429": 429, "error-500": 500}
ERROR_MESSAGE = "fake upstream says no"
# Sent with every 429 (Retry-After header; Gemini's RetryInfo detail).
RETRY_AFTER_S = 7


@dataclass
class ToolCall:
    """A tool call the fake emits; ``id`` is empty where the provider sends none (Gemini)."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass
class Reply:
    """What a fake answers, independent of the wire format."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    input_tokens: int = INPUT_TOKENS
    output_tokens: int = OUTPUT_TOKENS
    reasoning_tokens: int = 0
    # Streams send this many text pieces and then the provider's in-stream error event.
    fail_after: int | None = None
    # The token limit cut the answer.
    truncated: bool = False
    # The OpenAI fake interleaves the argument deltas of parallel tool calls.
    interleave: bool = False
    # Streams send the text in SLOW_PIECES pieces, 50 ms apart.
    slow: bool = False

    @property
    def parts(self) -> int:
        return SLOW_PIECES if self.slow else 3

    async def pace(self) -> None:
        if self.slow:
            await asyncio.sleep(0.05)


@dataclass
class ToolResult:
    """A tool result as it reached the fake: the call it answers (id and/or name) and its text."""

    call_id: str
    name: str
    content: str


@dataclass
class Seen:
    """The parts of a request that tests assert on, parsed from the provider's wire format."""

    scenario: str = ""
    user_texts: list[str] = field(default_factory=list)
    system: str = ""
    images: list[bytes] = field(default_factory=list)
    image_urls: list[str] = field(default_factory=list)
    tool_names: list[str] = field(default_factory=list)
    assistant_tool_calls: list[ToolCall] = field(default_factory=list)
    tool_results: list[ToolResult] = field(default_factory=list)
    reasoning_texts: list[str] = field(default_factory=list)
    signatures: list[str] = field(default_factory=list)
    # Names of the functionCall parts that carry a thoughtSignature (Gemini).
    signed_calls: list[str] = field(default_factory=list)
    ends_with_tool_results: bool = False
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Exchange:
    """One request a fake received."""

    path: str
    key: str
    body: dict[str, Any]
    seen: Seen
    reply: Reply | int


class FakeProvider:
    """Shared plumbing of the three fakes: routing, auth, logging, scenario choice."""

    name = ""

    def __init__(self, keys: list[str], provider_ids: dict[str, str]) -> None:
        self.keys = keys
        self.ids = provider_ids
        self.exchanges: list[Exchange] = []
        self.problems: list[str] = []
        self.failures: list[int] = []
        self.stream_failures = 0
        self.disconnects = 0

    def reset(self) -> None:
        self.exchanges.clear()
        self.problems.clear()
        self.failures.clear()
        self.stream_failures = 0
        self.disconnects = 0

    def fail_next(self, *statuses: int) -> None:
        """Answers the next requests with these error statuses, whatever their scenario."""
        self.failures.extend(statuses)

    def fail_stream_next(self, count: int) -> None:
        """Answers the next ``count`` streams with HTTP 200 and then, before any content, the
        provider's in-stream error event (Anthropic's overloaded_error after message_start)."""
        self.stream_failures += count

    async def streamed(self, stream: typing.Awaitable[web.StreamResponse]) -> web.StreamResponse:
        """Runs a stream writer, counting readers that went away before its end."""
        try:
            return await stream
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            raise

    @property
    def last(self) -> Exchange:
        assert self.exchanges, f"fake {self.name} received no request"
        return self.exchanges[-1]

    def plan(self, seen: Seen) -> Reply | int:
        """Picks the reply (or the error status) for a parsed request."""
        if self.failures:
            return self.failures.pop(0)
        if self.stream_failures and seen.stream:
            self.stream_failures -= 1
            return Reply(text=TEXT_ANSWER, fail_after=0)
        if seen.scenario == "slow":
            return Reply(text=SLOW_TEXT, slow=True)
        if seen.scenario in ERROR_STATUSES:
            return ERROR_STATUSES[seen.scenario]
        if seen.scenario == "image":
            if RED_PIXEL_PNG not in seen.images and not seen.image_urls:
                self.problems.append(f"{self.name}: image scenario but no image arrived")
            return Reply(text=IMAGE_ANSWER)
        if seen.scenario == "tool":
            if seen.ends_with_tool_results:
                return Reply(text=PARALLEL_ANSWER)
            return Reply(tool_calls=[self._call(0, "get_weather", WEATHER_ARGS)])
        if seen.scenario in ("parallel", "parallel-same", "parallel-interleaved"):
            if seen.ends_with_tool_results:
                return Reply(text=PARALLEL_ANSWER)
            second = (
                self._call(1, "get_weather", TOKYO_ARGS)
                if seen.scenario == "parallel-same"
                else self._call(1, "get_time", TIME_ARGS)
            )
            return Reply(
                tool_calls=[self._call(0, "get_weather", WEATHER_ARGS), second],
                interleave=seen.scenario == "parallel-interleaved",
            )
        if seen.scenario == "truncated":
            return Reply(text=TRUNCATED_ANSWER, truncated=True)
        if seen.scenario == "reasoning":
            return Reply(
                text=REASONING_ANSWER, reasoning=REASONING_TEXT, reasoning_tokens=REASONING_TOKENS
            )
        if seen.scenario == "reasoning-tool":
            if seen.ends_with_tool_results:
                return Reply(text=REASONING_TOOL_ANSWER)
            return Reply(
                reasoning=REASONING_TEXT,
                tool_calls=[self._call(0, "get_weather", WEATHER_ARGS)],
                reasoning_tokens=REASONING_TOKENS,
            )
        if seen.scenario == "followup":
            return Reply(text=FOLLOWUP_ANSWER)
        if seen.scenario == "midstream-error":
            return Reply(text=TEXT_ANSWER, fail_after=1) if seen.stream else 500
        return Reply(text=TEXT_ANSWER)

    def _call(self, index: int, name: str, args: dict[str, Any]) -> ToolCall:
        prefix = self.ids.get("tool_call", "")
        return ToolCall(id=f"{prefix}{index}x{name}" if prefix else "", name=name, arguments=args)

    def answer(
        self, request: web.Request, key: str, body: dict[str, Any], seen: Seen
    ) -> Reply | int:
        """Records the exchange and returns what to answer (a reply or an error status)."""
        reply = self.plan(seen)
        self.exchanges.append(Exchange(request.path_qs, key, body, seen, reply))
        return reply

    def invalid(self, message: str) -> web.Response:
        self.problems.append(f"{self.name}: {message}")
        return self.error_response(400, message)

    def error_response(self, status: int, message: str) -> web.Response:
        raise NotImplementedError

    def app(self) -> web.Application:
        raise NotImplementedError


def scenario_of(texts: list[str]) -> str:
    """Returns the last ``scenario:<name>`` marker in ``texts`` ('' when none)."""
    found = [m for t in texts for m in SCENARIO_RE.findall(t)]
    return found[-1] if found else ""


def split_text(text: str, parts: int = 3) -> list[str]:
    """Splits text into ``parts`` non-empty pieces so streams carry several deltas."""
    step = max(1, len(text) // parts)
    pieces = [text[i : i + step] for i in range(0, len(text), step)]
    return pieces


def sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    """Encodes one server-sent event."""
    payload = data if isinstance(data, str) else json.dumps(data)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


async def start_sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(
        status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    return resp


# ---------------------------------------------------------------------------------------------
# Strict schema checks over the SDKs' TypedDict request params.
#
# pydantic validates TypedDicts but ignores unknown keys and validates ``Iterable[...]`` fields
# lazily, while real providers reject unknown fields ("Extra inputs are not permitted").
# ``unknown_keys`` walks the same annotations and reports keys that no matching TypedDict
# declares.
# ---------------------------------------------------------------------------------------------


def _strip(tp: Any) -> Any:
    while True:
        origin = typing.get_origin(tp)
        if origin in (typing.Annotated, typing.Required, typing.NotRequired) or (
            origin is not None
            and getattr(origin, "__name__", "") in ("Required", "NotRequired", "Annotated")
        ):
            tp = typing.get_args(tp)[0]
            continue
        return tp


def _hints(td: type) -> dict[str, Any]:
    return typing.get_type_hints(td, include_extras=True)


def _literal_mismatch(value: dict[str, Any], td: type) -> bool:
    for key, ann in _hints(td).items():
        ann = _strip(ann)
        if typing.get_origin(ann) is typing.Literal:
            if key in value and value[key] not in typing.get_args(ann):
                return True
            if key not in value and key in getattr(td, "__required_keys__", ()):
                return True
    return False


def unknown_keys(value: Any, tp: Any, path: str, allowed_extra: set[str]) -> list[str]:
    """Lists ``path.key`` for every key in ``value`` that its TypedDict type does not declare.

    Args:
        value: the decoded JSON value.
        tp: the annotation it must match (TypedDict, Union, Iterable, ...).
        path: where ``value`` sits, for the message.
        allowed_extra: dotted key names (``messages.reasoning_content``) tolerated anyway.
    """
    tp = _strip(tp)
    origin = typing.get_origin(tp)
    if typing_extensions.is_typeddict(tp):
        if not isinstance(value, dict):
            return []
        hints = _hints(tp)
        bad = []
        for key, item in value.items():
            dotted = re.sub(r"\[\d+\]", "", f"{path}.{key}").lstrip(".")
            if key not in hints:
                if dotted not in allowed_extra:
                    bad.append(f"{path}.{key}".lstrip("."))
                continue
            bad += unknown_keys(item, hints[key], f"{path}.{key}", allowed_extra)
        return bad
    if origin in (typing.Union, types.UnionType):
        members = [_strip(a) for a in typing.get_args(tp)]
        if isinstance(value, dict):
            tds = [m for m in members if typing_extensions.is_typeddict(m)]
            free_form = any(
                typing.get_origin(m) in (dict, collections.abc.Mapping) for m in members
            )
            if not tds or free_form:
                return []
            fitting = [m for m in tds if not _literal_mismatch(value, m)] or tds
            results = [unknown_keys(value, m, path, allowed_extra) for m in fitting]
            return min(results, key=len)
        if isinstance(value, list):
            seqs = [m for m in members if typing.get_origin(m) is not None and typing.get_args(m)]
            for m in seqs:
                if typing.get_origin(m) in (dict, collections.abc.Mapping):
                    continue
                return unknown_keys(value, m, path, allowed_extra)
        return []
    if origin is not None and isinstance(value, list):
        args = typing.get_args(tp)
        if args and origin not in (dict, collections.abc.Mapping):
            bad = []
            for i, item in enumerate(value):
                bad += unknown_keys(item, args[0], f"{path}[{i}]", allowed_extra)
            return bad
    return []


def _drain(value: Any) -> Any:
    """Forces pydantic's lazy ``Iterable`` validators to run, returning plain containers."""
    if isinstance(value, dict):
        return {k: _drain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or isinstance(value, collections.abc.Iterator):
        return [_drain(v) for v in value]
    return value


@functools.cache
def _adapter(tp: Any) -> pydantic.TypeAdapter:
    # Kept alive: pydantic's lazy iterators must not outlive the adapter that made them.
    return pydantic.TypeAdapter(tp)


def check_typed(body: dict[str, Any], tp: Any, allowed_extra: set[str]) -> str:
    """Validates ``body`` against an SDK TypedDict strictly; returns '' or an error message."""
    try:
        _drain(_adapter(tp).validate_python(body))
    except pydantic.ValidationError as err:
        return str(err)
    bad = unknown_keys(body, tp, "", allowed_extra)
    return f"unknown fields: {', '.join(bad)}" if bad else ""


def b64decode_any(text: str) -> bytes:
    """Decodes standard or URL-safe base64, padded or not (Google accepts all four)."""
    text = text.replace("-", "+").replace("_", "/")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _data_url_bytes(url: str) -> bytes | None:
    match = re.match(r"data:[\w/+.-]+;base64,(.*)", url, re.S)
    return b64decode_any(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------
# OpenAI (and OpenAI-compatible servers: reasoning_content as vLLM/DeepSeek send it)
# ---------------------------------------------------------------------------------------------

OPENAI_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    429: ("rate_limit_exceeded", "rate_limit_exceeded"),
    500: ("server_error", None),
}


class FakeOpenAI(FakeProvider):
    """``POST /v1/chat/completions`` as OpenAI (and OpenAI-compatible servers) serve it."""

    name = "openai"
    # OpenAI-compatible reasoning servers accept their own reasoning field back.
    allowed_extra = {"messages.reasoning_content"}

    def __init__(self, keys: list[str]) -> None:
        super().__init__(keys, {"tool_call": "call_oai"})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/red.png", self.image)
        return app

    @staticmethod
    async def image(request: web.Request) -> web.Response:
        return web.Response(body=RED_PIXEL_PNG, content_type="image/png")

    def error_response(self, status: int, message: str) -> web.Response:
        kind, code = OPENAI_ERROR_TYPES.get(status, ("server_error", None))
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        headers = {"retry-after": str(RETRY_AFTER_S)} if status == 429 else {}
        return web.json_response(body, status=status, headers=headers)

    def parse(self, body: dict[str, Any]) -> Seen:
        seen = Seen(stream=bool(body.get("stream")), max_tokens=body.get("max_tokens"))
        seen.max_tokens = body.get("max_completion_tokens", seen.max_tokens)
        seen.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        seen.temperature = body.get("temperature")
        stop = body.get("stop") or []
        seen.stop = [stop] if isinstance(stop, str) else list(stop)
        seen.tool_names = [t["function"]["name"] for t in body.get("tools", [])]
        names_by_id: dict[str, str] = {}
        for msg in body["messages"]:
            content = msg.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            texts = [p["text"] for p in parts or [] if p.get("type") == "text"]
            if msg["role"] in ("system", "developer"):
                seen.system += "".join(texts)
            elif msg["role"] == "user":
                seen.user_texts += texts
                for p in parts or []:
                    if p.get("type") == "image_url":
                        url = p["image_url"]["url"]
                        data = _data_url_bytes(url)
                        if data is None:
                            seen.image_urls.append(url)
                        else:
                            seen.images.append(data)
            elif msg["role"] == "assistant":
                if msg.get("reasoning_content"):
                    seen.reasoning_texts.append(msg["reasoning_content"])
                for tc in msg.get("tool_calls") or []:
                    args = json.loads(tc["function"]["arguments"] or "{}")
                    seen.assistant_tool_calls.append(
                        ToolCall(tc["id"], tc["function"]["name"], args)
                    )
                    names_by_id[tc["id"]] = tc["function"]["name"]
            elif msg["role"] == "tool":
                text = "".join(texts)
                seen.tool_results.append(
                    ToolResult(msg["tool_call_id"], names_by_id.get(msg["tool_call_id"], ""), text)
                )
        seen.ends_with_tool_results = body["messages"][-1]["role"] == "tool"
        seen.scenario = scenario_of(seen.user_texts)
        return seen

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        key = auth.removeprefix("Bearer ")
        if not auth.startswith("Bearer ") or key not in self.keys:
            return self.error_response(401, f"Incorrect API key provided: {key[:8]}...")
        body = await request.json()
        tp = (
            completion_create_params.CompletionCreateParamsStreaming
            if body.get("stream")
            else completion_create_params.CompletionCreateParamsNonStreaming
        )
        problem = check_typed(body, tp, self.allowed_extra)
        if problem:
            return self.invalid(f"invalid chat.completions request: {problem}")
        seen = self.parse(body)
        plan = self.answer(request, key, body, seen)
        if isinstance(plan, int):
            return self.error_response(plan, ERROR_MESSAGE)
        if seen.stream:
            return await self.streamed(
                self.stream(request, body["model"], plan, seen.include_usage)
            )
        return web.json_response(self.completion(body["model"], plan))

    @staticmethod
    def usage(reply: Reply) -> dict[str, Any]:
        return {
            "prompt_tokens": reply.input_tokens,
            "completion_tokens": reply.output_tokens,
            "total_tokens": reply.input_tokens + reply.output_tokens,
            "completion_tokens_details": {"reasoning_tokens": reply.reasoning_tokens},
        }

    @staticmethod
    def finish_reason(reply: Reply) -> str:
        if reply.truncated:
            return "length"
        return "tool_calls" if reply.tool_calls else "stop"

    def completion(self, model: str, reply: Reply) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": reply.text or None}
        message["refusal"] = None
        if reply.reasoning:
            message["reasoning_content"] = reply.reasoning
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": tc.id,
                    "type": "function",
                    "function": {"name": tc.name, "arguments": json.dumps(tc.arguments)},
                }
                for tc in reply.tool_calls
            ]
        return {
            "id": "chatcmpl-fake0001",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": self.finish_reason(reply),
                }
            ],
            "usage": self.usage(reply),
        }

    async def stream(
        self, request: web.Request, model: str, reply: Reply, include_usage: bool
    ) -> web.StreamResponse:
        resp = await start_sse(request)
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
            out = {
                "id": "chatcmpl-fake0002",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            if include_usage:
                out["usage"] = None
            out.update(extra)
            return out

        await resp.write(sse(chunk({"role": "assistant", "content": ""})))
        for piece in split_text(reply.reasoning) if reply.reasoning else []:
            await resp.write(sse(chunk({"reasoning_content": piece})))
        for i, piece in enumerate(split_text(reply.text, reply.parts) if reply.text else []):
            if reply.fail_after == i:
                error = {"message": ERROR_MESSAGE, "type": "server_error", "param": None}
                await resp.write(sse({"error": {**error, "code": None}}))
                await resp.write_eof()
                return resp
            await resp.write(sse(chunk({"content": piece})))
            await reply.pace()
        deltas: list[tuple[int, int, dict[str, Any]]] = []  # (position, index, delta)
        for index, tc in enumerate(reply.tool_calls):
            first = {
                "index": index,
                "id": tc.id,
                "type": "function",
                "function": {"name": tc.name, "arguments": ""},
            }
            deltas.append((0, index, first))
            for position, piece in enumerate(split_text(json.dumps(tc.arguments)), start=1):
                deltas.append((position, index, {"index": index, "function": {"arguments": piece}}))
        if reply.interleave:
            deltas.sort(key=lambda d: d[0])
        for _, _, delta in deltas:
            await resp.write(sse(chunk({"tool_calls": [delta]})))
        await resp.write(sse(chunk({}, self.finish_reason(reply))))
        if include_usage:
            final = chunk({}, usage=self.usage(reply))
            final["choices"] = []
            await resp.write(sse(final))
        await resp.write(sse("[DONE]"))
        await resp.write_eof()
        return resp


# ---------------------------------------------------------------------------------------------
# Anthropic
# ---------------------------------------------------------------------------------------------

ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


class FakeAnthropic(FakeProvider):
    """``POST /v1/messages`` as Anthropic serves it."""

    name = "anthropic"

    def __init__(self, keys: list[str]) -> None:
        super().__init__(keys, {"tool_call": "toolu_01fake"})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        return app

    async def count_tokens(self, request: web.Request) -> web.Response:
        """Answers every valid count with ``INPUT_TOKENS``."""
        key = request.headers.get("x-api-key") or request.headers.get(
            "Authorization", ""
        ).removeprefix("Bearer ")
        if key not in self.keys:
            return self.error_response(401, "invalid x-api-key")
        body = await request.json()
        problem = check_typed(body, message_count_tokens_params.MessageCountTokensParams, set())
        if problem:
            return self.invalid(f"count_tokens: {problem}")
        self.exchanges.append(Exchange(request.path_qs, key, body, self.parse(body), 0))
        return web.json_response({"input_tokens": INPUT_TOKENS})

    def error_response(self, status: int, message: str) -> web.Response:
        kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error")
        body = {"type": "error", "error": {"type": kind, "message": message}}
        headers = {"request-id": "req_fake"}
        if status == 429:
            headers["retry-after"] = str(RETRY_AFTER_S)
        return web.json_response(body, status=status, headers=headers)

    def parse(self, body: dict[str, Any]) -> Seen:
        seen = Seen(stream=bool(body.get("stream")), max_tokens=body.get("max_tokens"))
        seen.temperature = body.get("temperature")
        seen.stop = list(body.get("stop_sequences") or [])
        system = body.get("system", "")
        seen.system = system if isinstance(system, str) else "".join(b["text"] for b in system)
        seen.tool_names = [t["name"] for t in body.get("tools", [])]
        names_by_id: dict[str, str] = {}
        last_blocks: list[dict[str, Any]] = []
        for msg in body["messages"]:
            content = msg["content"]
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
            last_blocks = blocks
            for b in blocks:
                kind = b["type"]
                if kind == "text" and msg["role"] == "user":
                    seen.user_texts.append(b["text"])
                elif kind == "image":
                    src = b["source"]
                    if src["type"] == "base64":
                        seen.images.append(base64.b64decode(src["data"], validate=True))
                    else:
                        seen.image_urls.append(src.get("url", ""))
                elif kind == "thinking":
                    seen.reasoning_texts.append(b["thinking"])
                    seen.signatures.append(b["signature"])
                elif kind == "tool_use":
                    seen.assistant_tool_calls.append(ToolCall(b["id"], b["name"], b["input"]))
                    names_by_id[b["id"]] = b["name"]
                elif kind == "tool_result":
                    inner = b.get("content", "")
                    text = (
                        inner
                        if isinstance(inner, str)
                        else "".join(c.get("text", "") for c in inner)
                    )
                    seen.tool_results.append(
                        ToolResult(b["tool_use_id"], names_by_id.get(b["tool_use_id"], ""), text)
                    )
        seen.ends_with_tool_results = body["messages"][-1]["role"] == "user" and any(
            b["type"] == "tool_result" for b in last_blocks
        )
        seen.scenario = scenario_of(seen.user_texts)
        return seen

    def check_semantics(self, body: dict[str, Any]) -> str:
        """Rules the API enforces beyond the schema (empty text blocks, tool_use answered)."""
        messages = body["messages"]
        for i, msg in enumerate(messages):
            content = msg["content"]
            if isinstance(content, str):
                if not content:
                    return f"messages.{i}: content must be non-empty"
                continue
            if not content:
                return f"messages.{i}: content must be non-empty"
            for j, b in enumerate(content):
                if b["type"] == "text" and not b["text"]:
                    return f"messages.{i}.content.{j}.text: text content blocks must be non-empty"
            uses = [b["id"] for b in content if b["type"] == "tool_use"]
            if uses:
                nxt = messages[i + 1]["content"] if i + 1 < len(messages) else []
                answered = [
                    b["tool_use_id"]
                    for b in (nxt if isinstance(nxt, list) else [])
                    if b["type"] == "tool_result"
                ]
                if i + 1 < len(messages) and answered != uses:
                    return (
                        f"messages.{i + 1}: tool_use ids {uses} must be answered by tool_result "
                        f"blocks immediately after, in order; got {answered}"
                    )
        roles = [m["role"] for m in messages]
        if roles[0] != "user":
            return "messages.0: first message must use the user role"
        if any(a == b for a, b in zip(roles, roles[1:], strict=False)):
            return f"messages: roles must alternate, got {roles}"
        return ""

    async def messages(self, request: web.Request) -> web.StreamResponse:
        # The API takes the key in x-api-key; anthropic SDK 2.x sends it as a Bearer token.
        bearer = request.headers.get("Authorization", "")
        key = request.headers.get("x-api-key") or bearer.removeprefix("Bearer ")
        if key not in self.keys:
            return self.error_response(401, "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return self.invalid("anthropic-version: header is required")
        body = await request.json()
        tp = (
            message_create_params.MessageCreateParamsStreaming
            if body.get("stream")
            else message_create_params.MessageCreateParamsNonStreaming
        )
        problem = check_typed(body, tp, set()) or self.check_semantics(body)
        if problem:
            return self.invalid(problem)
        seen = self.parse(body)
        plan = self.answer(request, key, body, seen)
        if isinstance(plan, int):
            return self.error_response(plan, ERROR_MESSAGE)
        if seen.stream:
            return await self.streamed(self.stream(request, body["model"], plan))
        return web.json_response(self.message(body["model"], plan))

    @staticmethod
    def stop_reason(reply: Reply) -> str:
        if reply.truncated:
            return "max_tokens"
        return "tool_use" if reply.tool_calls else "end_turn"

    @staticmethod
    def blocks(reply: Reply) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if reply.reasoning:
            out.append(
                {"type": "thinking", "thinking": reply.reasoning, "signature": ANTHROPIC_SIGNATURE}
            )
        if reply.text:
            out.append({"type": "text", "text": reply.text})
        for tc in reply.tool_calls:
            out.append({"type": "tool_use", "id": tc.id, "name": tc.name, "input": tc.arguments})
        return out

    @staticmethod
    def usage(reply: Reply, output_tokens: int) -> dict[str, Any]:
        return {
            "input_tokens": reply.input_tokens,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }

    def message(self, model: str, reply: Reply, streaming: bool = False) -> dict[str, Any]:
        return {
            "id": "msg_01fake",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [] if streaming else self.blocks(reply),
            "stop_reason": None if streaming else self.stop_reason(reply),
            "stop_sequence": None,
            "usage": self.usage(reply, 1 if streaming else reply.output_tokens),
        }

    async def stream(self, request: web.Request, model: str, reply: Reply) -> web.StreamResponse:
        resp = await start_sse(request)

        async def send(kind: str, **data: Any) -> None:
            await resp.write(sse({"type": kind, **data}, event=kind))

        await send("message_start", message=self.message(model, reply, streaming=True))
        await send("ping")
        overloaded = {"type": "overloaded_error", "message": ERROR_MESSAGE}
        if reply.fail_after == 0:
            # Anthropic can fail a 200 stream before any content (hard case 14).
            await send("error", error=overloaded)
            await resp.write_eof()
            return resp
        for index, block in enumerate(self.blocks(reply)):
            if block["type"] == "thinking":
                start = {"type": "thinking", "thinking": "", "signature": ""}
                deltas = [
                    {"type": "thinking_delta", "thinking": p} for p in split_text(reply.reasoning)
                ]
                deltas.append({"type": "signature_delta", "signature": ANTHROPIC_SIGNATURE})
            elif block["type"] == "text":
                start = {"type": "text", "text": ""}
                deltas = [
                    {"type": "text_delta", "text": p}
                    for p in split_text(block["text"], reply.parts)
                ]
            else:
                start = {**block, "input": {}}
                deltas = [
                    {"type": "input_json_delta", "partial_json": p}
                    for p in split_text(json.dumps(block["input"]))
                ]
            await send("content_block_start", index=index, content_block=start)
            for i, delta in enumerate(deltas):
                if reply.fail_after == i:
                    await send("error", error=overloaded)
                    await resp.write_eof()
                    return resp
                await send("content_block_delta", index=index, delta=delta)
                await reply.pace()
            await send("content_block_stop", index=index)
        stop = self.stop_reason(reply)
        await send(
            "message_delta",
            delta={"stop_reason": stop, "stop_sequence": None},
            usage={"output_tokens": reply.output_tokens},
        )
        await send("message_stop")
        await resp.write_eof()
        return resp


# ---------------------------------------------------------------------------------------------
# Gemini (Developer API, v1beta REST, camelCase JSON)
# ---------------------------------------------------------------------------------------------

GEMINI_STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}

# Top-level fields of a generateContent body, each validated with google-genai's own model.
GEMINI_BODY_FIELDS: dict[str, Any] = {
    "contents": list[genai_types.Content],
    "systemInstruction": genai_types.Content,
    "tools": list[genai_types.Tool],
    "toolConfig": genai_types.ToolConfig,
    "generationConfig": genai_types.GenerationConfig,
    "safetySettings": list[genai_types.SafetySetting],
    "cachedContent": str,
}


class FakeGemini(FakeProvider):
    """``models/{model}:generateContent`` and ``:streamGenerateContent?alt=sse`` as Gemini serves them."""

    name = "gemini"

    def __init__(self, keys: list[str]) -> None:
        # The Gemini Developer API sends no functionCall.id; results are matched by name.
        super().__init__(keys, {})

    def app(self) -> web.Application:
        app = web.Application()
        # google-genai 3.x defaults to v1 for the Developer API; the router is documented as v1beta.
        app.router.add_post("/v1beta/models/{target}", self.models)
        app.router.add_post("/v1/models/{target}", self.models)
        return app

    def error_response(self, status: int, message: str) -> web.Response:
        body = {
            "error": {
                "code": status,
                "message": message,
                "status": GEMINI_STATUSES.get(status, "UNKNOWN"),
            }
        }
        if status == 429:
            body["error"]["details"] = [
                {
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": f"{RETRY_AFTER_S}s",
                }
            ]
        return web.json_response(body, status=status)

    @staticmethod
    def validate(body: dict[str, Any]) -> str:
        if "contents" not in body:
            return "contents: field is required"
        for key, value in body.items():
            if key not in GEMINI_BODY_FIELDS:
                return f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.'
            try:
                _adapter(GEMINI_BODY_FIELDS[key]).validate_json(json.dumps(value))
            except pydantic.ValidationError as err:
                return f"{key}: {err}"
        for i, content in enumerate(body["contents"]):
            if content.get("role") not in ("user", "model"):
                return f"contents[{i}].role: must be 'user' or 'model', got {content.get('role')!r}"
            if not content.get("parts"):
                return f"contents[{i}].parts: must not be empty"
        return ""

    def parse(self, body: dict[str, Any]) -> Seen:
        generation = body.get("generationConfig") or {}
        seen = Seen(
            max_tokens=generation.get("maxOutputTokens", generation.get("max_output_tokens")),
            temperature=generation.get("temperature"),
            stop=list(generation.get("stopSequences", generation.get("stop_sequences")) or []),
        )
        system = body.get("systemInstruction") or {}
        seen.system = "".join(p.get("text", "") for p in system.get("parts", []))
        for tool in body.get("tools", []):
            seen.tool_names += [f["name"] for f in tool.get("functionDeclarations", [])]
        for content in body["contents"]:
            for part in content["parts"]:
                if part.get("thoughtSignature"):
                    seen.signatures.append(part["thoughtSignature"])
                if part.get("thought"):
                    seen.reasoning_texts.append(part.get("text", ""))
                elif "text" in part and content["role"] == "user":
                    seen.user_texts.append(part["text"])
                if "inlineData" in part:
                    seen.images.append(b64decode_any(part["inlineData"]["data"]))
                if "fileData" in part:
                    seen.image_urls.append(part["fileData"]["fileUri"])
                if "functionCall" in part:
                    call = part["functionCall"]
                    if part.get("thoughtSignature"):
                        seen.signed_calls.append(call["name"])
                    seen.assistant_tool_calls.append(
                        ToolCall(call.get("id", ""), call["name"], call.get("args", {}))
                    )
                if "functionResponse" in part:
                    resp = part["functionResponse"]
                    seen.tool_results.append(
                        ToolResult(resp.get("id", ""), resp["name"], json.dumps(resp["response"]))
                    )
        last = body["contents"][-1]
        seen.ends_with_tool_results = last["role"] == "user" and any(
            "functionResponse" in p for p in last["parts"]
        )
        seen.scenario = scenario_of(seen.user_texts)
        return seen

    async def models(self, request: web.Request) -> web.StreamResponse:
        model, _, method = request.match_info["target"].partition(":")
        if method == "countTokens":
            return await self.count_tokens(request)
        if method not in ("generateContent", "streamGenerateContent"):
            return self.error_response(404, f"method {method!r} not served by the fake")
        key = request.headers.get("x-goog-api-key") or request.query.get("key", "")
        if key not in self.keys:
            return self.error_response(400, "API key not valid. Please pass a valid API key.")
        body = await request.json()
        problem = self.validate(body)
        if problem:
            return self.invalid(problem)
        seen = self.parse(body)
        seen.stream = method == "streamGenerateContent"
        if seen.stream and request.query.get("alt") != "sse":
            return self.invalid("the fake serves streamGenerateContent only with alt=sse")
        plan = self.answer(request, key, body, seen)
        if isinstance(plan, int):
            return self.error_response(plan, ERROR_MESSAGE)
        if seen.stream:
            return await self.streamed(self.stream(request, model, plan))
        return web.json_response(self.response(model, self.parts(plan), plan))

    async def count_tokens(self, request: web.Request) -> web.Response:
        """``:countTokens`` with ``contents`` or a whole ``generateContentRequest``."""
        key = request.headers.get("x-goog-api-key") or request.query.get("key", "")
        if key not in self.keys:
            return self.error_response(400, "API key not valid. Please pass a valid API key.")
        body = await request.json()
        if set(body) - {"contents", "generateContentRequest"} or len(body) != 1:
            return self.invalid(f"countTokens: want contents or generateContentRequest: {body}")
        inner = body.get("generateContentRequest") or {"contents": body["contents"]}
        if "generateContentRequest" in body:
            model = inner.pop("model", "")
            if not model.startswith("models/"):
                return self.invalid(
                    "GenerateContentRequest.model: unexpected model name format "
                    f"{model!r} (want models/{{model}})"
                )
        problem = self.validate(inner)
        if problem:
            return self.invalid(f"countTokens: {problem}")
        self.exchanges.append(Exchange(request.path_qs, key, body, self.parse(inner), 0))
        return web.json_response({"totalTokens": INPUT_TOKENS})

    @staticmethod
    def parts(reply: Reply) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if reply.text:
            out.append({"text": reply.text})
        for tc in reply.tool_calls:
            out.append({"functionCall": {"name": tc.name, "args": tc.arguments}})
        if reply.reasoning:
            # Gemini signs the first part after the thought summary (a text or functionCall).
            out[0]["thoughtSignature"] = GEMINI_SIGNATURE
            out.insert(0, {"text": reply.reasoning, "thought": True})
        return out

    @staticmethod
    def response(
        model: str, parts: list[dict[str, Any]], reply: Reply, done: float = 1.0
    ) -> dict[str, Any]:
        """One GenerateContentResponse; ``done`` < 1 makes it a stream chunk before the last.

        As Gemini does, every chunk carries ``usageMetadata`` with running (cumulative) counts,
        so only the last chunk's numbers are the call's usage.
        """
        candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
        if done == 1.0:
            candidate["finishReason"] = "MAX_TOKENS" if reply.truncated else "STOP"
        candidates_tokens = int((reply.output_tokens - reply.reasoning_tokens) * done)
        usage = {
            "promptTokenCount": reply.input_tokens,
            "candidatesTokenCount": candidates_tokens,
            "totalTokenCount": reply.input_tokens + candidates_tokens + reply.reasoning_tokens,
        }
        if reply.reasoning_tokens:
            usage["thoughtsTokenCount"] = reply.reasoning_tokens
        return {
            "candidates": [candidate],
            "usageMetadata": usage,
            "modelVersion": model,
            "responseId": "fake-response-1",
        }

    async def stream(self, request: web.Request, model: str, reply: Reply) -> web.StreamResponse:
        resp = await start_sse(request)
        chunks: list[list[dict[str, Any]]] = []
        if reply.reasoning:
            chunks += [[{"text": p, "thought": True}] for p in split_text(reply.reasoning)]
        first_answer = len(chunks)
        if reply.text:
            chunks += [[{"text": p}] for p in split_text(reply.text, reply.parts)]
        if reply.tool_calls:
            # Gemini sends each function call whole, never split across chunks.
            chunks.append(
                [
                    {"functionCall": {"name": tc.name, "args": tc.arguments}}
                    for tc in reply.tool_calls
                ]
            )
        if reply.reasoning:
            # Gemini signs the first part after the thought summary (a text or functionCall).
            chunks[first_answer][0]["thoughtSignature"] = GEMINI_SIGNATURE
        for i, parts in enumerate(chunks):
            if reply.fail_after == i:
                error = {"code": 500, "message": ERROR_MESSAGE, "status": "INTERNAL"}
                await resp.write(f"data: {json.dumps({'error': error})}\r\n\r\n".encode())
                break
            event = self.response(model, parts, reply, done=(i + 1) / len(chunks))
            await reply.pace()
            await resp.write(f"data: {json.dumps(event)}\r\n\r\n".encode())
        await resp.write_eof()
        return resp


# ---------------------------------------------------------------------------------------------
# Client side: official SDK clients that record raw response bytes, and scripted conversations.
# ---------------------------------------------------------------------------------------------

# The provider formats the fakes speak, which are also the kinds of SDK client.
KINDS = ["openai", "anthropic", "gemini"]
OPENAI_KEYS = ["sk-oai-fake-1"]
ANTHROPIC_KEYS = ["sk-ant-fake-1", "sk-ant-fake-2"]
GEMINI_KEYS = ["gem-fake-1"]
CLIENT_KEY = "client-key"
SYSTEM_PROMPT = "You are a terse test assistant."

TOOL_SPECS: list[tuple[str, str, dict[str, Any]]] = [
    (
        "get_weather",
        "Current weather for a city.",
        {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name."},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    ),
    (
        "get_time",
        "Current time in an IANA timezone.",
        {
            "type": "object",
            "properties": {"timezone": {"type": "string"}},
            "required": ["timezone"],
        },
    ),
]


def tool_result(call: ToolCall) -> str:
    """What the client's tool returns for a call."""
    if call.name == "get_time":
        return TIME_RESULT
    return TOKYO_RESULT if call.arguments.get("city") == "Tokyo" else WEATHER_RESULT


# (finish after text, after tool calls, after hitting the token limit) per client format.
NATIVE_FINISH = {
    "openai": ("stop", "tool_calls", "length"),
    "anthropic": ("end_turn", "tool_use", "max_tokens"),
    "gemini": ("STOP", "STOP", "MAX_TOKENS"),
    "responses": ("completed", "completed", "incomplete"),
}


class _TeeStream(httpx2.AsyncByteStream):
    def __init__(self, inner: httpx2.AsyncByteStream, sink: bytearray) -> None:
        self._inner = inner
        self._sink = sink

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._sink.extend(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class TeeTransport(httpx2.AsyncBaseTransport):
    """An httpx transport that keeps the raw bytes of every response body it hands to an SDK.

    SDK clients built on it parse streams exactly as in production, while tests also run the
    grammar checkers over the bytes the client really received.
    """

    def __init__(self) -> None:
        self._inner = httpx2.AsyncHTTPTransport()
        self.bodies: list[bytearray] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self._inner.handle_async_request(request)
        sink = bytearray()
        self.bodies.append(sink)
        return httpx2.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_TeeStream(response.stream, sink),
            extensions=response.extensions,
            request=request,
        )

    async def aclose(self) -> None:
        await self._inner.aclose()

    @property
    def last_body(self) -> bytes:
        assert self.bodies, "no response went through the tee"
        return bytes(self.bodies[-1])


@dataclass
class Clients:
    """The three official async SDK clients, all pointed at one server through one tee."""

    tee: TeeTransport
    openai: openai.AsyncOpenAI
    anthropic: anthropic.AsyncAnthropic
    gemini: genai.Client

    async def close(self) -> None:
        await self.openai.close()
        await self.anthropic.close()
        await self.gemini.aio.aclose()


def make_clients(
    roots: dict[str, str], keys: dict[str, str] | None = None, api_version: str = "v1beta"
) -> Clients:
    """Builds SDK clients (no retries) whose responses are recorded by a ``TeeTransport``.

    Args:
        roots: server root per client kind (``openai``, ``anthropic``, ``gemini``), e.g.
            ``http://127.0.0.1:1234``; each SDK adds its own path.
        keys: API key per client kind; ``CLIENT_KEY`` where absent.
        api_version: the Gemini API version google-genai puts in the path.
    """
    keys = keys or {}
    tee = TeeTransport()
    http = httpx2.AsyncClient(transport=tee, timeout=30)
    gemini_options = genai_types.HttpOptions(
        base_url=roots["gemini"],
        api_version=api_version,
        async_client_args={"transport": tee},
        retry_options=genai_types.HttpRetryOptions(attempts=1),
    )
    return Clients(
        tee=tee,
        openai=openai.AsyncOpenAI(
            base_url=f"{roots['openai']}/v1",
            api_key=keys.get("openai", CLIENT_KEY),
            max_retries=0,
            http_client=http,
        ),
        anthropic=anthropic.AsyncAnthropic(
            base_url=roots["anthropic"],
            api_key=keys.get("anthropic", CLIENT_KEY),
            max_retries=0,
            http_client=http,
        ),
        gemini=genai.Client(api_key=keys.get("gemini", CLIENT_KEY), http_options=gemini_options),
    )


@dataclass
class Outcome:
    """What one assistant turn delivered to a client, read through its SDK."""

    text: str = ""
    reasoning: str = ""
    # As the client format carries it; Gemini's bytes are given as standard base64.
    signature: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    # Provider extras on OpenAI tool calls, by call id (Gemini's thought_signature rides in
    # ``extra_content.google.thought_signature`` there).
    tool_extras: dict[str, dict[str, Any]] = field(default_factory=dict)
    finish: str = ""
    input_tokens: int | None = None
    output_tokens: int | None = None
    raw: bytes = b""


class OpenAIDriver:
    """A chat.completions conversation through ``openai.AsyncOpenAI``."""

    kind = "openai"

    def __init__(self, clients: Clients, model: str) -> None:
        self.clients = clients
        self.model = model
        self.messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT}]

    def add_user(self, text: str, image: bytes | None = None, image_url: str = "") -> None:
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        if image is not None:
            image_url = "data:image/png;base64," + base64.b64encode(image).decode()
        if image_url:
            content.append({"type": "image_url", "image_url": {"url": image_url}})
        self.messages.append({"role": "user", "content": content})

    def add_tool_results(self, calls: list[ToolCall]) -> None:
        for call in calls:
            self.messages.append(
                {"role": "tool", "tool_call_id": call.id, "content": tool_result(call)}
            )

    def request(self, tools: bool, reasoning: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"model": self.model, "messages": self.messages}
        if tools:
            kwargs["tools"] = [
                {"type": "function", "function": {"name": n, "description": d, "parameters": p}}
                for n, d, p in TOOL_SPECS
            ]
        if reasoning:
            kwargs["reasoning_effort"] = "low"
        return kwargs

    async def send(self, stream: bool, tools: bool = False, reasoning: bool = False) -> Outcome:
        kwargs = self.request(tools, reasoning)
        out = Outcome()
        blocks: list[dict[str, Any]] = []
        if stream:
            calls: dict[int, dict[str, Any]] = {}
            response = await self.clients.openai.chat.completions.create(
                **kwargs, stream=True, stream_options={"include_usage": True}
            )
            async for chunk in response:
                if chunk.usage is not None:
                    out.input_tokens = chunk.usage.prompt_tokens
                    out.output_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    delta = choice.delta
                    extra = delta.model_extra or {}
                    out.text += delta.content or ""
                    out.reasoning += extra.get("reasoning_content") or ""
                    blocks += extra.get("thinking_blocks") or []
                    for tc in delta.tool_calls or []:
                        slot = calls.setdefault(
                            tc.index, {"id": "", "name": "", "args": "", "extra": {}}
                        )
                        slot["extra"].update(tc.model_extra or {})
                        slot["id"] += tc.id or ""
                        slot["name"] += (tc.function.name or "") if tc.function else ""
                        slot["args"] += (tc.function.arguments or "") if tc.function else ""
                    out.finish = choice.finish_reason or out.finish
            out.tool_calls = [
                ToolCall(c["id"], c["name"], json.loads(c["args"] or "{}"))
                for _, c in sorted(calls.items())
            ]
            out.tool_extras = {c["id"]: c["extra"] for c in calls.values() if c["extra"]}
            out.raw = self.clients.tee.last_body
        else:
            response = await self.clients.openai.chat.completions.create(**kwargs)
            message = response.choices[0].message
            extra = message.model_extra or {}
            out.text = message.content or ""
            out.reasoning = extra.get("reasoning_content") or ""
            blocks = extra.get("thinking_blocks") or []
            out.tool_calls = [
                ToolCall(tc.id, tc.function.name, json.loads(tc.function.arguments or "{}"))
                for tc in message.tool_calls or []
            ]
            out.tool_extras = {
                tc.id: tc.model_extra for tc in message.tool_calls or [] if tc.model_extra
            }
            out.finish = response.choices[0].finish_reason
            if response.usage is not None:
                out.input_tokens = response.usage.prompt_tokens
                out.output_tokens = response.usage.completion_tokens
        out.signature = "".join(b.get("signature") or "" for b in blocks) + "".join(
            extra.get("extra_content", {}).get("google", {}).get("thought_signature", "")
            for extra in out.tool_extras.values()
        )
        # Many agents send "" rather than null beside tool calls; Anthropic rejects an empty text
        # block, so the router must drop it (hard case 11).
        assistant: dict[str, Any] = {"role": "assistant", "content": out.text}
        if out.tool_calls:
            # Sent back with the provider extras they came with, as agents that keep the SDK's
            # message objects do.
            assistant["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
                    **out.tool_extras.get(c.id, {}),
                }
                for c in out.tool_calls
            ]
        if blocks:
            # Streams send thinking text and signature in separate deltas; merge them back.
            thinking = "".join(b.get("thinking") or "" for b in blocks)
            assistant["thinking_blocks"] = [
                {"type": "thinking", "thinking": thinking, "signature": out.signature}
            ]
        self.messages.append(assistant)
        return out


class AnthropicDriver:
    """A Messages conversation through ``anthropic.AsyncAnthropic``."""

    kind = "anthropic"

    def __init__(self, clients: Clients, model: str) -> None:
        self.clients = clients
        self.model = model
        self.messages: list[dict[str, Any]] = []

    def add_user(self, text: str, image: bytes | None = None, image_url: str = "") -> None:
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        if image is not None:
            source = {
                "type": "base64",
                "media_type": "image/png",
                "data": base64.b64encode(image).decode(),
            }
            content.append({"type": "image", "source": source})
        if image_url:
            content.append({"type": "image", "source": {"type": "url", "url": image_url}})
        self.messages.append({"role": "user", "content": content})

    def add_tool_results(self, calls: list[ToolCall]) -> None:
        results = [
            {"type": "tool_result", "tool_use_id": c.id, "content": tool_result(c)} for c in calls
        ]
        self.messages.append({"role": "user", "content": results})

    async def send(self, stream: bool, tools: bool = False, reasoning: bool = False) -> Outcome:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "max_tokens": 2048,
            "system": SYSTEM_PROMPT,
            "messages": self.messages,
        }
        if tools:
            kwargs["tools"] = [
                {"name": n, "description": d, "input_schema": p} for n, d, p in TOOL_SPECS
            ]
        if reasoning:
            kwargs["thinking"] = {"type": "enabled", "budget_tokens": 1024}
        out = Outcome()
        if stream:
            async with self.clients.anthropic.messages.stream(**kwargs) as events:
                async for _ in events:
                    pass
                message = await events.get_final_message()
            out.raw = self.clients.tee.last_body
        else:
            message = await self.clients.anthropic.messages.create(**kwargs)
        content: list[dict[str, Any]] = []
        for block in message.content:
            if block.type == "text":
                out.text += block.text
                content.append({"type": "text", "text": block.text})
            elif block.type == "thinking":
                out.reasoning += block.thinking
                out.signature += block.signature
                content.append(
                    {"type": "thinking", "thinking": block.thinking, "signature": block.signature}
                )
            elif block.type == "tool_use":
                out.tool_calls.append(ToolCall(block.id, block.name, dict(block.input)))
                content.append(
                    {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
                )
        out.finish = message.stop_reason or ""
        out.input_tokens = message.usage.input_tokens
        out.output_tokens = message.usage.output_tokens
        self.messages.append({"role": "assistant", "content": content})
        return out


class GeminiDriver:
    """A generateContent conversation through ``google.genai.Client().aio``."""

    kind = "gemini"

    def __init__(self, clients: Clients, model: str) -> None:
        self.clients = clients
        self.model = model
        self.contents: list[genai_types.Content] = []

    def add_user(self, text: str, image: bytes | None = None, image_url: str = "") -> None:
        parts = [genai_types.Part(text=text)]
        if image is not None:
            parts.append(genai_types.Part.from_bytes(data=image, mime_type="image/png"))
        if image_url:
            parts.append(genai_types.Part.from_uri(file_uri=image_url, mime_type="image/png"))
        self.contents.append(genai_types.Content(role="user", parts=parts))

    def add_tool_results(self, calls: list[ToolCall]) -> None:
        parts = [
            genai_types.Part(
                function_response=genai_types.FunctionResponse(
                    id=c.id or None, name=c.name, response={"result": tool_result(c)}
                )
            )
            for c in calls
        ]
        self.contents.append(genai_types.Content(role="user", parts=parts))

    async def send(self, stream: bool, tools: bool = False, reasoning: bool = False) -> Outcome:
        config = genai_types.GenerateContentConfig(system_instruction=SYSTEM_PROMPT)
        if tools:
            declarations = [
                genai_types.FunctionDeclaration(name=n, description=d, parameters_json_schema=p)
                for n, d, p in TOOL_SPECS
            ]
            config.tools = [genai_types.Tool(function_declarations=declarations)]
            config.automatic_function_calling = genai_types.AutomaticFunctionCallingConfig(
                disable=True
            )
        if reasoning:
            config.thinking_config = genai_types.ThinkingConfig(include_thoughts=True)
        models = self.clients.gemini.aio.models
        responses: list[genai_types.GenerateContentResponse] = []
        if stream:
            iterator = await models.generate_content_stream(
                model=self.model, contents=self.contents, config=config
            )
            responses = [chunk async for chunk in iterator]
        else:
            responses = [
                await models.generate_content(
                    model=self.model, contents=self.contents, config=config
                )
            ]
        out = Outcome(raw=self.clients.tee.last_body if stream else b"")
        parts: list[genai_types.Part] = []
        for response in responses:
            for candidate in response.candidates or []:
                parts += (
                    candidate.content.parts if candidate.content and candidate.content.parts else []
                )
                if candidate.finish_reason:
                    out.finish = candidate.finish_reason.value
            usage = response.usage_metadata
            if usage is not None and usage.prompt_token_count is not None:
                out.input_tokens = usage.prompt_token_count
                out.output_tokens = (usage.candidates_token_count or 0) + (
                    usage.thoughts_token_count or 0
                )
        for part in parts:
            if part.thought_signature:
                out.signature += base64.b64encode(part.thought_signature).decode()
            if part.thought:
                out.reasoning += part.text or ""
            elif part.text:
                out.text += part.text
            if part.function_call:
                call = part.function_call
                out.tool_calls.append(
                    ToolCall(call.id or "", call.name or "", dict(call.args or {}))
                )
        self.contents.append(genai_types.Content(role="model", parts=parts))
        return out


async def stream_response(clients: Clients, kwargs: dict[str, Any]) -> Any:
    """Streams a Responses request through the SDK's stream helper (which checks each event
    against its snapshot) and returns the response of the terminal event.

    The helper's ``get_final_response`` only knows ``response.completed``; a stream that ends
    in ``response.incomplete`` or ``response.failed`` is read from that event instead.

    Raises:
        AssertionError: the stream had no terminal event.
    """
    terminal = None
    async with clients.openai.responses.stream(**kwargs) as events:
        async for event in events:
            if event.type in grammar.TERMINAL_RESPONSE_EVENTS:
                terminal = event
        if terminal is not None and terminal.type == "response.completed":
            return await events.get_final_response()
    assert terminal is not None, "the Responses stream had no terminal event"
    return terminal.response


class ResponsesDriver:
    """A stateless Responses API conversation (``store=False``) through ``openai.AsyncOpenAI``:
    the output items of each turn go back as input items, as agents do."""

    kind = "responses"

    def __init__(self, clients: Clients, model: str) -> None:
        self.clients = clients
        self.model = model
        self.items: list[dict[str, Any]] = []

    def add_user(self, text: str, image: bytes | None = None, image_url: str = "") -> None:
        content: list[dict[str, Any]] = [{"type": "input_text", "text": text}]
        if image is not None:
            image_url = "data:image/png;base64," + base64.b64encode(image).decode()
        if image_url:
            content.append({"type": "input_image", "image_url": image_url, "detail": "auto"})
        self.items.append({"role": "user", "content": content})

    def add_tool_results(self, calls: list[ToolCall]) -> None:
        for call in calls:
            self.items.append(
                {
                    "type": "function_call_output",
                    "call_id": call.id,
                    "output": tool_result(call),
                }
            )

    async def send(self, stream: bool, tools: bool = False, reasoning: bool = False) -> Outcome:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "instructions": SYSTEM_PROMPT,
            "input": self.items,
            "store": False,
        }
        if tools:
            kwargs["tools"] = [
                {"type": "function", "name": n, "description": d, "parameters": p, "strict": False}
                for n, d, p in TOOL_SPECS
            ]
        if reasoning:
            kwargs["reasoning"] = {"effort": "low", "summary": "auto"}
            kwargs["include"] = ["reasoning.encrypted_content"]
        out = Outcome()
        if stream:
            response = await stream_response(self.clients, kwargs)
            out.raw = self.clients.tee.last_body
        else:
            response = await self.clients.openai.responses.create(**kwargs)
        for item in response.output:
            if item.type == "message":
                out.text += "".join(c.text for c in item.content if c.type == "output_text")
            elif item.type == "reasoning":
                out.reasoning += "".join(part.text for part in item.summary)
                out.signature += item.encrypted_content or ""
            elif item.type == "function_call":
                out.tool_calls.append(
                    ToolCall(item.call_id, item.name, json.loads(item.arguments or "{}"))
                )
            self.items.append(item.model_dump(exclude_none=True))
        out.finish = response.status or ""
        if response.usage is not None:
            out.input_tokens = response.usage.input_tokens
            out.output_tokens = response.usage.output_tokens
        return out


async def ask(client: str, clients: Clients, model: str, prompt: str, stream: bool) -> str:
    """Sends one user message through a client SDK and returns the answer text.

    Args:
        client: client format, a key of ``DRIVERS``.
        clients: SDK clients pointed at the server under test.
        model: model name the client asks for.
        prompt: the user text (carries the scenario marker).
        stream: whether to stream; streams are read to the end.

    Raises:
        openai.APIError, anthropic.APIError, google.genai.errors.APIError: as the SDK raises.
    """
    messages = [{"role": "user", "content": prompt}]
    if client == "openai":
        if stream:
            response = await clients.openai.chat.completions.create(
                model=model, messages=messages, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in response if c.choices])
        response = await clients.openai.chat.completions.create(model=model, messages=messages)
        return response.choices[0].message.content or ""
    if client == "responses":
        kwargs = {"model": model, "input": prompt}
        if stream:
            return (await stream_response(clients, kwargs)).output_text
        return (await clients.openai.responses.create(**kwargs)).output_text
    if client == "anthropic":
        kwargs = {"model": model, "max_tokens": 64, "messages": messages}
        if stream:
            async with clients.anthropic.messages.stream(**kwargs) as events:
                return await events.get_final_text()
        message = await clients.anthropic.messages.create(**kwargs)
        return "".join(b.text for b in message.content if b.type == "text")
    models = clients.gemini.aio.models
    if stream:
        chunks = await models.generate_content_stream(model=model, contents=prompt)
        return "".join([c.text or "" async for c in chunks])
    return (await models.generate_content(model=model, contents=prompt)).text or ""


async def read_first_text_then_leave(
    client: str, clients: Clients, roots: dict[str, str], model: str, key: str = CLIENT_KEY
) -> str:
    """Starts a ``slow`` stream, reads until the first text arrives, then closes it.

    Args:
        client: client format, a key of ``DRIVERS``.
        clients: SDK clients pointed at the server under test.
        roots: the server root per client kind (the Gemini client leaves over plain HTTP).
        model: model name the client asks for.
        key: the API key the plain-HTTP Gemini request sends.

    Raises:
        AssertionError: the stream ended before any text.
    """
    prompt = "scenario:slow"
    if client == "openai":
        stream = await clients.openai.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                await stream.close()
                return chunk.choices[0].delta.content
    elif client == "anthropic":
        kwargs = {
            "model": model,
            "max_tokens": 64,
            "messages": [{"role": "user", "content": prompt}],
        }
        async with clients.anthropic.messages.stream(**kwargs) as events:
            async for event in events:
                if event.type == "text":
                    return event.text
    else:
        # google-genai 3.4 does not close the HTTP stream when a reader stops early (aclose of
        # its nested generators fails), so this client leaves over plain HTTP instead.
        url = f"{roots['gemini']}/v1beta/models/{model}:streamGenerateContent?alt=sse"
        body = {"contents": [{"role": "user", "parts": [{"text": prompt}]}]}
        async with ClientSession() as http:
            async with http.post(url, json=body, headers={"x-goog-api-key": key}) as r:
                async for line in r.content:
                    if line.startswith(b"data:"):
                        chunk = json.loads(line[5:])
                        return chunk["candidates"][0]["content"]["parts"][0]["text"]
    raise AssertionError("the stream ended before any text")


# What each SDK raises for its provider's in-stream error event.
MIDSTREAM_ERRORS = {
    "openai": openai.APIError,
    "anthropic": anthropic.APIError,
    "gemini": genai_errors.APIError,
}

DRIVERS = {
    "openai": OpenAIDriver,
    "anthropic": AnthropicDriver,
    "gemini": GeminiDriver,
    "responses": ResponsesDriver,
}
Driver = OpenAIDriver | AnthropicDriver | GeminiDriver | ResponsesDriver

STREAM_CHECKERS = {
    "openai": lambda raw: grammar.check_openai_stream(raw, expect_usage=True),
    "anthropic": grammar.check_anthropic_stream,
    "gemini": grammar.check_gemini_stream,
    "responses": grammar.check_responses_stream,
}


TEXT_TURN, TOOL_TURN, TRUNCATED_TURN = 0, 1, 2

# The calls each tool scenario's first turn must deliver, in order.
TOOL_SCENARIOS = {
    "tool": [("get_weather", WEATHER_ARGS)],
    "parallel": [("get_weather", WEATHER_ARGS), ("get_time", TIME_ARGS)],
    "parallel-same": [("get_weather", WEATHER_ARGS), ("get_weather", TOKYO_ARGS)],
    "parallel-interleaved": [("get_weather", WEATHER_ARGS), ("get_time", TIME_ARGS)],
}
# Every scenario `run_scenario` plays.
SCENARIOS = ["text", "image", "truncated", *TOOL_SCENARIOS, "reasoning", "reasoning-tool"]


def _expect_turn(driver: Driver, out: Outcome, stream: bool, turn: int, upstream: str) -> None:
    """Asserts what every turn must deliver: stream grammar, finish reason and usage."""
    if stream:
        events = STREAM_CHECKERS[driver.kind](out.raw)
        if driver.kind == "anthropic" and upstream != "openai":
            # Anthropic and Gemini report the prompt's tokens up front; clients such as Claude
            # Code read them from message_start (hard case 3). OpenAI reports usage only at the end.
            start_usage = events[0]["message"]["usage"]
            assert start_usage["input_tokens"] == INPUT_TOKENS, (
                f"message_start usage {start_usage}, upstream reported input {INPUT_TOKENS}"
            )
    want_finish = NATIVE_FINISH[driver.kind][turn]
    assert out.finish == want_finish, f"finish reason {out.finish!r}, want {want_finish!r}"
    assert (out.input_tokens, out.output_tokens) == (INPUT_TOKENS, OUTPUT_TOKENS), (
        f"usage (in, out) = {(out.input_tokens, out.output_tokens)}, upstream reported "
        f"{(INPUT_TOKENS, OUTPUT_TOKENS)}"
    )


def _expect_upstream(fake: FakeProvider, stream: bool) -> Seen:
    seen = fake.last.seen
    assert SYSTEM_PROMPT in seen.system, f"system prompt lost upstream: {seen.system!r}"
    assert fake.last.key in fake.keys
    if fake.name == "openai" and seen.stream:
        assert seen.include_usage, "streamed from an OpenAI upstream without include_usage"
    return seen


async def run_scenario(
    kind: str, clients: Clients, model: str, scenario: str, stream: bool, fake: FakeProvider
) -> None:
    """Plays one scenario through a client SDK and asserts what the client and the fake saw.

    Args:
        kind: client format, a key of ``DRIVERS``.
        clients: SDK clients pointed at the server under test.
        model: model name the client asks for.
        scenario: ``text``, ``image``, ``truncated``, a key of ``TOOL_SCENARIOS``,
            ``reasoning`` or ``reasoning-tool``.
        stream: whether the client streams.
        fake: the fake provider that ends up serving the request.

    Raises:
        AssertionError: the client or the fake saw something wrong.
    """
    driver: Driver = DRIVERS[kind](clients, model)
    driver.add_user(
        f"Please help. scenario:{scenario}", RED_PIXEL_PNG if scenario == "image" else None
    )
    tools = scenario in TOOL_SCENARIOS or scenario == "reasoning-tool"
    reasoning = scenario in ("reasoning", "reasoning-tool")
    out = await driver.send(stream, tools=tools, reasoning=reasoning)
    seen = _expect_upstream(fake, stream)
    turn = TOOL_TURN if tools else TRUNCATED_TURN if scenario == "truncated" else TEXT_TURN
    _expect_turn(driver, out, stream, turn, fake.name)
    needs_id = kind != "gemini"
    if scenario == "text":
        assert (out.text, out.tool_calls) == (TEXT_ANSWER, [])
    elif scenario == "image":
        assert out.text == IMAGE_ANSWER
        assert seen.images == [RED_PIXEL_PNG], f"image bytes upstream: {seen.images}"
    elif scenario == "truncated":
        assert out.text == TRUNCATED_ANSWER
    elif scenario in TOOL_SCENARIOS:
        assert seen.tool_names == [n for n, _, _ in TOOL_SPECS], seen.tool_names
        want = TOOL_SCENARIOS[scenario]
        assert [(c.name, c.arguments) for c in out.tool_calls] == want, out.tool_calls
        ids = [c.id for c in out.tool_calls]
        if needs_id:
            assert all(ids) and len(set(ids)) == len(ids), f"tool call ids {ids}"
        assert out.text == ""
        if len(want) > 1:
            issued = [c.id for c in fake.last.reply.tool_calls]
            driver.add_tool_results(out.tool_calls)
            out2 = await driver.send(stream, tools=True)
            seen2 = _expect_upstream(fake, stream)
            _expect_turn(driver, out2, stream, TEXT_TURN, fake.name)
            assert out2.text == PARALLEL_ANSWER
            calls = seen2.assistant_tool_calls
            assert [(c.name, c.arguments) for c in calls] == want, f"calls sent back: {calls}"
            results = seen2.tool_results
            assert [r.name for r in results] == [n for n, _ in want], results
            for call, result in zip(calls, results, strict=True):
                assert tool_result(call) in result.content, f"{call} answered by {result}"
            if fake.name != "gemini":
                assert [c.id for c in calls] == issued, f"call ids upstream {calls}, fake {issued}"
                assert [r.call_id for r in results] == issued, f"result ids {results}"
    elif scenario == "reasoning":
        assert out.text == REASONING_ANSWER
        assert out.reasoning == REASONING_TEXT, f"reasoning text {out.reasoning!r}"
        if fake.name != "openai":
            assert out.signature, "reasoning signature did not reach the client"
        if kind == fake.name:
            want = {"anthropic": ANTHROPIC_SIGNATURE, "gemini": GEMINI_SIGNATURE}.get(kind, "")
            assert out.signature == want, f"signature {out.signature!r}, upstream sent {want!r}"
        driver.add_user("And now? scenario:followup")
        out2 = await driver.send(stream, reasoning=True)
        seen2 = _expect_upstream(fake, stream)
        _expect_turn(driver, out2, stream, TEXT_TURN, fake.name)
        assert out2.text == FOLLOWUP_ANSWER
        _expect_signature_back(fake, seen2, with_call=False)
    elif scenario == "reasoning-tool":
        assert [(c.name, c.arguments) for c in out.tool_calls] == [("get_weather", WEATHER_ARGS)]
        assert out.reasoning == REASONING_TEXT, f"reasoning text {out.reasoning!r}"
        if fake.name != "openai":
            assert out.signature, "reasoning signature did not reach the client"
        driver.add_tool_results(out.tool_calls)
        out2 = await driver.send(stream, tools=True, reasoning=True)
        seen2 = _expect_upstream(fake, stream)
        _expect_turn(driver, out2, stream, TEXT_TURN, fake.name)
        assert out2.text == REASONING_TOOL_ANSWER
        _expect_signature_back(fake, seen2, with_call=True)
    else:
        raise ValueError(f"unknown scenario {scenario!r}")


def _expect_signature_back(fake: FakeProvider, seen: Seen, with_call: bool) -> None:
    """Asserts the upstream got its own reasoning signature back, unchanged, on the next turn."""
    if fake.name == "anthropic":
        assert seen.signatures == [ANTHROPIC_SIGNATURE], f"signatures upstream {seen.signatures}"
        assert seen.reasoning_texts == [REASONING_TEXT], seen.reasoning_texts
        if with_call:
            turn = next(m for m in fake.last.body["messages"] if m["role"] == "assistant")
            kinds = [b["type"] for b in turn["content"]]
            assert kinds == ["thinking", "tool_use"], f"assistant turn blocks upstream: {kinds}"
    elif fake.name == "gemini":
        got = [b64decode_any(s) for s in seen.signatures]
        assert got == [base64.b64decode(GEMINI_SIGNATURE)], f"signatures upstream {seen.signatures}"
        if with_call:
            assert seen.signed_calls == ["get_weather"], (
                "Function call is missing a thought_signature in functionCall parts (Gemini 3 "
                f"answers 400); signed calls upstream: {seen.signed_calls}"
            )
