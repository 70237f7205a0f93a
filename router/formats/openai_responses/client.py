"""OpenAI Responses API (``POST /v1/responses``) for clients: requests to the IR, IR responses,
streams and errors to the wire (the router does not speak it upstream).

The router is stateless: ``previous_response_id`` and stored items are not supported (a 400);
clients send the whole conversation as ``input`` items. Reasoning is rendered as ``reasoning``
items whose ``summary`` holds the reasoning text and whose ``encrypted_content`` holds the
provider's signature, so sending the items back preserves it. Only function tools.
"""

from __future__ import annotations

import time

from aiohttp import web

from ... import ir
from ...errors import GatewayError, InvalidRequestError
from ...sse import SSEEvent
from ..base import ClientCall
from ..fields import append_tool_result, dump_json, field, new_id, objects, parse_data_url
from ..openai.client import OpenAIChatClient, parse_effort, parse_metadata, render_tokens
from ..openai.client import render_error as _render_openai_error

_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


# ---- requests -------------------------------------------------------------------------------


def parse_request(body: dict) -> ir.Request:
    """Parse a Responses request body.

    Args:
        body: The decoded JSON body.

    Raises:
        InvalidRequestError: Naming the first invalid or unsupported field.
    """
    model = field(body, "model", str, "", required=True)
    if body.get("previous_response_id") is not None:
        raise InvalidRequestError(
            "previous_response_id: the router is stateless; send the full input instead",
            param="previous_response_id",
        )
    messages: list[ir.Message] = []
    instructions = field(body, "instructions", str, "")
    if instructions:
        messages.append(ir.Message("system", [ir.TextPart(instructions)]))
    raw_input = field(body, "input", (str, list), "", required=True)
    if not raw_input:
        raise InvalidRequestError("input: must not be empty", param="input")
    if isinstance(raw_input, str):
        messages.append(ir.Message("user", [ir.TextPart(raw_input)]))
    else:
        names: dict[str, str] = {}
        for i, item in enumerate(objects(raw_input, "input")):
            _parse_item(item, f"input[{i}]", messages, names)
    text = field(body, "text", dict, "") or {}
    reasoning = field(body, "reasoning", dict, "") or {}
    effort = field(reasoning, "effort", str, "reasoning")
    include = field(body, "include", list, "") or []
    top_logprobs = field(body, "top_logprobs", int, "", minimum=0, maximum=20)
    return ir.Request(
        model=model,
        messages=messages,
        tools=_parse_tools(field(body, "tools", list, "") or []),
        tool_choice=_parse_tool_choice(body.get("tool_choice")),
        parallel_tool_calls=field(body, "parallel_tool_calls", bool, ""),
        max_tokens=field(body, "max_output_tokens", int, "", minimum=1),
        temperature=field(body, "temperature", float, "", minimum=0, maximum=2),
        top_p=field(body, "top_p", float, "", minimum=0, maximum=1),
        response_format=_parse_format(field(text, "format", dict, "text")),
        reasoning=parse_effort(effort),
        stream=bool(field(body, "stream", bool, "")),
        include_usage=True,
        user=field(body, "user", str, ""),
        # Asked for with ``include: ["message.output_text.logprobs"]`` or ``top_logprobs``.
        logprobs=True if _LOGPROBS in include or top_logprobs else None,
        top_logprobs=top_logprobs,
        service_tier=field(body, "service_tier", str, ""),
        store=field(body, "store", bool, ""),
        metadata=parse_metadata(field(body, "metadata", dict, ""), "metadata"),
    )


_LOGPROBS = "message.output_text.logprobs"


def _append(messages: list[ir.Message], role: str, part: ir.Part) -> None:
    """Add a part to the last message if it has the same role, else start a message."""
    if messages and messages[-1].role == role:
        messages[-1].parts.append(part)
    else:
        messages.append(ir.Message(role, [part]))


