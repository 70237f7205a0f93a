"""OpenAI Chat Completions for clients: requests to the IR, IR responses, streams and errors to
the wire (``POST /v1/chat/completions``).

Reasoning has no official Chat Completions field. Following DeepSeek/vLLM, reasoning text
travels as ``reasoning_content`` on messages and deltas; following LiteLLM, the complete blocks
with their signatures travel as ``thinking_blocks`` (``{"type": "thinking", "thinking",
"signature"}`` or ``{"type": "redacted_thinking", "data"}``) so that a client can send them back.
In streams, ``reasoning_content`` deltas carry the text and one ``thinking_blocks`` delta carries
each finished block with its signature. Gemini's signature on a function call travels as
``extra_content.google.thought_signature`` on the tool call, as Google's OpenAI endpoint does.
"""

from __future__ import annotations

from aiohttp import web

from ... import ir
from ...errors import GatewayError, InvalidRequestError
from ...sse import SSEEvent
from ..base import ClientCall, ClientFormat
from ..fields import append_tool_result, dump_json, field, objects
from .content import parse_assistant, parse_content, render_tool_call

_FINISH_TO_WIRE = {
    "stop": "stop",
    "stop_sequence": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "content_filter": "content_filter",
}


_ERROR_TYPES = {
    "invalid_request": ("invalid_request_error", None),
    "authentication": ("authentication_error", "invalid_api_key"),
    "permission": ("permission_error", None),
    "not_found": ("invalid_request_error", "not_found"),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "rate_limit": ("rate_limit_error", "rate_limit_exceeded"),
    "api_error": ("server_error", None),
    "overloaded": ("server_error", "overloaded"),
    "timeout": ("server_error", "timeout"),
}


# Fields of the Chat Completions API the router cannot carry: refused rather than dropped.
_UNSUPPORTED = ("audio", "web_search_options", "functions", "function_call")


def parse_request(body: dict) -> ir.Request:
    """Parse a Chat Completions request body.

    Args:
        body: The decoded JSON body.

    Raises:
        InvalidRequestError: Naming the first invalid or unsupported field.
    """
    model = field(body, "model", str, "", required=True)
    raw_messages = objects(field(body, "messages", list, "", required=True), "messages")
    if not raw_messages:
        raise InvalidRequestError("messages: must not be empty", param="messages")
    for name in _UNSUPPORTED:
        if body.get(name) is not None:
            raise InvalidRequestError(f"{name}: not supported by the router", param=name)
    if body.get("modalities") not in (None, ["text"]):
        raise InvalidRequestError("modalities: only text output is supported", param="modalities")
    stream = bool(field(body, "stream", bool, ""))
    n = field(body, "n", int, "", minimum=1, maximum=128)
    if stream and n not in (None, 1):
        raise InvalidRequestError("n: a stream carries one answer (n=1)", param="n")
    messages: list[ir.Message] = []
    tool_names: dict[str, str] = {}
    for i, raw in enumerate(raw_messages):
        _parse_message(raw, f"messages[{i}]", messages, tool_names)
    stop = field(body, "stop", (str, list), "")
    max_tokens = field(body, "max_completion_tokens", int, "", minimum=1)
    if max_tokens is None:
        max_tokens = field(body, "max_tokens", int, "", minimum=1)
    options = field(body, "stream_options", dict, "") or {}
    effort = field(body, "reasoning_effort", str, "")
    return ir.Request(
        model=model,
        messages=messages,
        tools=_parse_tools(field(body, "tools", list, "") or []),
        tool_choice=_parse_tool_choice(body.get("tool_choice")),
        parallel_tool_calls=field(body, "parallel_tool_calls", bool, ""),
        max_tokens=max_tokens,
        temperature=field(body, "temperature", float, "", minimum=0, maximum=2),
        top_p=field(body, "top_p", float, "", minimum=0, maximum=1),
        top_k=_parse_top_k(field(body, "top_k", int, "", minimum=-1)),
        stop=_parse_stop(stop),
        seed=field(body, "seed", int, ""),
        presence_penalty=field(body, "presence_penalty", float, "", minimum=-2, maximum=2),
        frequency_penalty=field(body, "frequency_penalty", float, "", minimum=-2, maximum=2),
        response_format=_parse_response_format(field(body, "response_format", dict, "")),
        reasoning=parse_effort(effort),
        stream=stream,
        include_usage=bool(field(options, "include_usage", bool, "stream_options")),
        user=field(body, "user", str, ""),
        n=n,
        logprobs=field(body, "logprobs", bool, ""),
        top_logprobs=field(body, "top_logprobs", int, "", minimum=0, maximum=20),
        logit_bias=_parse_logit_bias(field(body, "logit_bias", dict, "")),
        service_tier=field(body, "service_tier", str, ""),
        store=field(body, "store", bool, ""),
        metadata=parse_metadata(field(body, "metadata", dict, ""), "metadata"),
        prediction=_parse_prediction(field(body, "prediction", dict, "")),
    )


