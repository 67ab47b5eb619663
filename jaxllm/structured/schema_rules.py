"""Rewrites of a JSON schema before it is compiled: closed objects, and bounds on open-ended values.

- `close_objects`: an object schema that leaves `additionalProperties` unset admits no undeclared keys.
  vLLM's `disable_additional_properties` does it to schemas that declare `properties` or
  `patternProperties`; xgrammar's strict mode, vLLM's default for forced tool calls, to every object.
- `bound_open_values`: strings, integers and arrays the schema leaves unbounded get bounds that still let
  the whole value fit a `max_tokens` budget, for forced tool calls.

Each returns a new schema; the one passed in is left as it is.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

# Keywords whose value is a map of names to subschemas, and those whose value is a subschema or a list of them.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMAS = ("additionalProperties", "unevaluatedProperties", "items", "prefixItems", "additionalItems",
               "contains", "propertyNames", "anyOf", "oneOf", "allOf", "not", "if", "then", "else")
_COMPOSITION = {"anyOf", "oneOf", "allOf", "$ref"}
# Keywords whose subschemas describe an array's items: a value there may appear maxItems times.
_ITEMS = ("items", "prefixItems", "additionalItems", "contains")
# NOTE: the integers JSON parsers read exactly (RFC 8259 section 6): a bound no real argument needs to pass,
# while an unbounded integer lets a weak model write digits until max_tokens.
_SAFE_INTEGER = 2**53 - 1


def _subschemas(node: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(keyword, subschema) for each subschema directly under `node`."""
    for key in _SCHEMA_MAPS:
        value = node.get(key)
        if isinstance(value, dict):
            yield from ((key, v) for v in value.values() if isinstance(v, dict))
    for key in _SUBSCHEMAS:
        value = node.get(key)
        if isinstance(value, dict):
            yield key, value
        elif isinstance(value, list):
            yield from ((key, v) for v in value if isinstance(v, dict))


def _walk_counted(node: dict[str, Any]) -> Iterator[tuple[dict[str, Any], int]]:
    """`node` and every subschema under it, each once per place it appears, with how many values it may
    describe in one instance: the product of the maxItems of the arrays around it (1 outside any array)."""
    stack = [(node, 1)]
    while stack:
        current, copies = stack.pop()
        yield current, copies
        max_items = current.get("maxItems")
        inner = copies * max_items if isinstance(max_items, int) and max_items > 0 else copies
        stack.extend((child, inner if key in _ITEMS else copies) for key, child in _subschemas(current))


def _walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    return (current for current, _ in _walk_counted(node))


def _types(node: dict[str, Any]) -> set[str]:
    kind = node.get("type")
    return {kind} if isinstance(kind, str) else set(kind) if isinstance(kind, list) else set()


def close_objects(schema: dict[str, Any], *, every_object: bool) -> dict[str, Any]:
    """`schema` with `additionalProperties: false` wherever an object schema leaves it unset.

    every_object=False touches only schemas declaring `properties` or `patternProperties` (vLLM's
    `disable_additional_properties`); True also closes `{"type": "object"}` to `{}` (xgrammar's strict mode),
    unless it is made of other schemas (anyOf, oneOf, allOf, $ref), whose keys a closed whole would refuse."""
    schema = copy.deepcopy(schema)
    for node in _walk(schema):
        declares = isinstance(node.get("properties"), dict) or isinstance(node.get("patternProperties"), dict)
        free_form = "object" in _types(node) and not _COMPOSITION & node.keys()
        if "additionalProperties" not in node and (declares or (every_object and free_form)):
            node["additionalProperties"] = False
    return schema


def _is_free_string(node: dict[str, Any]) -> bool:
    return ("string" in _types(node) and "maxLength" not in node
            and not {"enum", "const", "pattern", "format"} & node.keys())


def bound_open_values(schema: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """`schema` with bounds where it sets none, so that a value fits `max_tokens` tokens:

    - an array holds at most max_tokens // 8 items;
    - the free strings (no enum, const, pattern or format) share half the budget in characters (most tokens
      hold one or more), a string in an array once per item it may have; the other half is left to the keys,
      the punctuation and the other values;
    - an integer lies within +-(2**53 - 1).
    Bounds the schema sets itself are kept; a minimum above the cap raises the cap to it."""
    schema = copy.deepcopy(schema)
    max_items = max(1, max_tokens // 8)
    for node in _walk(schema):
        types = _types(node)
        if any(k in node for k in ("enum", "const")):
            continue
        if "array" in types and "maxItems" not in node:
            node["maxItems"] = max(max_items, node.get("minItems", 0))
        if "integer" in types:
            if not {"minimum", "exclusiveMinimum"} & node.keys():
                node["minimum"] = -_SAFE_INTEGER
            if not {"maximum", "exclusiveMaximum"} & node.keys():
                node["maximum"] = _SAFE_INTEGER
    free_strings = [(node, copies) for node, copies in _walk_counted(schema) if _is_free_string(node)]
    max_chars = max(1, max_tokens // (2 * max(1, sum(copies for _, copies in free_strings))))
    for node, _ in free_strings:
        node["maxLength"] = max(max_chars, node.get("minLength", 0))
    return schema
