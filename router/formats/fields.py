"""Helpers every format shares: JSON field validation that names the offending field the same
way in every format, ids, base64 and data URLs, tool-call arguments, reasoning effort <->
budget, system-prompt splitting, tool-result folding and upstream error messages.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets

from .. import ir
from ..errors import InvalidRequestError

_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    list: "an array",
    dict: "an object",
}


def field(
    obj: dict, key: str, kind: type | tuple[type, ...], where: str, *, required: bool = False
) -> object:
    """Read ``obj[key]`` and check its JSON type.

    Args:
        obj: The JSON object.
        key: The field name.
        kind: Accepted Python type(s); ``float`` also accepts integers.
        where: Path of ``obj`` in the request (``messages[2]``), for the error message.
        required: Whether a missing or null field is an error.

    Raises:
        InvalidRequestError: If the field is missing (when required) or has the wrong type.
    """
    path = f"{where}.{key}" if where else key
    value = obj.get(key)
    if value is None:
        if required:
            raise InvalidRequestError(f"{path}: field is required", param=path)
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds:
        kinds = (*kinds, int)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        expected = " or ".join(_NAMES[k] for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise InvalidRequestError(
            f"{path}: expected {expected}, got {type(value).__name__}", param=path
        )
    return value


def objects(value: list, where: str) -> list[dict]:
    """Check that every item of a JSON array is an object.

    Args:
        value: The array.
        where: Its path in the request.

    Raises:
        InvalidRequestError: Naming the first item that is not an object.
    """
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise InvalidRequestError(
                f"{where}[{i}]: expected an object, got {type(item).__name__}",
                param=f"{where}[{i}]",
            )
    return value


def new_id(prefix: str) -> str:
    """A random id such as ``call_3f9a...`` (24 hex digits).

    Args:
        prefix: The id's prefix, without the underscore.
    """
    return f"{prefix}_{secrets.token_hex(12)}"


def parse_data_url(url: str, where: str) -> tuple[str, str]:
    """Split a ``data:`` URL into media type and base64 payload.

    Args:
        url: The URL (``data:image/png;base64,...``).
        where: Its path in the request.

    Raises:
        InvalidRequestError: If it is not a base64 data URL or the payload is not base64.
    """
    head, sep, data = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise InvalidRequestError(f"{where}: expected a base64 data URL", param=where)
    check_base64(data, where)
    return head[5:-7] or "application/octet-stream", data


def check_base64(data: str, where: str) -> None:
    """Validate standard base64 text.

    Args:
        data: The payload.
        where: Its path in the request.

    Raises:
        InvalidRequestError: If the payload is not valid base64.
    """
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidRequestError(f"{where}: invalid base64 data", param=where) from err


def standard_base64(data: str) -> str:
    """Turn URL-safe base64 (what google-genai writes for bytes fields) into standard base64.

    Google accepts both alphabets; Anthropic and OpenAI accept only the standard one, and a
    signature must come back byte-for-byte as its provider issued it.

    Args:
        data: Base64 text in either alphabet.
    """
    return data.replace("-", "+").replace("_", "/")


def parse_arguments(arguments: str, where: str) -> dict:
    """Decode tool-call arguments (JSON text of an object).

    Args:
        arguments: The JSON text ("" means no arguments).
        where: Its path, for the error message.

    Raises:
        InvalidRequestError: If the text is not a JSON object.
    """
    if not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError as err:
        raise InvalidRequestError(
            f"{where}: tool-call arguments are not valid JSON: {err}", param=where
        ) from err
    if not isinstance(value, dict):
        raise InvalidRequestError(
            f"{where}: tool-call arguments must be a JSON object", param=where
        )
    return value


def dump_json(value: object) -> str:
    """Compact JSON text, keeping non-ASCII characters as they are.

    Args:
        value: A JSON-serialisable value.
    """
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# Reasoning effort <-> thinking budget, for formats that speak only one of the two.
_EFFORT_BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 24576}


def effort_to_budget(effort: str) -> int:
    """Token budget for an OpenAI-style reasoning effort (unknown efforts map to medium).

    Args:
        effort: ``minimal``, ``low``, ``medium`` or ``high``.
    """
    return _EFFORT_BUDGETS.get(effort, _EFFORT_BUDGETS["medium"])


def budget_to_effort(budget: int) -> str:
    """The smallest OpenAI-style effort whose budget covers ``budget`` tokens.

    Args:
        budget: A thinking budget in tokens.
    """
    for effort, tokens in _EFFORT_BUDGETS.items():
        if budget <= tokens:
            return effort
    return "high"


def split_system(messages: list[ir.Message]) -> tuple[list[ir.TextPart], list[ir.Message]]:
    """Separate the leading system messages for formats with one top-level system prompt.

    System messages later in the conversation stay in place as user turns whose text is
    wrapped in ``<system>`` tags: hoisting them would reorder the conversation and break the
    provider's prefix cache.

    Args:
        messages: The IR conversation.

    Returns:
        The text parts of the leading system messages (never merged) and the remaining
        messages.
    """
    system: list[ir.TextPart] = []
    start = 0
    while start < len(messages) and messages[start].role == "system":
        system.extend(p for p in messages[start].parts if isinstance(p, ir.TextPart))
        start += 1
    rest = []
    for message in messages[start:]:
        if message.role == "system":
            text = "\n\n".join(p.text for p in message.parts if isinstance(p, ir.TextPart))
            message = ir.Message("user", [ir.TextPart(f"<system>\n{text}\n</system>")])
        rest.append(message)
    return system, rest


def append_tool_result(messages: list[ir.Message], result: ir.ToolResultPart) -> None:
    """Add a tool result, folding consecutive results into one user turn (the IR's model).

    Args:
        messages: The conversation being built.
        result: The tool result.
    """
    last = messages[-1] if messages else None
    if last and last.role == "user" and all(isinstance(p, ir.ToolResultPart) for p in last.parts):
        last.parts.append(result)
    else:
        messages.append(ir.Message("user", [result]))


def error_message(body: object) -> str:
    """Extract the message from an error body in any of the three formats.

    Args:
        body: The decoded JSON error body (Google sometimes wraps it in a list).
    """
    if isinstance(body, list) and body:
        body = body[0]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
    return json.dumps(body)[:500]