def _parse_top_k(top_k: int | None) -> int | None:
    """vLLM's ``top_k`` of -1 or 0 means every token: the same as none."""
    return top_k if top_k is None or top_k > 0 else None


def _parse_stop(stop: str | list | None) -> list[str]:
    if isinstance(stop, str):
        return [stop]
    for i, item in enumerate(stop or []):
        if not isinstance(item, str):
            raise InvalidRequestError(f"stop[{i}]: expected a string", param=f"stop[{i}]")
    return list(stop or [])


def _parse_logit_bias(raw: dict | None) -> dict[str, float] | None:
    if raw is None:
        return None
    for token in raw:
        field(raw, token, float, "logit_bias", required=True, minimum=-100, maximum=100)
    return raw


def parse_metadata(raw: dict | None, where: str) -> dict[str, str] | None:
    """Read OpenAI ``metadata`` (string values; Chat and Responses share it).

    Args:
        raw: The object, or None.
        where: Its path in the request.

    Raises:
        InvalidRequestError: If a value is not a string.
    """
    if raw is None:
        return None
    for key in raw:
        field(raw, key, str, where, required=True)
    return raw


def _parse_prediction(raw: dict | None) -> str | None:
    if raw is None:
        return None
    if field(raw, "type", str, "prediction", required=True) != "content":
        raise InvalidRequestError("prediction.type: expected 'content'", param="prediction.type")
    parts = parse_content(raw, "prediction", text_only=True)
    return "".join(p.text for p in parts)


def parse_effort(effort: str | None) -> ir.Reasoning | None:
    """Read an OpenAI reasoning effort (Chat's ``reasoning_effort``, Responses'
    ``reasoning.effort``); ``none`` turns reasoning off.

    Args:
        effort: The effort, or None when the request names none.
    """
    if effort is None:
        return None
    return ir.Reasoning(enabled=effort != "none", effort=effort)


def _parse_message(
    raw: dict, where: str, out: list[ir.Message], tool_names: dict[str, str]
) -> None:
    role = field(raw, "role", str, where, required=True)
    if role in ("system", "developer"):
        out.append(ir.Message("system", parse_content(raw, where, text_only=True)))
    elif role == "user":
        out.append(ir.Message("user", parse_content(raw, where, text_only=False)))
    elif role == "assistant":
        out.append(ir.Message("assistant", parse_assistant(raw, where, tool_names)))
    elif role == "tool":
        call_id = field(raw, "tool_call_id", str, where, required=True)
        if call_id not in tool_names:
            raise InvalidRequestError(
                f"{where}.tool_call_id: no assistant tool call {call_id!r} precedes this result",
                param=f"{where}.tool_call_id",
            )
        result = ir.ToolResultPart(
            call_id, tool_names.get(call_id), parse_content(raw, where, text_only=False)
        )
        append_tool_result(out, result)
    else:
        raise InvalidRequestError(f"{where}.role: unsupported role {role!r}", param=f"{where}.role")


def _parse_tools(raw: list) -> list[ir.Tool]:
    tools = []
    for i, tool in enumerate(objects(raw, "tools")):
        at = f"tools[{i}]"
        if field(tool, "type", str, at, required=True) != "function":
            raise InvalidRequestError(
                f"{at}.type: only function tools are supported", param=f"{at}.type"
            )
        fn = field(tool, "function", dict, at, required=True)
        tools.append(
            ir.Tool(
                name=field(fn, "name", str, f"{at}.function", required=True),
                description=field(fn, "description", str, f"{at}.function"),
                parameters=field(fn, "parameters", dict, f"{at}.function"),
                strict=field(fn, "strict", bool, f"{at}.function"),
            )
        )
    return tools


