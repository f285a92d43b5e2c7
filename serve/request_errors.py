"""OpenAI's 400 for a request body that fails validation: its `code`, `param` and wording, from
pydantic's errors. pydantic's own text ("Input should be less than or equal to 2") names neither the
path nor what was sent, so a client moving from OpenAI would read different errors, and codes it
branches on would be missing. OpenAI's words, as clients quote the API's 400 bodies:

- a JSON value of the wrong type, `invalid_type` with the value's path as `param` (`n`,
  `messages[0].content`, `metadata.k`):
    Invalid type for 'max_tokens': expected an integer, but got a boolean instead.
    Invalid type for 'messages[0].content': expected one of a string or array of objects, but got an integer instead.
- a required field left out, `missing_required_parameter`:
    Missing required parameter: 'messages'.
- a number out of range, `integer_below_min_value`, `integer_above_max_value`, `decimal_below_min_value`,
  `decimal_above_max_value` (integer or decimal as the field's type is):
    Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got 0 instead.
    Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 2.1 instead.
- a string an enum does not hold, `invalid_value`:
    Invalid value: 'wizard'. Supported values are: 'system', 'user', 'assistant', 'developer', and 'tool'.
- lengths, `empty_array`, `array_above_max_length`, `empty_string`, `string_above_max_length`:
    Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.
    Invalid 'stop': array too long. Expected an array with maximum length 4, but got an array with length 5 instead.
- a parameter that needs another, code null:
    The 'stream_options' parameter is only allowed when 'stream' is enabled.
- a prompt and max_tokens past the context (`param` the prompt's field), `context_length_exceeded`:
    This model's maximum context length is 8192 tokens. However, you requested 8256 tokens (64 in the
    messages, 8192 in the completion). Please reduce the length of the messages or completion.

NaN and Infinity are not JSON, but some clients send them (Python's json does) and the parser reads
them, as it reads 1e400 as Infinity: they are out of range where the field has a bound on that side
(`Expected a value <= 2, but got Infinity instead.`), else "expected a finite number", code null (OpenAI
answers such a body with its JSON parse error). Any other error keeps pydantic's text, naming the
param, code null.

What a field expects (its JSON types, bounds and enum values) is read from the request model's JSON
schema, what was sent from the value itself. A validator that knows OpenAI's answer raises a
`RequestError` (a ValueError pydantic keeps in the error), read back here as it is.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from decimal import Context
from typing import Any

from pydantic import BaseModel

# pydantic error types that say "not this JSON type" (a value error or a missing field never is);
# a literal_error only when the value is not even of the enum's JSON type (else it is a bad value)
_TYPE_ERRORS = ("int_type", "float_type", "bool_type", "string_type", "list_type", "dict_type", "model_type",
                "model_attributes_type", "literal_error")
# a number the field's type takes, but not its bounds: a bound broken, or not finite (NaN, Infinity,
# and an integer too large for a float: float_type with an integer sent)
_NUMBER_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number", "float_type")
# JSON type -> how OpenAI names it as what a field expects, and as what a client sent
_EXPECTED = {"integer": "an integer", "number": "a decimal", "boolean": "a boolean", "string": "a string",
             "object": "an object", "array": "an array"}
_PLURAL = {"integer": "integers", "number": "decimals", "boolean": "booleans", "string": "strings",
           "object": "objects", "array": "arrays"}
_SENT = {"null": "null", "boolean": "a boolean", "integer": "an integer", "number": "a decimal number",
         "string": "a string", "array": "an array", "object": "an object"}
_SIX_DIGITS = Context(prec=6)  # how a huge integer is shown (str() of one past 4300 digits raises)


class RequestError(ValueError):
    """One invalid value as OpenAI's API answers it: the value's path (`param`), the message and the
    error code (None where OpenAI has none). Raised by a validator, pydantic keeps it in its error's
    context and `request_error` returns it unchanged."""

    def __init__(self, param: str | None, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.message, self.code = param, message, code


def request_error(errors: list[dict[str, Any]], model: type[BaseModel]) -> RequestError:
    """OpenAI's answer to the first of pydantic's `errors` (`errors(include_url=False)` of validating a
    `model` body: locations start with the field)."""
    first = errors[0]
    own = first.get("ctx", {}).get("error")
    if isinstance(own, RequestError):
        return own
    wrong_type = _invalid_type(errors, model)
    if wrong_type is not None:
        return wrong_type
    at = _walk(inline_schema(model), first["loc"])
    value, kind = first.get("input"), first["type"]
    if kind == "missing":
        return RequestError(at.param, f"Missing required parameter: '{at.param}'.", "missing_required_parameter")
    if kind in _NUMBER_ERRORS and _json_type(value) in ("integer", "number"):
        return _out_of_range(at, value)
    if kind == "literal_error":
        supported = _listed([f"'{v}'" for v in _value_schema(at.node)["enum"]], "and")
        return RequestError(at.param, f"Invalid value: '{value}'. Supported values are: {supported}.", "invalid_value")
    if kind == "too_short" and first["ctx"]["actual_length"] == 0:
        return empty(at.param, "array")
    if kind == "too_long" and _value_schema(at.node).get("type") == "array" and first["ctx"].get("actual_length"):
        return too_long(at.param, "array", first["ctx"]["max_length"], first["ctx"]["actual_length"])
    if kind == "string_too_short" and value == "":
        return empty(at.param, "string")
    if kind == "string_too_long" and isinstance(value, str):
        return too_long(at.param, "string", first["ctx"]["max_length"], len(value))
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    return RequestError(at.param or None, f"{message} ({at.param})" if at.param else message)


# OpenAI's length errors, for validators that check lengths themselves (to name an item's path, `stop[1]`)
_ARTICLE = {"array": "an", "string": "a"}


def empty(param: str, kind: str) -> RequestError:
    """`param`, an "array" or a "string", is empty."""
    return RequestError(param, f"Invalid '{param}': empty {kind}. Expected {_ARTICLE[kind]} {kind} with minimum length 1, "
                        f"but got an empty {kind} instead.", f"empty_{kind}")


def too_long(param: str, kind: str, limit: int, length: int) -> RequestError:
    """`param`, an "array" or a "string", is longer than `limit`."""
    a = _ARTICLE[kind]
    return RequestError(param, f"Invalid '{param}': {kind} too long. Expected {a} {kind} with maximum length {limit}, "
                        f"but got {a} {kind} with length {length} instead.", f"{kind}_above_max_length")


def integer_above_max(param: str, limit: int, value: int) -> RequestError:
    """An integer past a bound that another field sets (min_tokens past max_tokens), which the request
    model's schema cannot hold: for validators, in the words of a schema bound's error."""
    return _past(param, "integer", "above", "<=", limit, value)


def integer_below_min(param: str, limit: int, value: int) -> RequestError:
    """An integer under a bound that another field sets (max_tokens 0 without echo): `integer_above_max`'s
    counterpart."""
    return _past(param, "integer", "below", ">=", limit, value)


def only_with(param: str, needs: str) -> RequestError:
    """`param` sent without the parameter that enables it (`stream_options` without `stream`)."""
    return RequestError(param, f"The '{param}' parameter is only allowed when '{needs}' is enabled.")


def context_length_exceeded(param: str, limit: int, prompt_tokens: int, max_tokens: int | None) -> RequestError:
    """A prompt (`param`: "messages" or "prompt") that, with `max_tokens` when given, does not fit the
    model's context of `limit` tokens."""
    if max_tokens is None:
        asked = f"your {param} resulted in {prompt_tokens} tokens. Please reduce the length of the {param}."
    else:
        asked = (f"you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the {param}, {max_tokens} in "
                 f"the completion). Please reduce the length of the {param} or completion.")
    return RequestError(param, f"This model's maximum context length is {limit} tokens. However, {asked}",
                        "context_length_exceeded")


