"""Gemini ``generateContent`` for clients (``POST /v1beta/models/{model}:{method}``, also under
``/v1/`` as google-genai 3.x sends it): requests to the IR, IR responses, streams and errors to
the wire.

Gemini's JSON is camelCase (what Google sends and google-genai writes); requests in
snake_case, which Google's proto JSON parser also accepts, are read too.

Tool-call ids: Gemini's ``functionCall.id`` is optional and ``functionResponse`` is matched by
name. Calls without an id get one (``call_<hex>``); a response without an id is matched to the
oldest unanswered call of the same name in the preceding model turn, so ids survive a round
trip and parallel calls of one function stay paired in order.
"""

from __future__ import annotations

import dataclasses
import re

from aiohttp import web

from ... import ir
from ...errors import GatewayError, InvalidRequestError, NotFoundError, UpstreamError
from ...sse import SSEEvent
from ..base import ClientCall, ClientFormat, SSEWriter, StreamWriter
from ..fields import (
    check_base64,
    dump_json,
    field,
    new_id,
    objects,
    parse_arguments,
    standard_base64,
)
from .content import render_logprobs_result, with_signature
from .schema import from_gemini_schema

_FINISH_TO_WIRE = {
    "stop": "STOP",
    "stop_sequence": "STOP",
    "tool_calls": "STOP",
    "length": "MAX_TOKENS",
    "content_filter": "SAFETY",
}


_STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


_SNAKE = re.compile(r"(?<!^)(?=[A-Z])")


def _get(
    obj: dict,
    camel: str,
    kind: type | tuple[type, ...],
    where: str,
    *,
    required: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
) -> object:
    """``field`` that accepts the camelCase name or its snake_case spelling."""
    snake = _SNAKE.sub("_", camel).lower()
    key = camel if camel in obj or snake not in obj else snake
    return field(obj, key, kind, where, required=required, minimum=minimum, maximum=maximum)


def parse_request(body: dict, model: str) -> ir.Request:
    """Parse a ``generateContent`` request body.

    Args:
        body: The decoded JSON body.
        model: The model named in the URL path (without ``models/``).

    Raises:
        InvalidRequestError: Naming the first invalid or unsupported field.
    """
    messages: list[ir.Message] = []
    system = _get(body, "systemInstruction", dict, "")
    if system is not None:
        parts = _parse_parts(system, "systemInstruction", None)
        messages.append(ir.Message("system", parts))
    pending: dict[str, list[str]] = {}
    contents = objects(_get(body, "contents", list, "", required=True), "contents")
    if not contents:
        raise InvalidRequestError("contents: must not be empty", param="contents")
    for i, content in enumerate(contents):
        where = f"contents[{i}]"
        role = field(content, "role", str, where) or "user"
        if role not in ("user", "model"):
            raise InvalidRequestError(
                f"{where}.role: expected 'user' or 'model'", param=f"{where}.role"
            )
        if role == "model":
            pending = {}
        parts = _parse_parts(content, where, pending)
        messages.append(ir.Message("assistant" if role == "model" else "user", parts))
    config = _get(body, "generationConfig", dict, "") or {}
    cw = "generationConfig"
    if _get(config, "candidateCount", int, cw) not in (None, 1):
        raise InvalidRequestError(
            f"{cw}.candidateCount: only 1 is supported", param=f"{cw}.candidateCount"
        )
    return ir.Request(
        model=model,
        messages=messages,
        tools=_parse_tools(_get(body, "tools", list, "") or []),
        tool_choice=_parse_tool_config(_get(body, "toolConfig", dict, "")),
        max_tokens=_get(config, "maxOutputTokens", int, cw, minimum=1),
        temperature=_get(config, "temperature", float, cw, minimum=0, maximum=2),
        top_p=_get(config, "topP", float, cw, minimum=0, maximum=1),
        top_k=_get(config, "topK", int, cw, minimum=0),
        stop=_parse_stop(_get(config, "stopSequences", list, cw)),
        seed=_get(config, "seed", int, cw),
        presence_penalty=_get(config, "presencePenalty", float, cw),
        frequency_penalty=_get(config, "frequencyPenalty", float, cw),
        response_format=_parse_response_format(config),
        reasoning=_parse_thinking(_get(config, "thinkingConfig", dict, cw)),
        include_usage=True,
        logprobs=_get(config, "responseLogprobs", bool, cw),
        top_logprobs=_get(config, "logprobs", int, cw, minimum=0, maximum=20),
    )