def _parse_tool_choice(raw: object) -> ir.ToolChoice | None:
    if raw is None:
        return None
    if raw in ("auto", "none", "required"):
        return ir.ToolChoice(raw)
    if isinstance(raw, dict) and raw.get("type") == "function":
        fn = field(raw, "function", dict, "tool_choice", required=True)
        return ir.ToolChoice("tool", field(fn, "name", str, "tool_choice.function", required=True))
    raise InvalidRequestError(
        "tool_choice: expected 'auto', 'none', 'required' or a function", param="tool_choice"
    )


def _parse_response_format(raw: dict | None) -> ir.ResponseFormat | None:
    if raw is None:
        return None
    kind = field(raw, "type", str, "response_format", required=True)
    if kind in ("text", "json_object"):
        return ir.ResponseFormat(kind)
    if kind == "json_schema":
        spec = field(raw, "json_schema", dict, "response_format", required=True)
        where = "response_format.json_schema"
        return ir.ResponseFormat(
            "json_schema",
            schema=field(spec, "schema", dict, where),
            name=field(spec, "name", str, where),
            strict=field(spec, "strict", bool, where),
        )
    raise InvalidRequestError(
        f"response_format.type: unsupported {kind!r}", param="response_format.type"
    )


def render_usage(usage: ir.Usage) -> dict:
    """Render IR usage as an OpenAI ``usage`` object.

    Args:
        usage: The IR usage.
    """
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cache_read_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def render_response(response: ir.Response, request: ir.Request) -> dict:
    """Render an IR response as a ``chat.completion`` object (one choice per answer).

    Args:
        response: The IR response.
        request: The client's request (unused by this format; kept for a uniform signature).
    """
    first = ir.Choice(response.parts, response.finish_reason, response.logprobs)
    return {
        "id": response.id,
        "object": "chat.completion",
        "created": response.created,
        "model": response.model,
        "choices": [
            _render_choice(choice, i) for i, choice in enumerate([first, *response.alternatives])
        ],
        "usage": render_usage(response.usage),
    }


def _render_choice(choice: ir.Choice, index: int) -> dict:
    message: dict = {"role": "assistant"}
    texts = [p.text for p in choice.parts if isinstance(p, ir.TextPart)]
    calls = [p for p in choice.parts if isinstance(p, ir.ToolCallPart)]
    message["content"] = "".join(texts) if texts or not calls else None
    thinking = [p for p in choice.parts if isinstance(p, ir.ThinkingPart)]
    if thinking:
        message["reasoning_content"] = "".join(p.text for p in thinking)
        message["thinking_blocks"] = [_render_thinking_block(p) for p in thinking]
    if calls:
        message["tool_calls"] = [render_tool_call(c) for c in calls]
    return {
        "index": index,
        "message": message,
        "logprobs": render_logprobs(choice.logprobs),
        "finish_reason": _FINISH_TO_WIRE[choice.finish_reason],
    }


def render_logprobs(tokens: list[ir.TokenLogprob] | None) -> dict | None:
    """Render token log probabilities as a choice's ``logprobs`` object.

    Args:
        tokens: The tokens, or None when none were asked for.
    """
    if tokens is None:
        return None
    return {"content": render_tokens(tokens), "refusal": None}


def render_tokens(tokens: list[ir.TokenLogprob]) -> list[dict]:
    """Render token log probabilities as OpenAI's list of ``{"token", "logprob", "bytes",
    "top_logprobs"}`` (Chat's ``logprobs.content``, Responses' ``output_text.logprobs``).

    Args:
        tokens: The tokens.
    """
    return [_render_token(t) for t in tokens]


def _render_token(token: ir.TokenLogprob, top: bool = True) -> dict:
    wire = {"token": token.token, "logprob": token.logprob, "bytes": token.bytes}
    if top:
        wire["top_logprobs"] = [_render_token(t, top=False) for t in token.top]
    return wire


def _render_thinking_block(part: ir.ThinkingPart) -> dict:
    if part.redacted_data is not None:
        return {"type": "redacted_thinking", "data": part.redacted_data}
    block = {"type": "thinking", "thinking": part.text}
    if part.signature is not None:
        block["signature"] = part.signature
    return block


