"""Constrained decoding for `tool_choice="required"` and a named tool, built as vLLM builds it.

- "required": the output is a JSON array of calls, `[{"name": <one of the tools>, "parameters": {...}}]`,
  at least one item (vLLM's `_get_json_schema_from_tools`; each tool's `$defs` hoisted to the top).
- named (`{"type": "function", "function": {"name": "f"}}`): the output is f's arguments object itself,
  validated by f's `parameters` schema.
Unlike vLLM, the call is compact JSON (whitespace only inside strings: the server re-serializes the
arguments anyway), every object admits only its declared keys (as xgrammar's strict mode, vLLM's default
backend, reads an unset `additionalProperties`), and with a `max_tokens` budget open-ended strings, arrays
and integers are bounded to fit it (`schema_rules.bound_open_values`): a weak model still ends its call.
The server reads the output back with `serve.tool_parsers.ConstrainedToolParser(constraint.function_name)`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from jaxllm.sampling_params import StructuredOutputsParams
from jaxllm.structured.schema_rules import bound_open_values, close_objects

# NOTE: vLLM's schema for a tool without `parameters` is {"type": "object", "properties": {}}, which admits any
# keys; a function that takes no arguments admits none.
_EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
# llguidance's options, read from the schema itself so that every place that compiles it agrees: no whitespace
# between JSON tokens (the compiler's default whitespace pattern is dropped).
_COMPACT = {"whitespace_flexible": False, "whitespace_pattern": None}
# NOTE: the budget each of several parallel calls gets: a budget of max_tokens allows max_tokens // 64 calls (at
# least one). With weak weights, "," is as likely as "]" after each call, and calls that may follow without end
# leave the last one unfinished at max_tokens.
_TOKENS_PER_PARALLEL_CALL = 64


@dataclass(frozen=True)
class ToolChoiceConstraint:
    structured_outputs: StructuredOutputsParams  # goes on SamplingParams.structured_outputs
    function_name: str | None  # the forced function for a named choice; None for "required"


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError("each tool must be {'type': 'function', 'function': {'name': ..., 'parameters': ...}}")
    return fn


def _parameters(fn: dict[str, Any], max_tokens: int | None) -> dict[str, Any]:
    """fn's arguments schema, its open-ended values bounded to fit `max_tokens` (None: left open)."""
    params = fn.get("parameters") or _EMPTY_PARAMETERS
    return copy.deepcopy(params) if max_tokens is None else bound_open_values(params, max_tokens)


def required_tool_calls_schema(
    tools: list[dict[str, Any]], parallel_tool_calls: bool = True, max_tokens: int | None = None
) -> dict[str, Any]:
    """The schema of a non-empty array of `{"name", "parameters"}` calls to the given tools, as many as fit
    `max_tokens` (None: unbounded), each call's arguments bounded to its share of it."""
    max_calls = 1 if not parallel_tool_calls else None
    if max_tokens is not None:
        max_calls = max_calls or max(1, max_tokens // _TOKENS_PER_PARALLEL_CALL)
    variants, all_defs = [], {}
    for tool in tools:
        fn = _function(tool)
        params = _parameters(fn, max_tokens // (max_calls or 1) if max_tokens is not None else None)
        for name, schema in params.pop("$defs", {}).items():
            if all_defs.setdefault(name, schema) != schema:
                raise ValueError(f"Tool definition '{name}' has multiple schemas, which is not supported.")
        variants.append({
            "properties": {"name": {"type": "string", "enum": [fn["name"]]}, "parameters": params},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        })
    # NOTE: unlike vLLM, a call object admits no keys besides name and parameters (the reader ignores them,
    # and with weak weights an open-ended extra key can eat the whole max_tokens budget), and
    # parallel_tool_calls=false caps the array at one call where vLLM drops the others after decoding.
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": variants}}
    if max_calls is not None:
        schema["maxItems"] = max_calls
    if all_defs:
        schema["$defs"] = all_defs
    return schema


def named_tool_schema(tools: list[dict[str, Any]], name: str, max_tokens: int | None = None) -> dict[str, Any]:
    """The `parameters` schema of the tool called `name`, open-ended values bounded to fit `max_tokens`."""
    for tool in tools:
        fn = _function(tool)
        if fn["name"] == name:
            return _parameters(fn, max_tokens)
    raise ValueError(f"Tool '{name}' has not been passed in `tools`.")


def _forced_call(schema: dict[str, Any]) -> StructuredOutputsParams:
    schema = close_objects(schema, every_object=True)
    schema["x-guidance"] = dict(_COMPACT)
    return StructuredOutputsParams(json=schema)


def tool_choice_constraint(
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
    parallel_tool_calls: bool = True,
    max_tokens: int | None = None,
) -> ToolChoiceConstraint | None:
    """The constraint a request's `tool_choice` asks for; None for "none", "auto" or no choice.

    `max_tokens` is the request's output budget (None: unset), which bounds open-ended values."""
    if tool_choice in (None, "none", "auto"):
        return None
    if not tools:
        raise ValueError("When using `tool_choice`, `tools` must be set.")
    if tool_choice == "required":
        schema = required_tool_calls_schema(tools, parallel_tool_calls, max_tokens)
        return ToolChoiceConstraint(_forced_call(schema), None)
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if isinstance(name, str):
            return ToolChoiceConstraint(_forced_call(named_tool_schema(tools, name, max_tokens)), name)
    raise ValueError(
        f"Invalid value for `tool_choice`: {tool_choice!r}. Use 'none', 'auto', 'required' or "
        "{'type': 'function', 'function': {'name': ...}}."
    )