def _parse_item(item: dict, where: str, messages: list[ir.Message], names: dict[str, str]) -> None:
    kind = field(item, "type", str, where) or "message"
    if kind == "message":
        role = field(item, "role", str, where, required=True)
        if role not in ("user", "assistant", "system", "developer"):
            raise InvalidRequestError(
                f"{where}.role: unsupported role {role!r}", param=f"{where}.role"
            )
        role = "system" if role == "developer" else role
        content = field(item, "content", (str, list), where, required=True)
        parts = (
            [ir.TextPart(content)]
            if isinstance(content, str)
            else [
                _parse_content(c, f"{where}.content[{j}]")
                for j, c in enumerate(objects(content, f"{where}.content"))
            ]
        )
        if role == "assistant":
            # An assistant turn is a run of items (reasoning, message, function_call).
            for part in parts:
                _append(messages, role, part)
        else:
            messages.append(ir.Message(role, parts))
    elif kind == "function_call":
        call_id = field(item, "call_id", str, where, required=True)
        name = field(item, "name", str, where, required=True)
        names[call_id] = name
        arguments = field(item, "arguments", str, where, required=True)
        _append(messages, "assistant", ir.ToolCallPart(call_id, name, arguments))
    elif kind == "function_call_output":
        call_id = field(item, "call_id", str, where, required=True)
        if call_id not in names:
            raise InvalidRequestError(
                f"{where}.call_id: no earlier function_call has call_id {call_id!r}",
                param=f"{where}.call_id",
            )
        output = field(item, "output", (str, list), where, required=True)
        content = (
            [ir.TextPart(output)]
            if isinstance(output, str)
            else [
                _parse_content(c, f"{where}.output[{j}]")
                for j, c in enumerate(objects(output, f"{where}.output"))
            ]
        )
        append_tool_result(messages, ir.ToolResultPart(call_id, names.get(call_id), content))
    elif kind == "reasoning":
        summary = objects(field(item, "summary", list, where) or [], f"{where}.summary")
        text = "".join(field(s, "text", str, f"{where}.summary") or "" for s in summary)
        secret = field(item, "encrypted_content", str, where)
        # Without a summary, the opaque content is a redacted thinking block.
        part = (
            ir.ThinkingPart(text, secret)
            if summary or secret is None
            else ir.ThinkingPart(redacted_data=secret)
        )
        _append(messages, "assistant", part)
    else:
        raise InvalidRequestError(
            f"{where}.type: unsupported input item {kind!r}", param=f"{where}.type"
        )


def _parse_content(item: dict, where: str) -> ir.TextPart | ir.MediaPart:
    kind = field(item, "type", str, where, required=True)
    if kind in ("input_text", "output_text"):
        return ir.TextPart(field(item, "text", str, where, required=True))
    if kind == "input_image":
        url = field(item, "image_url", str, where)
        if url is None:
            raise InvalidRequestError(
                f"{where}.image_url: required (file_id is not supported)",
                param=f"{where}.image_url",
            )
        if url.startswith("data:"):
            media_type, data = parse_data_url(url, f"{where}.image_url")
            return ir.MediaPart(media_type, data=data)
        return ir.MediaPart("image/*", url=url)
    if kind == "input_file":
        data_url = field(item, "file_data", str, where)
        if data_url is None:
            raise InvalidRequestError(
                f"{where}.file_data: required (file_id is not supported)",
                param=f"{where}.file_data",
            )
        media_type, data = parse_data_url(data_url, f"{where}.file_data")
        return ir.MediaPart(media_type, data=data, filename=field(item, "filename", str, where))
    raise InvalidRequestError(
        f"{where}.type: unsupported content type {kind!r}", param=f"{where}.type"
    )


def _parse_tools(raw: list) -> list[ir.Tool]:
    tools = []
    for i, tool in enumerate(objects(raw, "tools")):
        at = f"tools[{i}]"
        if field(tool, "type", str, at, required=True) != "function":
            raise InvalidRequestError(
                f"{at}.type: only function tools are supported", param=f"{at}.type"
            )
        tools.append(
            ir.Tool(
                name=field(tool, "name", str, at, required=True),
                description=field(tool, "description", str, at),
                parameters=field(tool, "parameters", dict, at),
                strict=field(tool, "strict", bool, at),
            )
        )
    return tools