class StreamRenderer:
    """Renders IR stream events as ``chat.completion.chunk`` SSE events.

    Args:
        request: The client's request (``include_usage`` decides the usage chunk).
    """

    def __init__(self, request: ir.Request) -> None:
        self._include_usage = request.include_usage
        self._head: dict = {}
        self._tool_index: dict[int, int] = {}
        self._thinking: dict[int, ir.ThinkingPart] = {}

    def render_stream_event(self, event: ir.StreamEvent) -> list[SSEEvent]:
        """Render one IR event.

        Args:
            event: The next IR stream event.
        """
        if isinstance(event, ir.StreamStart):
            self._head = {
                "id": event.id,
                "object": "chat.completion.chunk",
                "created": event.created,
                "model": event.model,
            }
            return [self._chunk({"role": "assistant", "content": ""})]
        if isinstance(event, ir.PartStart):
            out = self._flush_thinking()
            part = event.part
            if isinstance(part, ir.ToolCallPart):
                index = self._tool_index[event.index] = len(self._tool_index)
                call = render_tool_call(part)
                call["index"] = index
                call["function"]["arguments"] = part.arguments
                out.append(self._chunk({"tool_calls": [call]}))
            elif isinstance(part, ir.ThinkingPart):
                self._thinking[event.index] = ir.ThinkingPart(
                    part.text, part.signature, part.redacted_data
                )
                if part.text:
                    out.append(self._chunk({"reasoning_content": part.text}))
            elif part.text:
                out.append(self._chunk({"content": part.text}))
            return out
        if isinstance(event, ir.PartDelta):
            if event.index in self._tool_index:
                if not event.arguments:
                    return []
                call = {
                    "index": self._tool_index[event.index],
                    "function": {"arguments": event.arguments},
                }
                return [self._chunk({"tool_calls": [call]})]
            if event.index in self._thinking:
                block = self._thinking[event.index]
                block.text += event.text
                block.signature = event.signature or block.signature
                return [self._chunk({"reasoning_content": event.text})] if event.text else []
            if not event.text and event.logprobs is None:
                return []
            return [self._chunk({"content": event.text}, logprobs=event.logprobs)]
        out = self._flush_thinking()
        out.append(self._chunk({}, finish_reason=_FINISH_TO_WIRE[event.finish_reason]))
        if self._include_usage:
            out.append(
                SSEEvent(
                    dump_json({**self._head, "choices": [], "usage": render_usage(event.usage)})
                )
            )
        out.append(SSEEvent("[DONE]"))
        return out

    def render_error(self, err: GatewayError) -> list[SSEEvent]:
        """The in-stream error event (the OpenAI SDK raises ``APIError`` on it).

        Args:
            err: The error that ended the stream.
        """
        return [SSEEvent(dump_json(render_error(err)[1]))]

    def _flush_thinking(self) -> list[SSEEvent]:
        out = []
        for part in self._thinking.values():
            out.append(self._chunk({"thinking_blocks": [_render_thinking_block(part)]}))
        self._thinking.clear()
        return out

    def _chunk(
        self,
        delta: dict,
        finish_reason: str | None = None,
        logprobs: list[ir.TokenLogprob] | None = None,
    ) -> SSEEvent:
        choice = {
            "index": 0,
            "delta": delta,
            "logprobs": render_logprobs(logprobs),
            "finish_reason": finish_reason,
        }
        chunk = {**self._head, "choices": [choice]}
        if self._include_usage:
            chunk["usage"] = None
        return SSEEvent(dump_json(chunk))


def render_error(err: GatewayError) -> tuple[int, dict]:
    """Render an error as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``.

    Args:
        err: The error.

    Returns:
        The HTTP status and the JSON body.
    """
    kind, code = _ERROR_TYPES[err.kind]
    if err.kind == "not_found" and err.param == "model":
        code = "model_not_found"
    return err.status, {
        "error": {"message": err.message, "type": kind, "param": err.param, "code": code}
    }


class OpenAIChatClient(ClientFormat):
    """Chat Completions as a client speaks it; its model listing is also the default one."""

    name = "openai"
    paths = ("/v1/chat/completions",)

    def parse_call(self, body: dict, http: web.Request) -> ClientCall:
        """See `ClientFormat.parse_call`."""
        return ClientCall(parse_request(body))

    render_response = staticmethod(render_response)
    stream_renderer = staticmethod(StreamRenderer)
    render_error = staticmethod(render_error)

    def render_model(self, name: str) -> dict:
        """See `ClientFormat.render_model`."""
        return {"id": name, "object": "model", "created": 0, "owned_by": "router"}

    def render_models(self, names: list[str]) -> dict:
        """See `ClientFormat.render_models`."""
        return {"object": "list", "data": [self.render_model(n) for n in names]}
