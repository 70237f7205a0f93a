"""Anthropic Messages for clients (``POST /v1/messages`` and ``/v1/messages/count_tokens``):
requests to the IR, IR responses, streams and errors to the wire. Content blocks are shared
with the upstream side (`router.formats.anthropic.content`).
"""

from __future__ import annotations

import logging

from aiohttp import web

from ... import ir
from ...errors import GatewayError, InvalidRequestError, UpstreamError
from ...sse import SSEEvent, encode_event
from ..base import ClientCall, ClientFormat
from ..fields import dump_json, field, objects, parse_arguments
from .content import ASSISTANT_BLOCKS, UNSIGNED_SIGNATURE, parse_block, parse_cache, render_block

logger = logging.getLogger(__name__)

_FINISH_TO_WIRE = {
    "stop": "end_turn",
    "length": "max_tokens",
    "stop_sequence": "stop_sequence",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}


_ERROR_TYPES = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "permission": "permission_error",
    "not_found": "not_found_error",
    "request_too_large": "request_too_large",
    "rate_limit": "rate_limit_error",
    "api_error": "api_error",
    "overloaded": "overloaded_error",
    "timeout": "timeout_error",
}


def parse_request(body: dict) -> ir.Request:
    """Parse a Messages request body (also used for ``count_tokens``, where max_tokens is absent).

    Args:
        body: The decoded JSON body.

    Raises:
        InvalidRequestError: Naming the first invalid or unsupported field.
    """
    model = field(body, "model", str, "", required=True)
    raw_messages = objects(field(body, "messages", list, "", required=True), "messages")
    if not raw_messages:
        raise InvalidRequestError("messages: must not be empty", param="messages")
    messages: list[ir.Message] = []
    calls: set[str] = set()
    system = field(body, "system", (str, list), "")
    if isinstance(system, str):
        messages.append(ir.Message("system", [ir.TextPart(system)]))
    elif system:
        parts = [
            parse_block(b, f"system[{i}]", ("text",))
            for i, b in enumerate(objects(system, "system"))
        ]
        messages.append(ir.Message("system", parts))
    for i, raw in enumerate(raw_messages):
        where = f"messages[{i}]"
        role = field(raw, "role", str, where, required=True)
        if role not in ("user", "assistant"):
            raise InvalidRequestError(
                f"{where}.role: expected 'user' or 'assistant'", param=f"{where}.role"
            )
        content = field(raw, "content", (str, list), where, required=True)
        if role == "user" and not content:
            raise InvalidRequestError(
                f"{where}.content: a user message must not be empty", param=f"{where}.content"
            )
        if isinstance(content, str):
            parts = [ir.TextPart(content)]
        else:
            allowed = _USER_BLOCKS if role == "user" else ASSISTANT_BLOCKS
            parts = [
                parse_block(b, f"{where}.content[{j}]", allowed)
                for j, b in enumerate(objects(content, f"{where}.content"))
            ]
        _check_tool_results(parts, calls, where)
        messages.append(ir.Message(role, parts))
    tool_choice, parallel = _parse_tool_choice(field(body, "tool_choice", dict, ""))
    metadata = field(body, "metadata", dict, "") or {}
    tier = field(body, "service_tier", str, "")
    if tier not in (None, "auto", "standard_only"):
        raise InvalidRequestError(
            "service_tier: expected 'auto' or 'standard_only'", param="service_tier"
        )
    return ir.Request(
        model=model,
        messages=messages,
        tools=_parse_tools(field(body, "tools", list, "") or []),
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        max_tokens=field(body, "max_tokens", int, "", minimum=1),
        temperature=field(body, "temperature", float, "", minimum=0, maximum=1),
        top_p=field(body, "top_p", float, "", minimum=0, maximum=1),
        top_k=field(body, "top_k", int, "", minimum=0),
        stop=_parse_stop(field(body, "stop_sequences", list, "")),
        response_format=_parse_output_format(body),
        reasoning=_parse_thinking(field(body, "thinking", dict, "")),
        stream=bool(field(body, "stream", bool, "")),
        include_usage=True,
        user=field(metadata, "user_id", str, "metadata"),
        service_tier={"standard_only": "default"}.get(tier, tier),
    )


