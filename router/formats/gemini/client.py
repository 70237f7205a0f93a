"""Gemini ``generateContent`` <-> IR, for clients and for the Gemini upstream.

Gemini's JSON is camelCase (what Google sends and google-genai writes); requests in
snake_case, which Google's proto JSON parser also accepts, are read too.

Tool-call ids: Gemini's ``functionCall.id`` is optional and ``functionResponse`` is matched by
name. Calls without an id get one (``call_<hex>``); a response without an id is matched to the
oldest unanswered call of the same name in the preceding model turn, so ids survive a round
trip and parallel calls of one function stay paired in order.

Signatures: ``thoughtSignature`` on text and function-call parts is kept on the IR part. For
Gemini 3 models, a function call in the history without a signature (written by another
provider or a client that dropped it) gets Google's documented placeholder
``skip_thought_signature_validator``. Thought parts are not sent back to Gemini.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time

from .. import ir
from ..errors import GatewayError, InvalidRequestError, UpstreamError, error_for_status
from ..schema import clean_schema
from ..sse import SSEEvent
from . import (
    check_base64,
    dump_json,
    effort_to_budget,
    field,
    new_id,
    objects,
    parse_arguments,
    split_system,
    standard_base64,
)

SKIP_SIGNATURE = "skip_thought_signature_validator"
_FINISH_FROM_WIRE: dict[str, ir.FinishReason] = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}
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
    obj: dict, camel: str, kind: type | tuple[type, ...], where: str, *, required: bool = False
) -> object:
    """``field`` that accepts the camelCase name or its snake_case spelling."""
    snake = _SNAKE.sub("_", camel).lower()
    key = camel if camel in obj or snake not in obj else snake
    return field(obj, key, kind, where, required=required)


# ---- requests: wire -> IR ----------------------------------------------------------------


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
        max_tokens=_get(config, "maxOutputTokens", int, cw),
        temperature=_get(config, "temperature", float, cw),
        top_p=_get(config, "topP", float, cw),
        top_k=_get(config, "topK", int, cw),
        stop=list(_get(config, "stopSequences", list, cw) or []),
        seed=_get(config, "seed", int, cw),
        presence_penalty=_get(config, "presencePenalty", float, cw),
        frequency_penalty=_get(config, "frequencyPenalty", float, cw),
        response_format=_parse_response_format(config),
        reasoning=_parse_thinking(_get(config, "thinkingConfig", dict, cw)),
        include_usage=True,
    )


def _parse_parts(content: dict, where: str, pending: dict[str, list[str]] | None) -> list:
    """Parse ``content.parts``; ``pending`` pairs function calls and responses (None: system)."""
    raw_parts = objects(field(content, "parts", list, where, required=True), f"{where}.parts")
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
    if call_id is None:
        call_id = queue.pop(0) if queue else new_id("call")
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
                schema = _openapi_to_json_schema(_get(decl, "parameters", dict, dw))
            tools.append(
                ir.Tool(
                    name=field(decl, "name", str, dw, required=True),
                    description=field(decl, "description", str, dw),
                    parameters=schema,
                )
            )
    return tools


def _openapi_to_json_schema(schema: object) -> object:
    """Gemini's OpenAPI-style schemas may use upper-case types (``OBJECT``); JSON Schema
    wants lower case, and ``nullable`` becomes a type union."""
    if isinstance(schema, list):
        return [_openapi_to_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "type" and isinstance(value, str):
            out[key] = value.lower()
        elif key == "properties" and isinstance(value, dict):
            out[key] = {k: _openapi_to_json_schema(v) for k, v in value.items()}
        elif key in ("items", "anyOf"):
            out[key] = _openapi_to_json_schema(value)
        elif key != "nullable":
            out[key] = value
    if schema.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


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
        schema = _openapi_to_json_schema(_get(config, "responseSchema", dict, cw))
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


# ---- requests: IR -> wire (for the Gemini upstream) ------------------------------------------


def render_request(request: ir.Request) -> dict:
    """Render an IR request as a ``generateContent`` body (the model goes in the URL).

    Remote images must already be inlined (see `router.images`); only non-http URIs (Files
    API, ``gs://``) are sent as ``fileData``.

    Args:
        request: The IR request.

    Raises:
        InvalidRequestError: If a part cannot be expressed for Gemini, naming it.
    """
    system, messages = split_system(request.messages)
    body: dict = {}
    if system:
        body["systemInstruction"] = {"parts": [{"text": p.text} for p in system]}
    names = {p.id: p.name for m in messages for p in m.parts if isinstance(p, ir.ToolCallPart)}
    needs_signature = request.model.startswith("gemini-3")
    contents = []
    for i, message in enumerate(messages):
        parts = _render_parts(message, f"messages[{i}]", names)
        if message.role == "assistant" and needs_signature:
            calls = [p for p in parts if "functionCall" in p]
            if calls and not any("thoughtSignature" in p for p in calls):
                calls[0]["thoughtSignature"] = SKIP_SIGNATURE
        if parts:
            contents.append(
                {"role": "model" if message.role == "assistant" else "user", "parts": parts}
            )
    body["contents"] = contents
    if request.tools:
        body["tools"] = [
            {"functionDeclarations": [_render_tool(t, i) for i, t in enumerate(request.tools)]}
        ]
    if request.tool_choice is not None:
        choice = request.tool_choice
        config: dict = {
            "mode": {"auto": "AUTO", "none": "NONE", "required": "ANY", "tool": "ANY"}[choice.mode]
        }
        if choice.mode == "tool":
            config["allowedFunctionNames"] = [choice.name]
        body["toolConfig"] = {"functionCallingConfig": config}
    generation = _render_generation_config(request)
    if generation:
        body["generationConfig"] = generation
    return body


def _render_generation_config(request: ir.Request) -> dict:
    config: dict = {}
    for key, value in (
        ("maxOutputTokens", request.max_tokens),
        ("temperature", request.temperature),
        ("topP", request.top_p),
        ("topK", request.top_k),
        ("seed", request.seed),
        ("presencePenalty", request.presence_penalty),
        ("frequencyPenalty", request.frequency_penalty),
    ):
        if value is not None:
            config[key] = value
    if request.stop:
        config["stopSequences"] = request.stop
    fmt = request.response_format
    if fmt is not None and fmt.type != "text":
        config["responseMimeType"] = "application/json"
        if fmt.schema is not None:
            config["responseSchema"] = clean_schema(fmt.schema, "response_format.schema")
    reasoning = request.reasoning
    if reasoning is not None:
        if not reasoning.enabled:
            # Only a Gemini client's own budget 0 is sent: models that cannot turn thinking
            # off (2.5 Pro, 3) reject it, and their default is always valid.
            if reasoning.budget_tokens == 0:
                config["thinkingConfig"] = {"thinkingBudget": 0}
        else:
            budget = reasoning.budget_tokens or effort_to_budget(reasoning.effort or "")
            config["thinkingConfig"] = {"includeThoughts": True, "thinkingBudget": budget}
    return config


def _render_parts(message: ir.Message, where: str, names: dict[str, str]) -> list[dict]:
    parts = []
    # Thought parts are not sent back; a signature on one belongs on the part after it,
    # where Gemini put it (see StreamParser).
    carried: str | None = None
    for j, part in enumerate(message.parts):
        at = f"{where}.content[{j}]"
        if isinstance(part, ir.ThinkingPart):
            carried = part.signature or carried
            continue
        if isinstance(part, ir.TextPart) and not part.text and not part.signature:
            continue
        if isinstance(part, ir.TextPart | ir.ToolCallPart) and carried and not part.signature:
            part = dataclasses.replace(part, signature=carried)
        carried = None
        if isinstance(part, ir.TextPart):
            if part.text or part.signature:
                parts.append(_with_signature({"text": part.text}, part.signature))
        elif isinstance(part, ir.MediaPart):
            parts.append(_render_media(part, at))
        elif isinstance(part, ir.ToolCallPart):
            call = {"id": part.id, "name": part.name, "args": parse_arguments(part.arguments, at)}
            parts.append(_with_signature({"functionCall": call}, part.signature))
        elif isinstance(part, ir.ToolResultPart):
            parts.extend(_render_tool_result(part, at, names))
    return parts


def _render_tool_result(part: ir.ToolResultPart, where: str, names: dict[str, str]) -> list:
    name = part.name or names.get(part.call_id)
    if name is None:
        raise InvalidRequestError(
            f"{where}: tool result for unknown call id {part.call_id!r} (Gemini needs the "
            "function name)",
            param=where,
        )
    text = "".join(p.text for p in part.content if isinstance(p, ir.TextPart))
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if isinstance(value, dict) and not part.is_error:
        response = value
    else:
        response = {"error" if part.is_error else "output": value}
    out = [{"functionResponse": {"id": part.call_id, "name": name, "response": response}}]
    # Images a tool returned travel as parts of the same user turn.
    out += [_render_media(p, where) for p in part.content if isinstance(p, ir.MediaPart)]
    return out


def _render_media(part: ir.MediaPart, where: str) -> dict:
    if part.data is not None:
        return {"inlineData": {"mimeType": part.media_type, "data": part.data}}
    if part.url.startswith(("http://", "https://")):
        raise InvalidRequestError(f"{where}: remote URL was not inlined for Gemini", param=where)
    return {"fileData": {"mimeType": part.media_type, "fileUri": part.url}}


def _with_signature(part: dict, signature: str | None) -> dict:
    if signature:
        part["thoughtSignature"] = signature
    return part


def _render_tool(tool: ir.Tool, index: int) -> dict:
    decl: dict = {"name": tool.name}
    if tool.description is not None:
        decl["description"] = tool.description
    if tool.parameters and tool.parameters.get("properties"):
        decl["parameters"] = clean_schema(tool.parameters, f"tools[{index}].parameters")
    return decl


# ---- responses ------------------------------------------------------------------------------


def parse_response(body: dict) -> ir.Response:
    """Parse a ``GenerateContentResponse`` from the upstream.

    Args:
        body: The decoded JSON response.

    Raises:
        InvalidRequestError: If a part is malformed.
    """
    parser = StreamParser()
    events = parser.parse_stream_event(body) + parser.finish()
    return ir.collect_stream(events)


def parse_usage(raw: dict) -> ir.Usage:
    """Read ``usageMetadata`` (Gemini counts thoughts apart from candidates).

    Args:
        raw: The usage metadata.
    """
    thoughts = raw.get("thoughtsTokenCount") or 0
    return ir.Usage(
        input_tokens=(raw.get("promptTokenCount") or 0) + (raw.get("toolUsePromptTokenCount") or 0),
        output_tokens=(raw.get("candidatesTokenCount") or 0) + thoughts,
        cache_read_tokens=raw.get("cachedContentTokenCount") or 0,
        reasoning_tokens=thoughts,
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
    return {
        "candidates": [candidate],
        "usageMetadata": render_usage(response.usage),
        "modelVersion": response.model,
        "responseId": response.id,
    }


def _render_output_part(part: ir.Part, index: int) -> dict | None:
    if isinstance(part, ir.TextPart):
        return _with_signature({"text": part.text}, part.signature)
    if isinstance(part, ir.ThinkingPart):
        if part.redacted_data is not None:
            return None
        return _with_signature({"text": part.text, "thought": True}, part.signature)
    if isinstance(part, ir.ToolCallPart):
        try:
            args = parse_arguments(part.arguments, f"parts[{index}]")
        except InvalidRequestError as err:
            raise UpstreamError(
                f"upstream sent tool call {part.name!r} with {err.message}"
            ) from err
        call = {"id": part.id, "name": part.name, "args": args}
        return _with_signature({"functionCall": call}, part.signature)
    return None


# ---- streams --------------------------------------------------------------------------------


class StreamParser:
    """Turns the upstream's stream of ``GenerateContentResponse`` chunks into IR events.

    Text in each chunk is a delta; a function call always arrives whole in one part.
    """

    def __init__(self) -> None:
        self._started = False
        self._parts = 0
        self._open: str | None = None
        self._had_calls = False
        self._finish: ir.FinishReason | None = None
        self._usage = ir.Usage()

    def parse_stream_event(self, chunk: dict) -> list[ir.StreamEvent]:
        """Translate one chunk.

        Args:
            chunk: A decoded ``GenerateContentResponse``.

        Raises:
            GatewayError: If the chunk is an error object.
        """
        if "error" in chunk:
            raise parse_error(chunk, 500)
        events: list[ir.StreamEvent] = []
        if chunk.get("usageMetadata"):
            self._usage = parse_usage(chunk["usageMetadata"])
        if not self._started:
            # Gemini reports the prompt's tokens on every chunk, so the start carries them.
            self._started = True
            events.append(
                ir.StreamStart(
                    chunk.get("responseId") or new_id("resp"),
                    chunk.get("modelVersion") or "",
                    int(time.time()),
                    dataclasses.replace(self._usage, output_tokens=0, reasoning_tokens=0),
                )
            )
        if not chunk.get("candidates") and (chunk.get("promptFeedback") or {}).get("blockReason"):
            self._finish = "content_filter"
        for candidate in chunk.get("candidates") or []:
            if candidate.get("index", 0) != 0:
                continue
            for j, part in enumerate((candidate.get("content") or {}).get("parts") or []):
                events += self._part(part, j)
            reason = candidate.get("finishReason")
            if reason and reason != "FINISH_REASON_UNSPECIFIED":
                self._finish = _FINISH_FROM_WIRE.get(reason, "stop")
        return events

    def finish(self) -> list[ir.StreamEvent]:
        """Events at the end of the upstream stream (the single StreamEnd).

        Raises:
            UpstreamError: If no chunk carried a ``finishReason`` (a truncated stream).
        """
        finish = self._finish
        if finish is None:
            raise UpstreamError("upstream stream ended without a finishReason")
        if finish == "stop" and self._had_calls:
            finish = "tool_calls"
        return [ir.StreamEnd(finish, usage=self._usage)]

    def _part(self, part: dict, position: int) -> list[ir.StreamEvent]:
        signature = part.get("thoughtSignature")
        events: list[ir.StreamEvent] = []
        if signature and self._open == "thinking" and not part.get("thought"):
            # Gemini signs the part after its thoughts (text or function call); most client
            # formats carry a signature only on the reasoning block, so it moves there (and
            # back onto the following part when rendered for Gemini).
            events.append(ir.PartDelta(self._parts - 1, signature=signature))
            signature = None
        if "functionCall" in part:
            call = part["functionCall"]
            index = self._parts
            self._parts += 1
            self._open = None
            self._had_calls = True
            tool = ir.ToolCallPart(
                call.get("id") or new_id("call"), call.get("name") or "", "", signature
            )
            return events + [
                ir.PartStart(index, tool),
                ir.PartDelta(index, arguments=dump_json(call.get("args") or {})),
            ]
        if "text" not in part:
            where = f"candidates[0].content.parts[{position}]"
            raise InvalidRequestError(f"{where}: unsupported Gemini output part {sorted(part)}")
        kind = "thinking" if part.get("thought") else "text"
        if self._open != kind:
            start = ir.ThinkingPart("") if kind == "thinking" else ir.TextPart("")
            events.append(ir.PartStart(self._parts, start))
            self._parts += 1
            self._open = kind
        if part["text"] or signature:
            events.append(ir.PartDelta(self._parts - 1, text=part["text"], signature=signature))
        return events


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
            if kind in ("text", "thinking") and (event.text or event.signature):
                return [self._chunk([self._text_part(event.index, event.text, event.signature)])]
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
        return _with_signature(part, signature)

    def _render_call(self) -> dict:
        call = self._call
        self._call = None
        part = _render_output_part(call, self._call_index)
        return part

    def _flush_call(self) -> list[SSEEvent]:
        if self._call is None:
            return []
        return [self._chunk([self._render_call()])]

    def _chunk(self, parts: list[dict]) -> SSEEvent:
        candidate = {"content": {"role": "model", "parts": parts}, "index": 0}
        return SSEEvent(
            dump_json(
                {"candidates": [candidate], "modelVersion": self._model, "responseId": self._id}
            )
        )


# ---- errors ---------------------------------------------------------------------------------


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


def parse_error(data: dict, default_status: int) -> GatewayError:
    """Turn a Google error object into a router error.

    Args:
        data: ``{"error": {"code", "message", "status"}}``.
        default_status: Status to assume if the object has no code.
    """
    error = data.get("error") or {}
    status = error.get("code") if isinstance(error.get("code"), int) else default_status
    return error_for_status(status, f"gemini: {error.get('message') or json.dumps(data)}")