def _parse_tool_choice(raw: object) -> ir.ToolChoice | None:
    if raw is None:
        return None
    if raw in ("auto", "none", "required"):
        return ir.ToolChoice(raw)
    if isinstance(raw, dict) and raw.get("type") == "function":
        return ir.ToolChoice("tool", field(raw, "name", str, "tool_choice", required=True))
    raise InvalidRequestError(
        "tool_choice: expected 'auto', 'none', 'required' or a function", param="tool_choice"
    )


def _parse_format(raw: dict | None) -> ir.ResponseFormat | None:
    if raw is None:
        return None
    kind = field(raw, "type", str, "text.format", required=True)
    if kind in ("text", "json_object"):
        return ir.ResponseFormat(kind)
    if kind == "json_schema":
        return ir.ResponseFormat(
            "json_schema",
            schema=field(raw, "schema", dict, "text.format"),
            name=field(raw, "name", str, "text.format"),
            strict=field(raw, "strict", bool, "text.format"),
        )
    raise InvalidRequestError(f"text.format.type: unsupported {kind!r}", param="text.format.type")


# ---- responses ------------------------------------------------------------------------------


def _usage(usage: ir.Usage) -> dict:
    return {
        "input_tokens": usage.input_tokens,
        "input_tokens_details": {"cached_tokens": usage.cache_read_tokens},
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


def _envelope(
    response_id: str,
    model: str,
    created: int,
    request: ir.Request,
    status: str,
    output: list,
    usage: dict | None,
    finish: ir.FinishReason | None,
) -> dict:
    incomplete = _INCOMPLETE.get(finish) if finish else None
    choice = request.tool_choice
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": "incomplete" if incomplete else status,
        "error": None,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "instructions": None,
        "max_output_tokens": request.max_tokens,
        "model": model,
        "output": output,
        "parallel_tool_calls": request.parallel_tool_calls is not False,
        "previous_response_id": None,
        "reasoning": {
            "effort": request.reasoning.effort if request.reasoning else None,
            "summary": None,
        },
        "store": bool(request.store),
        "temperature": request.temperature,
        "text": {"format": {"type": "text"}},
        "tool_choice": (
            {"type": "function", "name": choice.name}
            if choice and choice.mode == "tool"
            else (choice.mode if choice else "auto")
        ),
        "tools": [
            {
                "type": "function",
                "name": t.name,
                "description": t.description,
                "parameters": t.parameters,
                "strict": t.strict,
            }
            for t in request.tools
        ],
        "top_p": request.top_p,
        "truncation": "disabled",
        "usage": usage,
        "user": request.user,
        "metadata": request.metadata or {},
    }


def _item(
    part: ir.Part, item_id: str, logprobs: list[ir.TokenLogprob] | None = None
) -> dict | None:
    if isinstance(part, ir.TextPart):
        return {
            "type": "message",
            "id": item_id,
            "status": "completed",
            "role": "assistant",
            "content": [_text_content(part.text, logprobs)],
        }
    if isinstance(part, ir.ToolCallPart):
        return {
            "type": "function_call",
            "id": item_id,
            "call_id": part.id,
            "name": part.name,
            "arguments": part.arguments,
            "status": "completed",
        }
    if isinstance(part, ir.ThinkingPart):
        item = {
            "type": "reasoning",
            "id": item_id,
            "summary": [{"type": "summary_text", "text": part.text}] if part.text else [],
        }
        secret = part.signature or part.redacted_data
        if secret:
            item["encrypted_content"] = secret
        return item
    return None


def _text_content(text: str, logprobs: list[ir.TokenLogprob] | None = None) -> dict:
    tokens = render_tokens(logprobs or [])
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": tokens}


def _item_id(part: ir.Part) -> str:
    prefix = {ir.TextPart: "msg", ir.ToolCallPart: "fc", ir.ThinkingPart: "rs"}[type(part)]
    return new_id(prefix)


