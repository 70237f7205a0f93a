"""Structured output and tool calls for the local model, by constrained decoding.

The IR's ``response_format`` and ``tools``/``tool_choice`` become one llguidance grammar for
the engine (`mlx_smolvlm.constrain`): JSON valid against the schema, or a tool call
``{"name": ..., "arguments": {...}}`` choosing among the declared tools with their parameter
schemas (with ``tool_choice`` ``auto``, text not starting with ``{`` is the other choice).
The tools are described to the model in a system message, and earlier calls and results in
the conversation are rendered as text, since SmolVLM2's chat template has no tool roles.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from mlx_smolvlm.constrain import (
    GrammarError,
    json_schema_grammar,
    tool_call_grammar,
)

from .. import ir
from ..errors import InvalidRequestError
from ..formats.fields import new_id, parse_arguments

TOOLS_PROMPT = (
    "You can call these tools. To call one, answer with only a JSON object "
    '{"name": <tool name>, "arguments": <its arguments>}. Tools: '
)


def active_tools(request: ir.Request) -> list[ir.Tool]:
    """The tools the answer may call: none with ``tool_choice`` none, the named one with a
    named choice."""
    choice = request.tool_choice
    if not request.tools or (choice is not None and choice.mode == "none"):
        return []
    if choice is not None and choice.mode == "tool":
        named = [tool for tool in request.tools if tool.name == choice.name]
        if not named:
            raise InvalidRequestError(
                f"tool_choice: no tool is named {choice.name!r}", param="tool_choice"
            )
        return named
    return list(request.tools)


def grammar_for(request: ir.Request) -> str | None:
    """The grammar the answer must follow, or None for free text.

    Raises:
        InvalidRequestError: A schema or tool the constraint cannot enforce, named.
    """
    tools = active_tools(request)
    fmt = request.response_format
    if tools:
        if fmt is not None and fmt.type != "text":
            raise InvalidRequestError(
                "response_format: the local model takes a JSON response format or tools, not "
                "both (set tool_choice to none to get JSON)",
                param="response_format",
            )
        for i, tool in enumerate(request.tools):  # each declared tool, named by its index
            if tool.parameters is not None:
                _compile(f"tools[{i}].parameters", json_schema_grammar, tool.parameters)
        choice = request.tool_choice
        required = choice is not None and choice.mode in ("required", "tool")
        specs = [{"name": tool.name, "parameters": tool.parameters} for tool in tools]
        return _compile("tools", tool_call_grammar, specs, required)
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return json_schema_grammar(None)
    return _compile("response_format.schema", json_schema_grammar, fmt.schema)


def tools_message(request: ir.Request) -> dict | None:
    """A system message that describes the callable tools to the model, or None."""
    tools = active_tools(request)
    if not tools:
        return None
    described = [
        {"name": t.name, "description": t.description, "parameters": t.parameters} for t in tools
    ]
    text = TOOLS_PROMPT + json.dumps(described)
    return {"role": "system", "content": [{"type": "text", "text": text}]}


def render_call(part: ir.ToolCallPart, where: str) -> str:
    """An earlier tool call as the model writes one (arguments that are not a JSON object
    are a 400 naming ``where``)."""
    return json.dumps({"name": part.name, "arguments": parse_arguments(part.arguments, where)})


def render_result(part: ir.ToolResultPart, where: str) -> str:
    """A tool's result as text for the model.

    Raises:
        InvalidRequestError: The result holds media (named by `where`): a text-only result
            is what the model's template can show.
    """
    if any(not isinstance(p, ir.TextPart) for p in part.content):
        raise InvalidRequestError(
            f"{where}: the local model takes tool results as text only", param=where
        )
    text = "".join(p.text for p in part.content)
    status = "error" if part.is_error else "result"
    return f"Tool {status} ({part.name or part.call_id}): {text}"


class ToolCallStream:
    """A tool call's JSON text, arriving in pieces, as IR stream events.

    With `incremental`, the call starts as soon as its name is known and its arguments follow
    as they are generated (the compact call ends with the object's ``}``, held back until the
    end), as OpenAI and Anthropic stream them; a call cut by ``max_tokens`` then ends with its
    arguments unfinished, as theirs do. Without, the call is sent whole at the end, and a cut
    one becomes text (a complete response must not hold arguments that are not JSON).

    Args:
        incremental: Stream the arguments as they come.
    """

    def __init__(self, incremental: bool) -> None:
        self.incremental = incremental
        self.text = ""
        self._sent: int | None = None  # arguments sent up to here, once the call started

    def add(self, piece: str) -> list[ir.StreamEvent]:
        """Take the next piece of text; return the events it completes."""
        self.text += piece
        events: list[ir.StreamEvent] = []
        if not self.incremental:
            return events
        if self._sent is None:
            start = _CALL_START.match(self.text)
            if start is None:
                return events
            self._sent = start.end()
            name = json.loads(start.group(1))
            events.append(ir.PartStart(0, ir.ToolCallPart(new_id("call"), name, "")))
        end = len(self.text) - 1
        if end > self._sent:
            events.append(ir.PartDelta(0, arguments=self.text[self._sent : end]))
            self._sent = end
        return events

    def finish(self) -> tuple[list[ir.StreamEvent], bool]:
        """The last events, and whether the call is whole (else it was cut by max_tokens)."""
        try:
            call = json.loads(self.text)
        except json.JSONDecodeError:
            call = None
        if self._sent is not None:
            rest = self.text[self._sent : -1 if call is not None else None]
            return ([ir.PartDelta(0, arguments=rest)] if rest else []), call is not None
        if call is None:
            return [ir.PartStart(0, ir.TextPart("")), ir.PartDelta(0, text=self.text)], False
        part = ir.ToolCallPart(new_id("call"), call["name"], "")
        return [
            ir.PartStart(0, part),
            ir.PartDelta(0, arguments=json.dumps(call["arguments"])),
        ], True


# The start of a compact call, up to its arguments: llguidance keeps the schema's key order.
_CALL_START = re.compile(r'\{"name":("(?:[^"\\]|\\.)*"),"arguments":')


def _compile(param: str, build: Callable[..., str], *args: object) -> str:
    """`build(*args)`, its refusal a 400 naming `param`."""
    try:
        return build(*args)
    except GrammarError as err:
        raise InvalidRequestError(f"{param}: {err}", param=param) from err