def _invalid_type(errors: list[dict[str, Any]], model: type[BaseModel]) -> RequestError | None:
    """OpenAI's `invalid_type` error when the first of `errors` is a JSON value of the wrong type; None
    for any other error."""
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
    if not at.param:  # the body itself: `[]`, `5`, `null`
        return RequestError(None, f"Invalid type for the request body: expected {_describe(at.node)}, but got "
                            f"{_SENT[sent]} instead.", "invalid_type")
    return RequestError(at.param, f"Invalid type for '{at.param}': expected {_describe(at.node)}, but got {_SENT[sent]} "
                        "instead.", "invalid_type")


def _out_of_range(at: _At, value: int | float) -> RequestError:
    """A number past one of its field's bounds (NaN is past none: not a finite number), in OpenAI's words."""
    node = _value_schema(at.node)
    kind = "integer" if node.get("type") == "integer" else "decimal"
    low, low_strict = _bound(node, "minimum", "exclusiveMinimum")
    high, high_strict = _bound(node, "maximum", "exclusiveMaximum")
    if low is not None and (value < low or (low_strict and value == low)):
        return _past(at.param, kind, "below", ">" if low_strict else ">=", low, value)
    if high is not None and (value > high or (high_strict and value == high)):
        return _past(at.param, kind, "above", "<" if high_strict else "<=", high, value)
    return RequestError(at.param, f"Invalid '{at.param}': expected a finite number{_bounds(node)}, but got "
                        f"{_number(value)} instead.")