def _check_tool_results(parts: list, calls: set[str], where: str) -> None:
    """Record tool_use ids and refuse a tool_result that answers none of them."""
    for j, part in enumerate(parts):
        if isinstance(part, ir.ToolCallPart):
            calls.add(part.id)
        elif isinstance(part, ir.ToolResultPart) and part.call_id not in calls:
            at = f"{where}.content[{j}].tool_use_id"
            raise InvalidRequestError(
                f"{at}: no earlier tool_use has id {part.call_id!r}", param=at
            )


def _parse_stop(raw: list | None) -> list[str]:
    for i, item in enumerate(raw or []):
        if not isinstance(item, str):
            raise InvalidRequestError(
                f"stop_sequences[{i}]: expected a string", param=f"stop_sequences[{i}]"
            )
    return list(raw or [])


_USER_BLOCKS = ("text", "image", "document", "tool_result")


def _parse_tools(raw: list) -> list[ir.Tool]:
    tools = []
    for i, tool in enumerate(objects(raw, "tools")):
        at = f"tools[{i}]"
        kind = field(tool, "type", str, at)
        if kind not in (None, "custom"):
            raise InvalidRequestError(
                f"{at}.type: server tool {kind!r} is not supported by the router",
                param=f"{at}.type",
            )
        tools.append(
            ir.Tool(
                name=field(tool, "name", str, at, required=True),
                description=field(tool, "description", str, at),
                parameters=field(tool, "input_schema", dict, at, required=True),
                strict=field(tool, "strict", bool, at),
                cache=parse_cache(tool, at),
            )
        )
    return tools


def _parse_tool_choice(raw: dict | None) -> tuple[ir.ToolChoice | None, bool | None]:
    if raw is None:
        return None, None
    kind = field(raw, "type", str, "tool_choice", required=True)
    disable = field(raw, "disable_parallel_tool_use", bool, "tool_choice")
    parallel = None if disable is None else not disable
    modes = {"auto": "auto", "any": "required", "none": "none"}
    if kind in modes:
        return ir.ToolChoice(modes[kind]), parallel
    if kind == "tool":
        return ir.ToolChoice(
            "tool", field(raw, "name", str, "tool_choice", required=True)
        ), parallel
    raise InvalidRequestError(f"tool_choice.type: unsupported {kind!r}", param="tool_choice.type")


def _parse_thinking(raw: dict | None) -> ir.Reasoning | None:
    if raw is None:
        return None
    kind = field(raw, "type", str, "thinking", required=True)
    if kind == "disabled":
        return ir.Reasoning(enabled=False)
    if kind == "enabled":
        return ir.Reasoning(
            budget_tokens=field(raw, "budget_tokens", int, "thinking", required=True, minimum=1)
        )
    if kind == "adaptive":
        return ir.Reasoning()
    raise InvalidRequestError(f"thinking.type: unsupported {kind!r}", param="thinking.type")


def _parse_output_format(body: dict) -> ir.ResponseFormat | None:
    config = field(body, "output_config", dict, "") or {}
    fmt = field(config, "format", dict, "output_config") or field(body, "output_format", dict, "")
    if fmt is None:
        return None
    where = "output_config.format" if "format" in config else "output_format"
    if field(fmt, "type", str, where, required=True) != "json_schema":
        raise InvalidRequestError(f"{where}.type: expected 'json_schema'", param=f"{where}.type")
    return ir.ResponseFormat("json_schema", schema=field(fmt, "schema", dict, where, required=True))


def render_usage(usage: ir.Usage) -> dict:
    """Render IR usage the Anthropic way (input_tokens exclude cache reads and writes).

    Args:
        usage: The IR usage.
    """
    return {
        "input_tokens": max(
            0, usage.input_tokens - usage.cache_read_tokens - usage.cache_creation_tokens
        ),
        "output_tokens": usage.output_tokens,
        "cache_creation_input_tokens": usage.cache_creation_tokens,
        "cache_read_input_tokens": usage.cache_read_tokens,
    }


