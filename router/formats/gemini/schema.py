"""Gemini's schemas in both directions: JSON Schema to the OpenAPI 3.0 subset Gemini accepts
for tools and JSON output (`to_gemini_schema`), and Gemini's OpenAPI-style schemas to JSON
Schema (`from_gemini_schema`).

Gemini rejects ``$schema``, ``additionalProperties``, ``$ref``/``$defs``, ``default``, type
arrays, ``const`` and most string formats. This resolves references, folds ``null`` unions into
``nullable`` and drops what Gemini cannot take, keeping the constraints it can.
"""

from __future__ import annotations

from ...errors import InvalidRequestError

_KEEP = {
    "type",
    "format",
    "description",
    "title",
    "nullable",
    "enum",
    "items",
    "properties",
    "required",
    "anyOf",
    "minItems",
    "maxItems",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "minProperties",
    "maxProperties",
    "propertyOrdering",
}
_FORMATS = {
    "string": {"enum", "date-time"},
    "integer": {"int32", "int64"},
    "number": {"float", "double"},
}
_MAX_DEPTH = 32


def to_gemini_schema(schema: dict, where: str = "schema") -> dict:
    """Return a Gemini-compatible copy of a JSON Schema.

    Args:
        schema: A JSON Schema object.
        where: The request field it came from, for error messages.

    Raises:
        InvalidRequestError: If the schema is not an object, a ``$ref`` cannot be resolved,
            or references recurse (Gemini schemas cannot express recursion).
    """
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"{where}: a JSON schema must be an object", param=where)
    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    return _clean(schema, defs, where, ())


def _clean(node: dict, defs: dict, where: str, seen: tuple[str, ...]) -> dict:
    if len(seen) > _MAX_DEPTH:
        raise InvalidRequestError(f"{where}: schema nests too deeply", param=where)
    if "$ref" in node:
        ref = node["$ref"]
        name = ref.rsplit("/", 1)[-1]
        if not ref.startswith("#/") or name not in defs:
            raise InvalidRequestError(f"{where}: cannot resolve $ref {ref!r}", param=where)
        if name in seen:
            raise InvalidRequestError(
                f"{where}: recursive $ref {ref!r} cannot be expressed for Gemini", param=where
            )
        merged = {**defs[name], **{k: v for k, v in node.items() if k != "$ref"}}
        return _clean(merged, defs, where, (*seen, name))
    node = dict(node)
    for key in ("oneOf", "allOf"):
        if key in node:
            options = node.pop(key)
            if key == "allOf" and len(options) == 1:
                node = {**options[0], **node}
                return _clean(node, defs, where, seen)
            node.setdefault("anyOf", options)
    if "const" in node:
        const = node.pop("const")
        node.setdefault("enum", [const])
        if isinstance(const, str):
            node.setdefault("type", "string")
    out: dict = {}
    kind = node.get("type")
    if isinstance(kind, list):
        rest = [t for t in kind if t != "null"]
        if len(rest) < len(kind):
            out["nullable"] = True
        kind = rest[0] if len(rest) == 1 else None
        if len(rest) > 1:
            out["anyOf"] = [_clean({**node, "type": t}, defs, where, seen) for t in rest]
    if kind is not None:
        out["type"] = kind
    for key, value in node.items():
        if key not in _KEEP or key == "type" or (key == "anyOf" and key in out):
            continue
        if key == "properties":
            out[key] = {p: _clean(s, defs, where, seen) for p, s in value.items()}
        elif key == "items" and isinstance(value, dict):
            out[key] = _clean(value, defs, where, seen)
        elif key == "anyOf":
            options = [o for o in value if o.get("type") != "null"]
            if len(options) < len(value):
                out["nullable"] = True
            if len(options) == 1:
                out.update(_clean(options[0], defs, where, seen))
            else:
                out[key] = [_clean(o, defs, where, seen) for o in options]
        elif key == "format":
            if value in _FORMATS.get(kind, set()):
                out[key] = value
        elif key == "enum":
            if all(isinstance(v, str) for v in value):
                out[key] = value
        else:
            out[key] = value
    if "required" in out and "properties" in out:
        out["required"] = [r for r in out["required"] if r in out["properties"]]
    return out


def from_gemini_schema(schema: object) -> object:
    """Return the JSON Schema of a Gemini OpenAPI-style schema: upper-case types (``OBJECT``)
    become lower case, and ``nullable`` becomes a type union.

    Args:
        schema: A Gemini schema (or a list of them, or None).
    """
    if isinstance(schema, list):
        return [from_gemini_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "type" and isinstance(value, str):
            out[key] = value.lower()
        elif key == "properties" and isinstance(value, dict):
            out[key] = {k: from_gemini_schema(v) for k, v in value.items()}
        elif key in ("items", "anyOf"):
            out[key] = from_gemini_schema(value)
        elif key != "nullable":
            out[key] = value
    if schema.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out
