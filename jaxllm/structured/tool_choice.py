"""Constrained decoding for `tool_choice="required"` and a named tool, built as vLLM builds it.

- "required": the output is a JSON array of calls, `[{"name": <one of the tools>, "parameters": {...}}]`,
  at least one item (vLLM's `_get_json_schema_from_tools`; each tool's `$defs` hoisted to the top).
- named (`{"type": "function", "function": {"name": "f"}}`): the output is f's arguments object itself,
  validated by f's `parameters` schema.
The server reads the output back with `serve.tool_parsers.ConstrainedToolParser(constraint.function_name)`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from jaxllm.sampling_params import StructuredOutputsParams

# NOTE: vLLM's schema for a tool without `parameters` is {"type": "object", "properties": {}}, which admits any
# keys; a function that takes no arguments admits none.
_EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolChoiceConstraint:
    structured_outputs: StructuredOutputsParams  # goes on SamplingParams.structured_outputs
    function_name: str | None  # the forced function for a named choice; None for "required"


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError("each tool must be {'type': 'function', 'function': {'name': ..., 'parameters': ...}}")
    return fn


def _parameters(fn: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(fn.get("parameters") or _EMPTY_PARAMETERS)


def required_tool_calls_schema(tools: list[dict[str, Any]], parallel_tool_calls: bool = True) -> dict[str, Any]:
    """The schema of a non-empty array of `{"name", "parameters"}` calls to the given tools."""
    variants, all_defs = [], {}
    for tool in tools:
        fn = _function(tool)
        params = _parameters(fn)
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
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    if all_defs:
        schema["$defs"] = all_defs
    return schema


def named_tool_schema(tools: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The `parameters` schema of the tool called `name`."""
    for tool in tools:
        fn = _function(tool)
        if fn["name"] == name:
            return _parameters(fn)
    raise ValueError(f"Tool '{name}' has not been passed in `tools`.")


def tool_choice_constraint(
    tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None, parallel_tool_calls: bool = True
) -> ToolChoiceConstraint | None:
    """The constraint a request's `tool_choice` asks for; None for "none", "auto" or no choice."""
    if tool_choice in (None, "none", "auto"):
        return None
    if not tools:
        raise ValueError("When using `tool_choice`, `tools` must be set.")
    if tool_choice == "required":
        schema = required_tool_calls_schema(tools, parallel_tool_calls)
        return ToolChoiceConstraint(StructuredOutputsParams(json=schema), None)
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if isinstance(name, str):
            return ToolChoiceConstraint(StructuredOutputsParams(json=named_tool_schema(tools, name)), name)
    raise ValueError(
        f"Invalid value for `tool_choice`: {tool_choice!r}. Use 'none', 'auto', 'required' or "
        "{'type': 'function', 'function': {'name': ...}}."
    )