def render_response(response: ir.Response, request: ir.Request) -> dict:
    """Render an IR response as a Messages ``message`` object.

    Args:
        response: The IR response.
        request: The client's request (unused; uniform signature).

    Raises:
        UpstreamError: If a tool call's arguments are not a JSON object.
    """
    content = []
    for i, part in enumerate(response.parts):
        if isinstance(part, ir.ToolCallPart):
            content.append(
                {
                    "type": "tool_use",
                    "id": part.id,
                    "name": part.name,
                    "input": _upstream_arguments(part, i),
                }
            )
        else:
            block = render_block(part, f"content[{i}]", UNSIGNED_SIGNATURE)
            if block is not None:
                content.append(block)
    return {
        "id": response.id,
        "type": "message",
        "role": "assistant",
        "model": response.model,
        "content": content,
        "stop_reason": _FINISH_TO_WIRE[response.finish_reason],
        "stop_sequence": response.stop_sequence,
        "usage": render_usage(response.usage),
    }


def _upstream_arguments(part: ir.ToolCallPart, index: int) -> dict:
    try:
        return parse_arguments(part.arguments, f"content[{index}]")
    except InvalidRequestError as err:
        raise UpstreamError(f"upstream sent tool call {part.name!r} with {err.message}") from err


class StreamRenderer:
    """Renders IR stream events as the Messages SSE grammar.

    Blocks open and close strictly in index order. Text blocks open lazily on their first
    non-empty delta (an empty text block would be rejected when the client sends it back);
    a thinking block that got no signature is closed with `UNSIGNED_SIGNATURE`.

    Args:
        request: The client's request.
    """

    def __init__(self, request: ir.Request) -> None:
        self._blocks = 0
        self._open: int | None = None  # IR index of the open block
        self._block_of: dict[int, int] = {}
        self._kind: dict[int, str] = {}
        self._signed: dict[int, bool] = {}

    def render_stream_event(self, event: ir.StreamEvent) -> list[SSEEvent]:
        """Render one IR event.

        Args:
            event: The next IR stream event.
        """
        if isinstance(event, ir.StreamStart):
            message = {
                "id": event.id,
                "type": "message",
                "role": "assistant",
                "model": event.model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": render_usage(event.usage),
            }
            return [_event("message_start", {"message": message})]
        if isinstance(event, ir.PartStart):
            out = self._close()
            part = event.part
            if isinstance(part, ir.ToolCallPart):
                self._kind[event.index] = "tool"
                out += self._open_block(
                    event.index, {"type": "tool_use", "id": part.id, "name": part.name, "input": {}}
                )
                if part.arguments:
                    out += self._delta(
                        event.index, {"type": "input_json_delta", "partial_json": part.arguments}
                    )
            elif isinstance(part, ir.ThinkingPart):
                self._kind[event.index] = "thinking"
                if part.redacted_data is not None:
                    out += self._open_block(
                        event.index, {"type": "redacted_thinking", "data": part.redacted_data}
                    )
                else:
                    self._signed[event.index] = False
                    out += self._open_block(
                        event.index, {"type": "thinking", "thinking": "", "signature": ""}
                    )
                    out += self._thinking_delta(event.index, part.text, part.signature)
            else:
                self._kind[event.index] = "text"
                out += self._text(event.index, part.text)
            return out
        if isinstance(event, ir.PartDelta):
            kind = self._kind.get(event.index)
            if kind == "tool":
                if not event.arguments:
                    return []
                return self._delta(
                    event.index, {"type": "input_json_delta", "partial_json": event.arguments}
                )
            if kind == "thinking":
                return self._thinking_delta(event.index, event.text, event.signature)
            return self._text(event.index, event.text)
        out = self._close()
        usage = render_usage(event.usage)
        delta = {
            "stop_reason": _FINISH_TO_WIRE[event.finish_reason],
            "stop_sequence": event.stop_sequence,
        }
        out.append(_event("message_delta", {"delta": delta, "usage": usage}))
        out.append(_event("message_stop", {}))
        return out

    def render_error(self, err: GatewayError) -> list[SSEEvent]:
        """The in-stream ``error`` event.

        Args:
            err: The error that ended the stream.
        """
        return [SSEEvent(dump_json(render_error(err)[1]), "error")]

    def _text(self, index: int, text: str) -> list[SSEEvent]:
        if not text:
            return []
        out = []
        if index not in self._block_of:
            out += self._open_block(index, {"type": "text", "text": ""})
        return out + self._delta(index, {"type": "text_delta", "text": text})

    def _thinking_delta(self, index: int, text: str, signature: str | None) -> list[SSEEvent]:
        out = []
        if text:
            out += self._delta(index, {"type": "thinking_delta", "thinking": text})
        if signature:
            out += self._delta(index, {"type": "signature_delta", "signature": signature})
            self._signed[index] = True
        return out

    def _open_block(self, index: int, block: dict) -> list[SSEEvent]:
        self._block_of[index] = self._blocks
        self._open = index
        self._blocks += 1
        return [
            _event("content_block_start", {"index": self._block_of[index], "content_block": block})
        ]

    def _delta(self, index: int, delta: dict) -> list[SSEEvent]:
        if index != self._open:
            # Upstream interleaved parts; the block is closed, so the data cannot be placed.
            logger.warning("dropping a delta for closed content part %d", index)
            return []
        return [_event("content_block_delta", {"index": self._block_of[index], "delta": delta})]

    def _close(self) -> list[SSEEvent]:
        if self._open is None:
            return []
        index, self._open = self._open, None
        out = []
        if self._signed.get(index) is False:
            delta = {"type": "signature_delta", "signature": UNSIGNED_SIGNATURE}
            out.append(
                _event("content_block_delta", {"index": self._block_of[index], "delta": delta})
            )
        out.append(_event("content_block_stop", {"index": self._block_of[index]}))
        return out


