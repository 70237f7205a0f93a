"""Checkers for the exact event grammar of OpenAI, Anthropic and Gemini streams.

Each checker takes the raw bytes a client received, splits them into server-sent events as the
SSE spec says, and raises ``GrammarError`` (an ``AssertionError``) naming the offending event
when the stream breaks its format's rules.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import pydantic
from google.genai import types as genai_types


class GrammarError(AssertionError):
    """A stream broke its format's event grammar."""


@dataclass
class Event:
    """One server-sent event: its ``event:`` name ('' when absent) and joined ``data:`` lines."""

    event: str
    data: str

    def json(self) -> dict[str, Any]:
        try:
            return json.loads(self.data)
        except json.JSONDecodeError as err:
            raise GrammarError(f"event data is not JSON: {self.data[:200]!r}") from err


def parse_sse(raw: bytes) -> list[Event]:
    """Splits a ``text/event-stream`` body into events (comments and ``retry:`` ignored).

    Args:
        raw: the body bytes as received.

    Raises:
        GrammarError: the body is not UTF-8 or ends in the middle of an event.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise GrammarError(f"stream is not UTF-8: {err}") from err
    events: list[Event] = []
    name, data = "", []
    lines = re.split(r"\r\n|\r|\n", text)
    for line in lines[:-1] if lines and lines[-1] == "" else lines:
        if line == "":
            if data:
                events.append(Event(name, "\n".join(data)))
            name, data = "", []
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "event":
            name = value
        elif key == "data":
            data.append(value)
    if data:
        raise GrammarError(f"stream ended inside an event (no blank line after data {data!r})")
    return events


# ---------------------------------------------------------------------------------------------
# OpenAI Chat Completions
# ---------------------------------------------------------------------------------------------


def check_openai_stream(raw: bytes, expect_usage: bool) -> list[dict[str, Any]]:
    """Checks a chat.completion.chunk stream and returns its chunks (without ``[DONE]``).

    Args:
        raw: the body bytes.
        expect_usage: whether the client asked ``stream_options.include_usage``.

    Raises:
        GrammarError: a rule is broken; the message names the chunk.
    """
    events = parse_sse(raw)
    if not events or events[-1].data != "[DONE]":
        raise GrammarError(f"last event must be [DONE], got {events[-1:]}")
    if [e.data for e in events].count("[DONE]") != 1:
        raise GrammarError("[DONE] sent more than once")
    chunks = [e.json() for e in events[:-1]]
    if not chunks:
        raise GrammarError("no chunk before [DONE]")
    for i, (event, chunk) in enumerate(zip(events, chunks, strict=False)):
        if event.event not in ("", "message"):
            raise GrammarError(f"chunk {i}: unexpected event name {event.event!r}")
        if chunk.get("object") != "chat.completion.chunk":
            raise GrammarError(f"chunk {i}: object is {chunk.get('object')!r}: {chunk}")
    ids = {c.get("id") for c in chunks}
    if len(ids) != 1 or None in ids:
        raise GrammarError(f"chunks must share one id, got {ids}")
    first = chunks[0]["choices"]
    if not first or first[0]["delta"].get("role") != "assistant":
        raise GrammarError(f"first chunk must carry role 'assistant': {chunks[0]}")

    finish_at = [i for i, c in enumerate(chunks) for ch in c["choices"] if ch.get("finish_reason")]
    if len(finish_at) != 1:
        raise GrammarError(f"exactly one chunk must have a finish_reason, got chunks {finish_at}")
    usage_at = [i for i, c in enumerate(chunks) if c.get("usage")]
    if expect_usage:
        if usage_at != [len(chunks) - 1] or chunks[-1]["choices"] != []:
            raise GrammarError(
                "include_usage: exactly one usage chunk, with choices [], must come last before "
                f"[DONE]; usage in chunks {usage_at} of {len(chunks)}: {chunks[-1]}"
            )
        if finish_at[0] != len(chunks) - 2:
            raise GrammarError(f"finish chunk {finish_at[0]} must directly precede usage chunk")
    elif usage_at:
        raise GrammarError(f"usage sent without include_usage in chunks {usage_at}")
    elif finish_at[0] != len(chunks) - 1:
        raise GrammarError(f"chunks after the finish chunk {finish_at[0]}: {chunks[-1]}")

    started: set[int] = set()
    for i, chunk in enumerate(chunks):
        for choice in chunk["choices"]:
            if choice.get("index") != 0:
                raise GrammarError(f"chunk {i}: choice index {choice.get('index')} (n=1)")
            for tc in choice["delta"].get("tool_calls") or []:
                index = tc.get("index")
                if not isinstance(index, int):
                    raise GrammarError(f"chunk {i}: tool_call delta without integer index: {tc}")
                fn = tc.get("function") or {}
                if index not in started:
                    if index != len(started):
                        raise GrammarError(f"chunk {i}: tool index {index} skips {len(started)}")
                    if not tc.get("id") or not fn.get("name") or tc.get("type") != "function":
                        raise GrammarError(
                            f"chunk {i}: first delta of tool index {index} needs id, "
                            f"type 'function' and function.name: {tc}"
                        )
                    started.add(index)
                elif tc.get("id") or fn.get("name"):
                    raise GrammarError(
                        f"chunk {i}: id/name repeated on a later delta of tool index {index}: {tc}"
                    )
                if "arguments" in fn and not isinstance(fn["arguments"], str):
                    raise GrammarError(f"chunk {i}: arguments must be a string: {tc}")
    return chunks


# ---------------------------------------------------------------------------------------------
# Anthropic Messages
# ---------------------------------------------------------------------------------------------

DELTAS_FOR_BLOCK = {
    "text": {"text_delta", "citations_delta"},
    "thinking": {"thinking_delta", "signature_delta"},
    "redacted_thinking": set(),
    "tool_use": {"input_json_delta"},
    "server_tool_use": {"input_json_delta"},
}


def check_anthropic_stream(raw: bytes) -> list[dict[str, Any]]:
    """Checks a Messages stream and returns its event payloads (pings and all).

    Args:
        raw: the body bytes.

    Raises:
        GrammarError: a rule is broken; the message names the event.
    """
    events = parse_sse(raw)
    payloads = [e.json() for e in events]
    for i, (event, data) in enumerate(zip(events, payloads, strict=False)):
        if event.event != data.get("type"):
            raise GrammarError(f"event {i}: name {event.event!r} != data type {data.get('type')!r}")
    kinds = [p["type"] for p in payloads if p["type"] != "ping"]
    if not kinds or kinds[0] != "message_start":
        raise GrammarError(f"first event must be message_start, got {kinds[:1]}")

    start = next(p for p in payloads if p["type"] == "message_start")["message"]
    if start.get("content") != [] or start.get("role") != "assistant" or "usage" not in start:
        raise GrammarError(f"message_start.message needs content [], role, usage: {start}")

    open_block: dict[str, Any] | None = None
    open_index = -1
    next_index = 0
    signed = False
    for i, p in enumerate(payloads):
        kind = p["type"]
        if kind == "content_block_start":
            if open_block is not None:
                raise GrammarError(f"event {i}: block {p['index']} starts inside open {open_index}")
            if p.get("index") != next_index:
                raise GrammarError(f"event {i}: block index {p.get('index')}, want {next_index}")
            open_block, open_index = p["content_block"], p["index"]
            next_index += 1
            signed = bool(open_block.get("signature"))
            if open_block["type"] not in DELTAS_FOR_BLOCK:
                raise GrammarError(f"event {i}: unknown block type {open_block['type']!r}")
            if open_block["type"] == "tool_use" and (
                not open_block.get("id") or not open_block.get("name") or open_block.get("input")
            ):
                raise GrammarError(f"event {i}: tool_use start needs id, name, input {{}}: {p}")
        elif kind == "content_block_delta":
            if open_block is None or p.get("index") != open_index:
                raise GrammarError(
                    f"event {i}: delta for block {p.get('index')} while block "
                    f"{open_index if open_block else 'none'} is open: {p}"
                )
            delta_type = p["delta"]["type"]
            if delta_type not in DELTAS_FOR_BLOCK[open_block["type"]]:
                raise GrammarError(f"event {i}: {delta_type} inside a {open_block['type']} block")
            if delta_type == "signature_delta":
                signed = signed or bool(p["delta"]["signature"])
        elif kind == "content_block_stop":
            if open_block is None or p.get("index") != open_index:
                raise GrammarError(f"event {i}: stop for block {p.get('index')} not open")
            if open_block["type"] == "thinking" and not signed:
                raise GrammarError(f"event {i}: thinking block {open_index} closed unsigned")
            open_block = None
        elif kind == "message_delta":
            if open_block is not None:
                raise GrammarError(f"event {i}: message_delta while block {open_index} is open")
            if "stop_reason" not in p.get("delta", {}) or "output_tokens" not in p.get("usage", {}):
                raise GrammarError(f"event {i}: message_delta needs stop_reason and usage: {p}")
        elif kind not in ("message_start", "message_stop", "ping"):
            raise GrammarError(f"event {i}: unexpected event type {kind!r}: {p}")
    if kinds[-1] != "message_stop":
        raise GrammarError(f"last event must be message_stop, got {kinds[-1]!r}")
    if kinds.count("message_start") != 1 or kinds.count("message_stop") != 1:
        raise GrammarError(f"one message_start and one message_stop expected: {kinds}")
    if kinds.count("message_delta") != 1 or kinds[-2] != "message_delta":
        raise GrammarError(f"exactly one message_delta, just before message_stop: {kinds}")
    return payloads


# ---------------------------------------------------------------------------------------------
# Gemini streamGenerateContent?alt=sse
# ---------------------------------------------------------------------------------------------


def check_gemini_stream(raw: bytes) -> list[dict[str, Any]]:
    """Checks an ``alt=sse`` stream of GenerateContentResponse events and returns them.

    Args:
        raw: the body bytes.

    Raises:
        GrammarError: a rule is broken; the message names the event.
    """
    events = parse_sse(raw)
    if not events:
        raise GrammarError("empty Gemini stream")
    payloads = []
    for i, event in enumerate(events):
        if event.event not in ("", "message"):
            raise GrammarError(f"event {i}: unexpected event name {event.event!r}")
        try:
            genai_types.GenerateContentResponse.model_validate_json(event.data)
        except pydantic.ValidationError as err:
            raise GrammarError(f"event {i} is not a GenerateContentResponse: {err}") from err
        payloads.append(event.json())
    with_candidates = [i for i, p in enumerate(payloads) if p.get("candidates")]
    finishing = [
        i for i, p in enumerate(payloads) for c in p.get("candidates", []) if c.get("finishReason")
    ]
    if not with_candidates or finishing != [with_candidates[-1]]:
        raise GrammarError(
            f"finishReason must be on the last candidate chunk only: chunks {finishing}, "
            f"candidate chunks {with_candidates}"
        )
    for i in with_candidates:
        for c in payloads[i]["candidates"]:
            content = c.get("content") or {}
            if i != finishing[0] and (content.get("role") != "model" or not content.get("parts")):
                raise GrammarError(f"event {i}: candidate without model parts: {c}")
    if not payloads[-1].get("usageMetadata"):
        raise GrammarError(f"last event must carry usageMetadata: {payloads[-1]}")
    return payloads


# ---------------------------------------------------------------------------------------------
# OpenAI Responses
# ---------------------------------------------------------------------------------------------

TERMINAL_RESPONSE_EVENTS = {"response.completed", "response.incomplete", "response.failed"}
# Events that belong to the open output item, and the item types they may appear in.
ITEM_EVENTS = {
    "response.content_part.added": {"message"},
    "response.content_part.done": {"message"},
    "response.output_text.delta": {"message"},
    "response.output_text.done": {"message"},
    "response.output_text.annotation.added": {"message"},
    "response.refusal.delta": {"message"},
    "response.refusal.done": {"message"},
    "response.function_call_arguments.delta": {"function_call"},
    "response.function_call_arguments.done": {"function_call"},
    "response.reasoning_summary_part.added": {"reasoning"},
    "response.reasoning_summary_part.done": {"reasoning"},
    "response.reasoning_summary_text.delta": {"reasoning"},
    "response.reasoning_summary_text.done": {"reasoning"},
    "response.reasoning_text.delta": {"reasoning"},
    "response.reasoning_text.done": {"reasoning"},
}


def check_responses_stream(raw: bytes) -> list[dict[str, Any]]:
    """Checks a Responses API event stream and returns its event payloads.

    Args:
        raw: the body bytes.

    Raises:
        GrammarError: a rule is broken; the message names the event.
    """
    events = parse_sse(raw)
    payloads = [e.json() for e in events]
    if not payloads:
        raise GrammarError("empty Responses stream")
    for i, (event, p) in enumerate(zip(events, payloads, strict=False)):
        if event.event and event.event != p.get("type"):
            raise GrammarError(f"event {i}: name {event.event!r} != data type {p.get('type')!r}")
        if p.get("sequence_number") != i:
            raise GrammarError(f"event {i}: sequence_number {p.get('sequence_number')}, want {i}")
    kinds = [p["type"] for p in payloads]
    if kinds[0] != "response.created":
        raise GrammarError(f"first event must be response.created, got {kinds[0]!r}")
    terminal = [i for i, k in enumerate(kinds) if k in TERMINAL_RESPONSE_EVENTS]
    if terminal != [len(kinds) - 1]:
        raise GrammarError(f"exactly one terminal event, last; got {terminal} of {len(kinds)}")
    ids = {p["response"]["id"] for p in payloads if "response" in p}
    if len(ids) != 1:
        raise GrammarError(f"events describe several responses: {ids}")

    items: list[dict[str, Any]] = []
    open_item: dict[str, Any] | None = None
    open_parts: set[int] = set()
    for i, p in enumerate(payloads):
        kind = p["type"]
        if kind == "response.output_item.added":
            if open_item is not None:
                raise GrammarError(f"event {i}: item {p['output_index']} added inside open item")
            if p.get("output_index") != len(items):
                raise GrammarError(
                    f"event {i}: output_index {p.get('output_index')}, want {len(items)}"
                )
            open_item = p["item"]
            items.append(open_item)
            if open_item["type"] == "function_call" and not (
                open_item.get("call_id") and open_item.get("name")
            ):
                raise GrammarError(f"event {i}: function_call item without call_id/name: {p}")
        elif kind == "response.output_item.done":
            if open_item is None or p.get("output_index") != len(items) - 1:
                raise GrammarError(f"event {i}: done for item {p.get('output_index')} not open")
            if open_parts:
                raise GrammarError(f"event {i}: item done with content parts {open_parts} open")
            if p["item"]["type"] != open_item["type"]:
                raise GrammarError(f"event {i}: item type changed to {p['item']['type']!r}")
            open_item = None
        elif kind in ITEM_EVENTS:
            if open_item is None or p.get("output_index") != len(items) - 1:
                raise GrammarError(f"event {i}: {kind} for item {p.get('output_index')} not open")
            if open_item["type"] not in ITEM_EVENTS[kind]:
                raise GrammarError(f"event {i}: {kind} inside a {open_item['type']} item")
            if "item_id" in p and open_item.get("id") and p["item_id"] != open_item["id"]:
                raise GrammarError(f"event {i}: item_id {p['item_id']} != {open_item['id']}")
            if kind == "response.content_part.added":
                open_parts.add(p["content_index"])
            elif kind == "response.content_part.done":
                open_parts.discard(p["content_index"])
            elif (
                kind.startswith("response.output_text") and p.get("content_index") not in open_parts
            ):
                raise GrammarError(
                    f"event {i}: text for content part {p.get('content_index')} not open"
                )
        elif kind not in ("response.created", "response.in_progress", *TERMINAL_RESPONSE_EVENTS):
            raise GrammarError(f"event {i}: unexpected event type {kind!r}")
    if open_item is not None:
        raise GrammarError(f"stream ended with item {len(items) - 1} open")
    final = payloads[-1]["response"]
    if len(final.get("output", [])) != len(items):
        raise GrammarError(
            f"final response has {len(final.get('output', []))} items, stream {len(items)}"
        )
    return payloads