def _parse_stop(raw: list | None) -> list[str]:
    where = "generationConfig.stopSequences"
    for i, item in enumerate(raw or []):
        if not isinstance(item, str):
            raise InvalidRequestError(f"{where}[{i}]: expected a string", param=f"{where}[{i}]")
    return list(raw or [])


def _parse_parts(content: dict, where: str, pending: dict[str, list[str]] | None) -> list:
    """Parse ``content.parts``; ``pending`` pairs function calls and responses (None: system)."""
    raw_parts = objects(field(content, "parts", list, where, required=True), f"{where}.parts")
    if not raw_parts:
        raise InvalidRequestError(f"{where}.parts: must not be empty", param=f"{where}.parts")
    parts: list = []
    for j, raw in enumerate(raw_parts):
        at = f"{where}.parts[{j}]"
        signature = _get(raw, "thoughtSignature", str, at)
        if signature is not None:
            signature = standard_base64(signature)
        if "text" in raw:
            text = field(raw, "text", str, at, required=True)
            if _get(raw, "thought", bool, at):
                last = parts[-1] if parts else None
                if isinstance(last, ir.ThinkingPart) and last.signature is None:
                    # A streamed thought arrives in pieces; the block is signed as a whole.
                    last.text += text
                    last.signature = signature
                else:
                    parts.append(ir.ThinkingPart(text, signature))
            else:
                parts.append(ir.TextPart(text, signature))
            continue
        if pending is None:
            raise InvalidRequestError(f"{at}: only text parts are allowed here", param=at)
        call = _get(raw, "functionCall", dict, at)
        response = _get(raw, "functionResponse", dict, at)
        inline = _get(raw, "inlineData", dict, at)
        file_data = _get(raw, "fileData", dict, at)
        if call is not None:
            name = field(call, "name", str, f"{at}.functionCall", required=True)
            call_id = field(call, "id", str, f"{at}.functionCall") or new_id("call")
            pending.setdefault(name, []).append(call_id)
            args = field(call, "args", dict, f"{at}.functionCall") or {}
            parts.append(ir.ToolCallPart(call_id, name, dump_json(args), signature))
        elif response is not None:
            parts.append(_parse_function_response(response, f"{at}.functionResponse", pending))
        elif inline is not None:
            data = standard_base64(field(inline, "data", str, f"{at}.inlineData", required=True))
            check_base64(data, f"{at}.inlineData.data")
            media_type = _get(inline, "mimeType", str, f"{at}.inlineData", required=True)
            parts.append(ir.MediaPart(media_type, data=data))
        elif file_data is not None:
            uri = _get(file_data, "fileUri", str, f"{at}.fileData", required=True)
            media_type = _get(file_data, "mimeType", str, f"{at}.fileData") or "image/*"
            parts.append(ir.MediaPart(media_type, url=uri))
        else:
            raise InvalidRequestError(
                f"{at}: unsupported part (supported: text, inlineData, fileData, functionCall, "
                "functionResponse)",
                param=at,
            )
    return parts


def _parse_function_response(raw: dict, where: str, pending: dict[str, list[str]]) -> ir.Part:
    name = field(raw, "name", str, where, required=True)
    call_id = field(raw, "id", str, where)
    queue = pending.get(name) or []
    if call_id is None and not queue:
        raise InvalidRequestError(
            f"{where}: no unanswered functionCall named {name!r} in the preceding model turn",
            param=where,
        )
    if call_id is None:
        call_id = queue.pop(0)
    elif call_id in queue:
        queue.remove(call_id)
    response = field(raw, "response", dict, where) or {}
    is_error = set(response) == {"error"}
    value = response.get("error") if is_error else response.get("output", response)
    if set(response) - {"output", "error"}:
        value = response
    text = value if isinstance(value, str) else dump_json(value)
    return ir.ToolResultPart(call_id, name, [ir.TextPart(text)], is_error)