def _bound(node: dict[str, Any], inclusive: str, exclusive: str) -> tuple[int | float | None, bool]:
    """(bound, whether it is exclusive) of one side of a number field; (None, False) without one."""
    return (node[exclusive], True) if exclusive in node else (node.get(inclusive), False)


def _past(param: str, kind: str, side: str, op: str, bound: int | float, value: int | float) -> RequestError:
    """OpenAI's error for a `kind` ("integer", "decimal") number `side` ("below", "above") its bound."""
    limit = "minimum" if side == "below" else "maximum"
    return RequestError(param, f"Invalid '{param}': {kind} {side} {limit} value. Expected a value {op} {_number(bound)}, "
                        f"but got {_number(value)} instead.", f"{kind}_{side}_{limit[:3]}_value")


def _bounds(node: dict[str, Any]) -> str:
    """A number field's range as a message adds it: " (>= 0 and <= 2)", "" for none."""
    sides = [f"{op} {_number(node[key])}" for key, op in (("minimum", ">="), ("exclusiveMinimum", ">"),
                                                           ("maximum", "<="), ("exclusiveMaximum", "<")) if key in node]
    return f" ({' and '.join(sides)})" if sides else ""


def _number(value: int | float) -> str:
    """A number as OpenAI's messages show it: integers as written (a huge one rounded to 6 digits),
    decimals as Python's shortest repr without a trailing ".0", NaN and infinities by their JSON-ish names."""
    if isinstance(value, int):
        return str(value) if abs(value) < 10**20 else str(_SIX_DIGITS.create_decimal(value).normalize())
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value).removesuffix(".0")


def _value_schema(node: dict[str, Any]) -> dict[str, Any]:
    """The schema of an Optional field's value (its member other than null)."""
    members = [m for m in node.get("anyOf", [node]) if m.get("type") != "null"]
    return members[0] if len(members) == 1 else node


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
    return f"one of {_listed(names, 'or')}"


def _listed(names: list[str], conjunction: str) -> str:
    """`a or b`, `a, b, or c` (OpenAI's serial comma)."""
    if len(names) <= 2:
        return f" {conjunction} ".join(names)
    return f"{', '.join(names[:-1])}, {conjunction} {names[-1]}"
