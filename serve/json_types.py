"""OpenAI's 400 for a JSON value of the wrong type, from pydantic's validation errors.

OpenAI's API answers a wrong JSON type with code `invalid_type`, `param` the value's path (`n`,
`messages[0].content`, `metadata.k`) and one wording for every field, e.g.
    Invalid type for 'max_tokens': expected an integer, but got a boolean instead.
    Invalid type for 'messages[0].content': expected one of a string or array of objects, but got an integer instead.
(as clients quote the API's responses). pydantic's own text ("Input should be a valid integer")
names neither the path nor what was sent, so a client moving from OpenAI would read a different error.

What a field expects is read from the request model's JSON schema (the types a client may send,
unions and nested arrays included), what was sent from the value itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

# pydantic error types that say "not this JSON type" (a value error or a missing field never is);
# a literal_error only when the value is not even of the enum's JSON type (else it is a bad value)
_TYPE_ERRORS = ("int_type", "float_type", "bool_type", "string_type", "list_type", "dict_type", "model_type",
                "model_attributes_type", "literal_error")
# JSON type -> how OpenAI names it as what a field expects, and as what a client sent
_EXPECTED = {"integer": "an integer", "number": "a decimal", "boolean": "a boolean", "string": "a string",
             "object": "an object", "array": "an array"}
_PLURAL = {"integer": "integers", "number": "decimals", "boolean": "booleans", "string": "strings",
           "object": "objects", "array": "arrays"}
_SENT = {"null": "null", "boolean": "a boolean", "integer": "an integer", "number": "a decimal number",
         "string": "a string", "array": "an array", "object": "an object"}


def invalid_type(errors: list[dict[str, Any]], model: type[BaseModel]) -> tuple[str, str] | None:
    """(param, message) of OpenAI's `invalid_type` error when the first of pydantic's `errors` (locations
    within a `model` body) is a JSON value of the wrong type; None for any other error."""
    schema = inline_schema(model)
    first = errors[0]
    at = _walk(schema, first["loc"])
    if at.union is not None:  # pydantic tried each member of a union: the one that got furthest says most
        tried = [e for e in errors if tuple(e["loc"][: at.union]) == tuple(first["loc"][: at.union])
                 and e["type"] in _TYPE_ERRORS]
        first = max(tried or [first], key=lambda e: len(e["loc"]))
        at = _walk(schema, first["loc"])
    sent = _json_type(first.get("input"))
    if first["type"] not in _TYPE_ERRORS or sent in _accepted(at.node):  # e.g. an unknown enum string, a huge number
        return None
    return at.param, f"Invalid type for '{at.param}': expected {_describe(at.node)}, but got {_SENT[sent]} instead."


@dataclass(frozen=True)
class _At:
    param: str  # the path as OpenAI writes it: field, field[0], field.key
    node: dict[str, Any]  # the schema of what is expected there
    union: int | None  # how many `loc` items lead to the first union on the way (None: no union)


@functools.cache
def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema with its definitions inlined (`$ref`s replaced by what they name)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return inline(schema)


def _walk(schema: dict[str, Any], loc: tuple) -> _At:
    """Follow pydantic's error location `loc` through `schema`. pydantic puts the name of the member it
    tried after a union's location ("str", "list[str]"): that item is no part of the path."""
    node, param, union, i = schema, "", None, 0
    while i < len(loc):
        members = [m for m in node.get("anyOf", ()) if m.get("type") != "null"]
        if len(members) == 1:  # Optional[X]: no union for pydantic
            node = members[0]
            continue
        if members:
            union = i if union is None else union
            if i + 1 == len(loc):  # the error is the union's own: no member took the value
                break
            want = "array" if isinstance(loc[i + 1], int) else "object"
            node, i = next((m for m in members if m.get("type") == want), members[0]), i + 1
            continue
        key = loc[i]
        if isinstance(key, int):
            node, param = node.get("items", {}), f"{param}[{key}]"
        else:
            node = node.get("properties", {}).get(key, node.get("additionalProperties"))
            node = node if isinstance(node, dict) else {}  # `additionalProperties: true`: anything
            param = f"{param}.{key}" if param else str(key)
        i += 1
    return _At(param, node, union)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array")):
        if isinstance(value, kind):
            return name
    return "object"


def _accepted(node: dict[str, Any]) -> set[str]:
    """The JSON types `node` takes (every type when it does not say)."""
    if "anyOf" in node:
        return set().union(*(_accepted(m) for m in node["anyOf"]))
    if "enum" in node:
        return {_json_type(v) for v in node["enum"]}
    kind = node.get("type")
    if kind is None:
        return set(_SENT)
    return {"integer", "number"} if kind == "number" else {kind}


def _describe(node: dict[str, Any]) -> str:
    """What `node` expects, in OpenAI's words: "an integer", "an array of objects", "one of a string or
    array of strings" (the article on the first alternative only, as OpenAI writes it), "one of 'ar' or
    'diffusion'"."""
    members = [m for m in node.get("anyOf", [node]) if m.get("type") != "null"] or [{}]
    if len(members) > 1:
        return _one_of([_describe(m) for m in members], strip_articles=True)
    node = members[0]
    if "enum" in node:
        return _one_of([f"'{v}'" for v in node["enum"]], strip_articles=False)
    if node.get("type") == "array" and node.get("items"):
        return f"an array of {_plural(node['items'])}"
    return _EXPECTED.get(node.get("type"), "a valid value")


def _plural(node: dict[str, Any]) -> str:
    if node.get("type") == "array" and node.get("items"):
        return f"arrays of {_plural(node['items'])}"
    return _PLURAL.get(node.get("type"), "values")


def _one_of(names: list[str], strip_articles: bool) -> str:
    if len(names) == 1:
        return names[0]
    if strip_articles:
        names = names[:1] + [n.removeprefix("an ").removeprefix("a ") for n in names[1:]]
    listed = f"{names[0]} or {names[1]}" if len(names) == 2 else f"{', '.join(names[:-1])}, or {names[-1]}"
    return f"one of {listed}"