def _parse_tools(raw: list) -> list[ir.Tool]:
    tools = []
    for i, tool in enumerate(objects(raw, "tools")):
        at = f"tools[{i}]"
        declarations = _get(tool, "functionDeclarations", list, at)
        unknown = [k for k in tool if k not in ("functionDeclarations", "function_declarations")]
        if unknown:
            raise InvalidRequestError(
                f"{at}.{unknown[0]}: only functionDeclarations tools are supported",
                param=f"{at}.{unknown[0]}",
            )
        for j, decl in enumerate(objects(declarations or [], f"{at}.functionDeclarations")):
            dw = f"{at}.functionDeclarations[{j}]"
            schema = _get(decl, "parametersJsonSchema", dict, dw)
            if schema is None:
                schema = from_gemini_schema(_get(decl, "parameters", dict, dw))
            tools.append(
                ir.Tool(
                    name=field(decl, "name", str, dw, required=True),
                    description=field(decl, "description", str, dw),
                    parameters=schema,
                )
            )
    return tools


def _parse_tool_config(raw: dict | None) -> ir.ToolChoice | None:
    if raw is None:
        return None
    config = _get(raw, "functionCallingConfig", dict, "toolConfig") or {}
    where = "toolConfig.functionCallingConfig"
    mode = field(config, "mode", str, where) or "AUTO"
    names = _get(config, "allowedFunctionNames", list, where) or []
    if mode in ("ANY", "VALIDATED") and len(names) == 1:
        return ir.ToolChoice("tool", names[0])
    modes = {"AUTO": "auto", "ANY": "required", "NONE": "none", "VALIDATED": "auto"}
    if mode not in modes:
        raise InvalidRequestError(f"{where}.mode: unsupported {mode!r}", param=f"{where}.mode")
    return ir.ToolChoice(modes[mode])


def _parse_response_format(config: dict) -> ir.ResponseFormat | None:
    cw = "generationConfig"
    mime = _get(config, "responseMimeType", str, cw)
    schema = _get(config, "responseJsonSchema", dict, cw)
    if schema is None:
        schema = from_gemini_schema(_get(config, "responseSchema", dict, cw))
    if mime in (None, "text/plain") and schema is None:
        return None
    if mime not in (None, "application/json"):
        raise InvalidRequestError(
            f"{cw}.responseMimeType: unsupported {mime!r}", param=f"{cw}.responseMimeType"
        )
    if schema is None:
        return ir.ResponseFormat("json_object")
    return ir.ResponseFormat("json_schema", schema=schema)


def _parse_thinking(raw: dict | None) -> ir.Reasoning | None:
    if raw is None:
        return None
    where = "generationConfig.thinkingConfig"
    budget = _get(raw, "thinkingBudget", int, where)
    level = _get(raw, "thinkingLevel", str, where)
    if budget == 0:
        return ir.Reasoning(enabled=False, budget_tokens=0)
    return ir.Reasoning(
        effort=level.lower() if level else None,
        budget_tokens=budget if budget and budget > 0 else None,
    )


def render_usage(usage: ir.Usage) -> dict:
    """Render IR usage as ``usageMetadata``.

    Args:
        usage: The IR usage.
    """
    out = {
        "promptTokenCount": usage.input_tokens,
        "candidatesTokenCount": usage.output_tokens - usage.reasoning_tokens,
        "totalTokenCount": usage.total_tokens,
    }
    if usage.cache_read_tokens:
        out["cachedContentTokenCount"] = usage.cache_read_tokens
    if usage.reasoning_tokens:
        out["thoughtsTokenCount"] = usage.reasoning_tokens
    return out


