"""Anthropic Messages for the Anthropic upstream: IR requests to the wire, the upstream's
responses, streams and errors to the IR.

What Anthropic cannot express (see also `router.formats.anthropic.content`):

- JSON output: ``json_schema`` maps to ``output_config.format``; ``json_object`` (JSON without
  a schema) has no Anthropic equivalent and is a 400.
- Sampling: the current Messages API takes no ``temperature``/``top_p``/``top_k`` (they are
  absent from the anthropic SDK 2.x request types and rejected as unknown fields), so they are
  not forwarded; the client's ``max_tokens`` and stop sequences are.
- OpenAI-only options: ``service_tier`` ``auto``/``default`` map to ``auto``/``standard_only``,
  ``parallel_tool_calls: false`` to ``disable_parallel_tool_use`` and ``user`` to
  ``metadata.user_id``; the others (``n``, ``seed``, log probabilities, ``logit_bias``, the
  penalties, ``store``, ``metadata``, ``prediction``) are a 400 (`refuse_options`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

from ... import ir
from ...errors import GatewayError, InvalidRequestError, UpstreamError, error_for_status
from ..base import UpstreamFormat
from ..fields import effort_to_budget, new_id, refuse_options, split_system
from .content import ASSISTANT_BLOCKS, parse_block, render_block, render_cache

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 8192


_MIN_THINKING_BUDGET = 1024


_FINISH_FROM_WIRE: dict[str, ir.FinishReason] = {
    "end_turn": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "stop_sequence": "stop_sequence",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


_ERRORS_FROM_WIRE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
    "timeout_error": 504,
}


def render_request(request: ir.Request) -> dict:
    """Render an IR request as a Messages body.

    Args:
        request: The IR request (its ``model`` is the upstream model name).

    Raises:
        InvalidRequestError: If the request holds something Anthropic cannot express (audio,
            JSON mode without a schema, OpenAI-only options, no message), naming the field.
    """
    refuse_options(request, "Anthropic", handled=("service_tier",))
    system, messages = split_system(request.messages)
    body: dict = {"model": request.model, "max_tokens": request.max_tokens or DEFAULT_MAX_TOKENS}
    if system:
        body["system"] = [
            render_cache({"type": "text", "text": p.text}, p.cache) for p in system if p.text
        ]
    body["messages"] = [
        m
        for m in (_render_message(m, f"messages[{i}]") for i, m in enumerate(messages))
        if m["content"]
    ]
    if not body["messages"]:
        raise InvalidRequestError(
            "messages: the conversation has no user or assistant content (Anthropic needs at "
            "least one non-empty message)",
            param="messages",
        )
    if request.tools:
        body["tools"] = [_render_tool(t) for t in request.tools]
    choice = _render_tool_choice(request)
    if choice is not None:
        body["tool_choice"] = choice
    if request.stop:
        body["stop_sequences"] = request.stop
    thinking = request.reasoning is not None and request.reasoning.enabled
    if thinking:
        budget = request.reasoning.budget_tokens or effort_to_budget(request.reasoning.effort or "")
        budget = max(budget, _MIN_THINKING_BUDGET)
        body["thinking"] = {"type": "enabled", "budget_tokens": budget}
        if body["max_tokens"] <= budget:
            body["max_tokens"] = budget + body["max_tokens"]
    elif request.reasoning is not None:
        body["thinking"] = {"type": "disabled"}
    # The Messages API (anthropic SDK 2.x request types) has no sampling parameters: a
    # client's temperature/top_p/top_k are not forwarded (see the module notes).
    dropped = [k for k in ("temperature", "top_p", "top_k") if getattr(request, k) is not None]
    if dropped:
        logger.debug("not forwarding %s to Anthropic", ", ".join(dropped))
    if request.response_format is not None and request.response_format.type != "text":
        fmt = request.response_format
        if fmt.type == "json_object" or fmt.schema is None:
            raise InvalidRequestError(
                "response_format: Anthropic supports JSON output only with a JSON schema "
                "(json_schema), not json_object",
                param="response_format",
            )
        body["output_config"] = {"format": {"type": "json_schema", "schema": fmt.schema}}
    if request.user:
        body["metadata"] = {"user_id": request.user}
    if request.service_tier is not None:
        body["service_tier"] = _render_service_tier(request.service_tier)
    if request.stream:
        body["stream"] = True
    return body


# OpenAI's service tiers that Anthropic has: "auto" (priority capacity when available) and
# "default" (standard capacity only).
SERVICE_TIERS = {"auto": "auto", "default": "standard_only"}


def _render_service_tier(tier: str) -> str:
    if tier not in SERVICE_TIERS:
        raise InvalidRequestError(
            f"service_tier: Anthropic has no {tier!r} tier (only 'auto' and 'default')",
            param="service_tier",
        )
    return SERVICE_TIERS[tier]


def _render_tool_choice(request: ir.Request) -> dict | None:
    choice = request.tool_choice
    if choice is None and request.parallel_tool_calls is not False:
        return None
    if not request.tools and (choice is None or choice.mode == "none"):
        return None
    mode = choice.mode if choice is not None else "auto"
    wire: dict = {"type": {"auto": "auto", "required": "any", "none": "none", "tool": "tool"}[mode]}
    if mode == "tool":
        wire["name"] = choice.name
    if request.parallel_tool_calls is False and mode != "none":
        wire["disable_parallel_tool_use"] = True
    return wire


def _render_message(message: ir.Message, where: str) -> dict:
    if message.role == "user":
        # Anthropic wants every tool_result before any other block of the turn.
        ordered = sorted(message.parts, key=lambda p: not isinstance(p, ir.ToolResultPart))
    else:
        ordered = message.parts
    blocks = []
    for j, part in enumerate(ordered):
        block = render_block(part, f"{where}.content[{j}]")
        if block is not None:
            blocks.append(block)
    return {"role": message.role, "content": blocks}


def _render_tool(tool: ir.Tool) -> dict:
    wire: dict = {"name": tool.name, "input_schema": tool.parameters or {"type": "object"}}
    if tool.description is not None:
        wire["description"] = tool.description
    if tool.strict is not None:
        wire["strict"] = tool.strict
    return render_cache(wire, tool.cache)


def parse_response(body: dict) -> ir.Response:
    """Parse a Messages response from the upstream.

    Args:
        body: The decoded JSON response.

    Raises:
        GatewayError: For an error object inside the 200 (``overloaded_error`` a retryable
            503, ``rate_limit_error`` a 429...), so that the key pool and fallback see it.
        InvalidRequestError: If ``content`` is missing or a content block is malformed (the
            provider turns this into a 502).
    """
    if body.get("type") == "error":
        raise parse_error(body, 500)
    if not isinstance(body.get("content"), list):
        raise InvalidRequestError("the response has no content array")
    parts = [
        parse_block(b, f"content[{i}]", ASSISTANT_BLOCKS)
        for i, b in enumerate(body.get("content") or [])
        if b.get("type") in ASSISTANT_BLOCKS
    ]
    return ir.Response(
        id=body.get("id") or new_id("msg"),
        model=body.get("model") or "",
        parts=parts,
        finish_reason=_FINISH_FROM_WIRE.get(body.get("stop_reason") or "end_turn", "stop"),
        stop_sequence=body.get("stop_sequence"),
        usage=parse_usage(body.get("usage") or {}),
        created=int(time.time()),
    )


def parse_usage(raw: dict, into: ir.Usage | None = None) -> ir.Usage:
    """Read an Anthropic ``usage`` object (whose input_tokens exclude cached tokens).

    Args:
        raw: The usage object.
        into: Usage to update (stream events report usage piecewise).
    """
    usage = into or ir.Usage()
    read = raw.get("cache_read_input_tokens")
    created = raw.get("cache_creation_input_tokens")
    if read is not None:
        usage.cache_read_tokens = read
    if created is not None:
        usage.cache_creation_tokens = created
    if raw.get("input_tokens") is not None:
        usage.input_tokens = (
            raw["input_tokens"] + usage.cache_read_tokens + usage.cache_creation_tokens
        )
    if raw.get("output_tokens") is not None:
        usage.output_tokens = raw["output_tokens"]
    return usage


class StreamParser:
    """Turns the upstream's Messages stream events into IR stream events."""

    def __init__(self) -> None:
        self._index: dict[int, int] = {}
        self._usage = ir.Usage()
        self._finish: ir.FinishReason = "stop"
        self._stop_sequence: str | None = None
        self._stopped = False

    def parse_stream_event(self, name: str | None, data: dict) -> list[ir.StreamEvent]:
        """Translate one SSE event.

        Args:
            name: The SSE event name (Anthropic repeats it as ``data["type"]``).
            data: The decoded event data.

        Raises:
            GatewayError: For an ``error`` event (e.g. ``overloaded_error`` inside a 200).
        """
        kind = data.get("type") or name
        if kind == "message_start":
            message = data.get("message") or {}
            parse_usage(message.get("usage") or {}, self._usage)
            return [
                ir.StreamStart(
                    message.get("id") or new_id("msg"),
                    message.get("model") or "",
                    int(time.time()),
                    dataclasses.replace(self._usage),
                )
            ]
        if kind == "content_block_start":
            return self._start(data.get("index", 0), data.get("content_block") or {})
        if kind == "content_block_delta":
            index = self._index.get(data.get("index", 0))
            delta = data.get("delta") or {}
            if index is None:
                return []
            kinds = {"text_delta": "text", "thinking_delta": "thinking"}
            if delta.get("type") in kinds:
                return [ir.PartDelta(index, text=delta.get(kinds[delta["type"]]) or "")]
            if delta.get("type") == "signature_delta":
                return [ir.PartDelta(index, signature=delta.get("signature"))]
            if delta.get("type") == "input_json_delta":
                return [ir.PartDelta(index, arguments=delta.get("partial_json") or "")]
            return []
        if kind == "message_delta":
            delta = data.get("delta") or {}
            if delta.get("stop_reason"):
                self._finish = _FINISH_FROM_WIRE.get(delta["stop_reason"], "stop")
                self._stop_sequence = delta.get("stop_sequence")
            parse_usage(data.get("usage") or {}, self._usage)
            return []
        if kind == "message_stop":
            self._stopped = True
        elif kind == "error":
            raise parse_error(data, 500)
        return []

    def feed(self, data: dict, event: str | None = None) -> list[ir.StreamEvent]:
        """See `UpstreamStreamParser.feed`."""
        return self.parse_stream_event(event, data)

    def finish(self) -> list[ir.StreamEvent]:
        """Events at the end of the upstream stream (the single StreamEnd).

        Raises:
            UpstreamError: If the stream ended before ``message_stop`` (truncated).
        """
        if not self._stopped:
            raise UpstreamError("upstream stream ended before message_stop")
        return [ir.StreamEnd(self._finish, self._stop_sequence, self._usage)]

    def _start(self, wire_index: int, block: dict) -> list[ir.StreamEvent]:
        kind = block.get("type")
        index = len(self._index)
        if kind == "text":
            part: ir.TextPart | ir.ThinkingPart | ir.ToolCallPart = ir.TextPart("")
        elif kind == "thinking":
            # signature "" = a signature_delta will follow.
            part = ir.ThinkingPart("", "")
        elif kind == "redacted_thinking":
            part = ir.ThinkingPart(redacted_data=block.get("data") or "")
        elif kind == "tool_use":
            part = ir.ToolCallPart(block.get("id") or new_id("toolu"), block.get("name") or "", "")
        else:
            logger.warning("dropping unsupported Anthropic content block %r", kind)
            return []
        self._index[wire_index] = index
        events: list[ir.StreamEvent] = [ir.PartStart(index, part)]
        if kind == "text" and block.get("text"):
            events.append(ir.PartDelta(index, text=block["text"]))
        return events


def parse_error(data: dict, default_status: int, source: str = "anthropic") -> GatewayError:
    """Turn an Anthropic error object (body or stream event) into a router error.

    Args:
        data: ``{"type": "error", "error": {"type", "message"}}``.
        default_status: Status to assume for an unknown error type.
        source: Who sent it, named at the start of the message.
    """
    error = data.get("error") if isinstance(data.get("error"), dict) else {}
    kind = error.get("type")
    status = (
        _ERRORS_FROM_WIRE.get(kind, default_status) if isinstance(kind, str) else default_status
    )
    message = error.get("message") or json.dumps(data)
    return error_for_status(status, f"{source}: {message}", upstream_body=data)


class AnthropicUpstream(UpstreamFormat):
    """Messages as the Anthropic upstream speaks it."""

    name = "anthropic"

    render_request = staticmethod(render_request)
    parse_response = staticmethod(parse_response)
    stream_parser = staticmethod(StreamParser)
    parse_error = staticmethod(parse_error)