def render_response(response: ir.Response, request: ir.Request) -> dict:
    """Render an IR response as a Responses ``response`` object.

    Args:
        response: The IR response.
        request: The client's request (echoed in the envelope as OpenAI does).
    """
    # The answer's token log probabilities belong to its first text item.
    texts = [i for i, p in enumerate(response.parts) if isinstance(p, ir.TextPart)]
    output = [
        _item(p, _item_id(p), response.logprobs if texts[:1] == [i] else None)
        for i, p in enumerate(response.parts)
    ]
    return _envelope(
        _response_id(response.id),
        response.model,
        response.created,
        request,
        "completed",
        [o for o in output if o],
        _usage(response.usage),
        response.finish_reason,
    )


def _response_id(upstream_id: str) -> str:
    return upstream_id if upstream_id.startswith("resp_") else f"resp_{upstream_id}"


class StreamRenderer:
    """Renders IR stream events as Responses streaming events with sequence numbers.

    Args:
        request: The client's request.
    """

    def __init__(self, request: ir.Request) -> None:
        self._request = request
        self._seq = 0
        self._id = ""
        self._model = ""
        self._created = int(time.time())
        self._output: list[dict] = []
        self._current: tuple[int, ir.Part, str] | None = None  # (IR index, part, item id)
        self._tokens: list[ir.TokenLogprob] = []  # the current text item's log probabilities

    def render_stream_event(self, event: ir.StreamEvent) -> list[SSEEvent]:
        """Render one IR event.

        Args:
            event: The next IR stream event.
        """
        if isinstance(event, ir.StreamStart):
            self._id, self._model = _response_id(event.id), event.model
            self._created = event.created or self._created
            head = self._head("in_progress", None, None)
            return [
                self._event("response.created", response=head),
                self._event("response.in_progress", response=head),
            ]
        if isinstance(event, ir.PartStart):
            out = self._finish_item()
            part = event.part
            copy = (
                ir.ToolCallPart(part.id, part.name, part.arguments, part.signature)
                if isinstance(part, ir.ToolCallPart)
                else ir.ThinkingPart(part.text, part.signature, part.redacted_data)
                if isinstance(part, ir.ThinkingPart)
                else ir.TextPart(part.text)
            )
            item_id = _item_id(copy)
            self._current = (event.index, copy, item_id)
            return out + self._start_item(copy, item_id)
        if isinstance(event, ir.PartDelta):
            if self._current is None or self._current[0] != event.index:
                return []
            return self._delta(event)
        out = self._finish_item()
        body = self._head("completed", _usage(event.usage), event.finish_reason)
        name = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
        return out + [self._event(name, response=body)]

    def render_error(self, err: GatewayError) -> list[SSEEvent]:
        """The ``error`` event, then the terminal ``response.failed`` as OpenAI ends a failed
        stream (the SDK's stream helper needs a terminal event).

        Args:
            err: The error that ended the stream.
        """
        error = _render_openai_error(err)[1]["error"]
        code = error["code"] or error["type"]
        failed = self._head("failed", None, None)
        failed["error"] = {"code": code, "message": error["message"]}
        return [
            self._event("error", code=code, message=error["message"], param=error["param"]),
            self._event("response.failed", response=failed),
        ]

    def _head(self, status: str, usage: dict | None, finish: ir.FinishReason | None) -> dict:
        return _envelope(
            self._id,
            self._model,
            self._created,
            self._request,
            status,
            list(self._output),
            usage,
            finish,
        )

    def _event(self, event_type: str, **data: object) -> SSEEvent:
        payload = {"type": event_type, "sequence_number": self._seq, **data}
        self._seq += 1
        return SSEEvent(dump_json(payload), event_type)

    def _start_item(self, part: ir.Part, item_id: str) -> list[SSEEvent]:
        index = len(self._output)
        item = _item(part, item_id)
        item["status"] = "in_progress"
        if isinstance(part, ir.TextPart):
            item["content"] = []
        elif isinstance(part, ir.ToolCallPart):
            item["arguments"] = ""
        else:
            item["summary"] = []
            item.pop("encrypted_content", None)
            item.pop("status")
        out = [self._event("response.output_item.added", output_index=index, item=item)]
        if isinstance(part, ir.TextPart):
            out.append(
                self._event(
                    "response.content_part.added",
                    item_id=item_id,
                    output_index=index,
                    content_index=0,
                    part=_text_content(""),
                )
            )
            if part.text:
                part.text, first = "", part.text
                out += self._delta(ir.PartDelta(self._current[0], text=first))
        elif isinstance(part, ir.ThinkingPart) and part.redacted_data is None:
            out.append(
                self._event(
                    "response.reasoning_summary_part.added",
                    item_id=item_id,
                    output_index=index,
                    summary_index=0,
                    part={"type": "summary_text", "text": ""},
                )
            )
        return out

    def _delta(self, event: ir.PartDelta) -> list[SSEEvent]:
        _, part, item_id = self._current
        index = len(self._output)
        if isinstance(part, ir.ToolCallPart):
            part.arguments += event.arguments
            if not event.arguments:
                return []
            return [
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item_id,
                    output_index=index,
                    delta=event.arguments,
                )
            ]
        if isinstance(part, ir.ThinkingPart):
            part.signature = event.signature or part.signature
            part.text += event.text
            if not event.text:
                return []
            return [
                self._event(
                    "response.reasoning_summary_text.delta",
                    item_id=item_id,
                    output_index=index,
                    summary_index=0,
                    delta=event.text,
                )
            ]
        part.text += event.text
        self._tokens += event.logprobs or []
        if not event.text and not event.logprobs:
            return []
        return [
            self._event(
                "response.output_text.delta",
                item_id=item_id,
                output_index=index,
                content_index=0,
                delta=event.text,
                logprobs=render_tokens(event.logprobs or []),
            )
        ]

    def _finish_item(self) -> list[SSEEvent]:
        if self._current is None:
            return []
        _, part, item_id = self._current
        self._current = None
        index = len(self._output)
        out = []
        if isinstance(part, ir.TextPart):
            out.append(
                self._event(
                    "response.output_text.done",
                    item_id=item_id,
                    output_index=index,
                    content_index=0,
                    text=part.text,
                    logprobs=render_tokens(self._tokens),
                )
            )
            out.append(
                self._event(
                    "response.content_part.done",
                    item_id=item_id,
                    output_index=index,
                    content_index=0,
                    part=_text_content(part.text, self._tokens),
                )
            )
        elif isinstance(part, ir.ToolCallPart):
            part.arguments = part.arguments or "{}"
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item_id,
                    output_index=index,
                    name=part.name,
                    arguments=part.arguments,
                )
            )
        elif part.redacted_data is None:
            out.append(
                self._event(
                    "response.reasoning_summary_text.done",
                    item_id=item_id,
                    output_index=index,
                    summary_index=0,
                    text=part.text,
                )
            )
            out.append(
                self._event(
                    "response.reasoning_summary_part.done",
                    item_id=item_id,
                    output_index=index,
                    summary_index=0,
                    part={"type": "summary_text", "text": part.text},
                )
            )
        item = _item(part, item_id, self._tokens if isinstance(part, ir.TextPart) else None)
        self._tokens = []
        self._output.append(item)
        out.append(self._event("response.output_item.done", output_index=index, item=item))
        return out


def render_error(err: GatewayError) -> tuple[int, dict]:
    """Errors on ``/v1/responses`` have the Chat Completions shape.

    Args:
        err: The error.

    Returns:
        The HTTP status and the JSON body.
    """
    return _render_openai_error(err)


class OpenAIResponsesClient(OpenAIChatClient):
    """The Responses API as a client speaks it; errors and model listings as Chat Completions."""

    name = "openai_responses"
    paths = ("/v1/responses",)

    def parse_call(self, body: dict, http: web.Request) -> ClientCall:
        """See `ClientFormat.parse_call`."""
        return ClientCall(parse_request(body))

    render_response = staticmethod(render_response)
    stream_renderer = staticmethod(StreamRenderer)