def render_response(response: ir.Response, request: ir.Request) -> dict:
    """Render an IR response as a ``GenerateContentResponse``.

    Args:
        response: The IR response.
        request: The client's request (unused; uniform signature).

    Raises:
        UpstreamError: If a tool call's arguments are not a JSON object.
    """
    parts = [_render_output_part(p, i) for i, p in enumerate(response.parts)]
    candidate: dict = {
        "content": {"role": "model", "parts": [p for p in parts if p]},
        "finishReason": _FINISH_TO_WIRE[response.finish_reason],
        "index": 0,
    }
    if response.logprobs is not None:
        candidate["logprobsResult"] = render_logprobs_result(response.logprobs)
    return {
        "candidates": [candidate],
        "usageMetadata": render_usage(response.usage),
        "modelVersion": response.model,
        "responseId": response.id,
    }


def _render_output_part(part: ir.Part, index: int) -> dict | None:
    if isinstance(part, ir.TextPart):
        return with_signature({"text": part.text}, part.signature)
    if isinstance(part, ir.ThinkingPart):
        if part.redacted_data is not None:
            return None
        return with_signature({"text": part.text, "thought": True}, part.signature)
    if isinstance(part, ir.ToolCallPart):
        try:
            args = parse_arguments(part.arguments, f"parts[{index}]")
        except InvalidRequestError as err:
            raise UpstreamError(
                f"upstream sent tool call {part.name!r} with {err.message}"
            ) from err
        call = {"id": part.id, "name": part.name, "args": args}
        return with_signature({"functionCall": call}, part.signature)
    return None


class StreamRenderer:
    """Renders IR stream events as ``GenerateContentResponse`` chunks.

    Function calls are sent whole, once their arguments are complete; the last chunk carries
    ``finishReason`` and ``usageMetadata``.

    Args:
        request: The client's request.
    """

    def __init__(self, request: ir.Request) -> None:
        self._id = ""
        self._model = ""
        self._kinds: dict[int, str] = {}
        self._call: ir.ToolCallPart | None = None
        self._call_index = 0

    def render_stream_event(self, event: ir.StreamEvent) -> list[SSEEvent]:
        """Render one IR event.

        Args:
            event: The next IR stream event.

        Raises:
            UpstreamError: If a finished tool call's arguments are not a JSON object.
        """
        if isinstance(event, ir.StreamStart):
            self._id, self._model = event.id, event.model
            return []
        if isinstance(event, ir.PartStart):
            out = self._flush_call()
            part = event.part
            if isinstance(part, ir.ToolCallPart):
                self._kinds[event.index] = "tool"
                self._call = ir.ToolCallPart(part.id, part.name, part.arguments, part.signature)
                self._call_index = event.index
                return out
            self._kinds[event.index] = "thinking" if isinstance(part, ir.ThinkingPart) else "text"
            if isinstance(part, ir.ThinkingPart) and part.redacted_data is not None:
                self._kinds[event.index] = "redacted"
            elif part.text:
                out.append(self._chunk([self._text_part(event.index, part.text, None)]))
            return out
        if isinstance(event, ir.PartDelta):
            kind = self._kinds.get(event.index)
            if kind == "tool" and self._call is not None and event.index == self._call_index:
                self._call.arguments += event.arguments
                self._call.signature = event.signature or self._call.signature
                return []
            if kind in ("text", "thinking") and (event.text or event.signature or event.logprobs):
                part = self._text_part(event.index, event.text, event.signature)
                return [self._chunk([part], event.logprobs)]
            return []
        parts = []
        if self._call is not None:
            parts.append(self._render_call())
        candidate: dict = {"finishReason": _FINISH_TO_WIRE[event.finish_reason], "index": 0}
        if parts:
            candidate["content"] = {"role": "model", "parts": parts}
        return [
            SSEEvent(
                dump_json(
                    {
                        "candidates": [candidate],
                        "usageMetadata": render_usage(event.usage),
                        "modelVersion": self._model,
                        "responseId": self._id,
                    }
                )
            )
        ]

    def render_error(self, err: GatewayError) -> list[SSEEvent]:
        """The in-stream error object (Gemini streams have no dedicated error event).

        Args:
            err: The error that ended the stream.
        """
        return [SSEEvent(dump_json(render_error(err)[1]))]

    def _text_part(self, index: int, text: str, signature: str | None) -> dict:
        part: dict = {"text": text}
        if self._kinds[index] == "thinking":
            part["thought"] = True
        return with_signature(part, signature)

    def _render_call(self) -> dict:
        call = self._call
        self._call = None
        part = _render_output_part(call, self._call_index)
        return part

    def _flush_call(self) -> list[SSEEvent]:
        if self._call is None:
            return []
        return [self._chunk([self._render_call()])]

    def _chunk(self, parts: list[dict], logprobs: list[ir.TokenLogprob] | None = None) -> SSEEvent:
        candidate: dict = {"content": {"role": "model", "parts": parts}, "index": 0}
        if logprobs is not None:
            candidate["logprobsResult"] = render_logprobs_result(logprobs)
        return SSEEvent(
            dump_json(
                {"candidates": [candidate], "modelVersion": self._model, "responseId": self._id}
            )
        )