def _event(name: str, data: dict) -> SSEEvent:
    return SSEEvent(dump_json({"type": name, **data}), name)


def render_error(err: GatewayError) -> tuple[int, dict]:
    """Render an error as Anthropic does: ``{"type": "error", "error": {"type", "message"}}``.

    Args:
        err: The error.

    Returns:
        The HTTP status (529 for overload, as Anthropic uses) and the JSON body.
    """
    status = 529 if err.kind == "overloaded" else err.status
    return status, {
        "type": "error",
        "error": {"type": _ERROR_TYPES[err.kind], "message": err.message},
    }


def parse_beta_flags(header: str) -> list[str]:
    """The flags of an ``anthropic-beta`` header (comma-separated), passed on to Anthropic.

    Args:
        header: The header's value ("" when absent).
    """
    return [flag.strip() for flag in header.split(",") if flag.strip()]


class AnthropicClient(ClientFormat):
    """Messages as a client speaks it; its keep-alive is Anthropic's own ``ping`` event, which
    its SDKs skip."""

    name = "anthropic"
    paths = ("/v1/messages", "/v1/messages/count_tokens")
    keepalive = encode_event(SSEEvent('{"type": "ping"}', "ping"))

    def parse_call(self, body: dict, http: web.Request) -> ClientCall:
        """See `ClientFormat.parse_call`; ``max_tokens`` is required except for counting.

        Raises:
            InvalidRequestError: Also for a message request without ``max_tokens``.
        """
        counting = http.path.endswith("/count_tokens")
        if not counting:
            field(body, "max_tokens", int, "", required=True)
        request = parse_request(body)
        request.anthropic_beta = parse_beta_flags(http.headers.get("anthropic-beta", ""))
        return ClientCall(request, count_tokens=counting)

    render_response = staticmethod(render_response)
    stream_renderer = staticmethod(StreamRenderer)
    render_error = staticmethod(render_error)

    def render_token_count(self, tokens: int) -> dict:
        """See `ClientFormat.render_token_count`."""
        return {"input_tokens": tokens}

    def render_model(self, name: str) -> dict:
        """See `ClientFormat.render_model`."""
        return {
            "type": "model",
            "id": name,
            "display_name": name,
            "created_at": "1970-01-01T00:00:00Z",
        }

    def render_models(self, names: list[str]) -> dict:
        """See `ClientFormat.render_models`."""
        first, last = (names[0], names[-1]) if names else (None, None)
        data = [self.render_model(n) for n in names]
        return {"data": data, "has_more": False, "first_id": first, "last_id": last}