def render_error(err: GatewayError) -> tuple[int, dict]:
    """Render an error as Google does: ``{"error": {"code", "message", "status"}}``.

    Args:
        err: The error.

    Returns:
        The HTTP status and the JSON body.
    """
    return err.status, {
        "error": {
            "code": err.status,
            "message": err.message,
            "status": _STATUSES.get(err.status, "UNKNOWN"),
        }
    }


class JSONArrayWriter:
    """Gemini's stream without ``alt=sse``: one JSON array, written element by element (no
    keep-alives: a ping would corrupt the array)."""

    content_type = "application/json"
    keepalive = None

    def __init__(self) -> None:
        self._first = True

    async def write(self, out: web.StreamResponse, events: list[SSEEvent]) -> None:
        """See `StreamWriter.write`."""
        for event in events:
            prefix = b"[" if self._first else b",\r\n"
            self._first = False
            await out.write(prefix + event.data.encode())

    async def close(self, out: web.StreamResponse) -> None:
        """See `StreamWriter.close`."""
        await out.write(b"[]" if self._first else b"]")
        await out.write_eof()


class GeminiClient(ClientFormat):
    """``generateContent`` as a client speaks it: the URL names the model and the method."""

    name = "gemini"
    # google-genai 3.x defaults to API version v1.
    paths = ("/v1beta/models/{target:.+}", "/v1/models/{target:.+}")

    def parse_call(self, body: dict, http: web.Request) -> ClientCall:
        """See `ClientFormat.parse_call`: ``{model}:generateContent``,
        ``:streamGenerateContent`` (server-sent events with ``alt=sse``, else one JSON array) or
        ``:countTokens`` (of the body or its ``generateContentRequest``).

        Raises:
            NotFoundError: For a path without a method or a method not served.
        """
        model, sep, method = http.match_info["target"].rpartition(":")
        if not sep or not model:
            raise NotFoundError(f"no such endpoint: POST {http.path}")
        if method == "generateContent":
            return ClientCall(parse_request(body, model))
        if method == "streamGenerateContent":
            request = dataclasses.replace(parse_request(body, model), stream=True)
            return ClientCall(request, sse=http.query.get("alt") == "sse")
        if method == "countTokens":
            inner = body.get("generateContentRequest")
            if isinstance(inner, dict):
                body = inner
            elif "contents" not in body:
                raise InvalidRequestError("contents: field is required", param="contents")
            return ClientCall(parse_request(body, model), count_tokens=True)
        raise NotFoundError(f"unsupported Gemini method {method!r}")

    render_response = staticmethod(render_response)
    stream_renderer = staticmethod(StreamRenderer)

    def stream_writer(self, call: ClientCall) -> StreamWriter:
        """See `ClientFormat.stream_writer`."""
        return SSEWriter(self.keepalive) if call.sse else JSONArrayWriter()

    render_error = staticmethod(render_error)

    def render_token_count(self, tokens: int) -> dict:
        """See `ClientFormat.render_token_count`."""
        return {"totalTokens": tokens}

    def render_model(self, name: str) -> dict:
        """See `ClientFormat.render_model`."""
        methods = ["generateContent", "streamGenerateContent", "countTokens"]
        return {
            "name": f"models/{name}",
            "displayName": name,
            "supportedGenerationMethods": methods,
        }

    def render_models(self, names: list[str]) -> dict:
        """See `ClientFormat.render_models`."""
        return {"models": [self.render_model(n) for n in names]}
