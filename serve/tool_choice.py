"""What a chat request's `tools` / `tool_choice` ask of the server, as vLLM decides it.

- no `tool_choice`: "auto" when tools are given, else "none" (vLLM's default).
- "none": tools still reach the chat template; the output is plain content.
- "auto": needs --enable-auto-tool-choice and --tool-call-parser (else vLLM's 400); the parser reads calls
  out of whatever the model writes. A harmony model (gpt-oss) needs neither: without them its calls are dropped.
- "required" / a named function: decoding is constrained to a call (`jaxllm.structured.tool_choice_constraint`:
  compact, closed objects, open values bounded to fit the request's max_tokens) and `ConstrainedToolParser`
  reads it back, whatever --tool-call-parser is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jaxllm.structured import ToolChoiceConstraint, tool_choice_constraint
from serve.args import ServerArgs
from serve.errors import APIError
from serve.protocol import ChatCompletionRequest
from serve.tool_parsers import TOOL_PARSERS, ConstrainedToolParser, ToolParser, get_tool_parser

_NAMED_USAGE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


@dataclass(frozen=True)
class ToolHandling:
    tools: list[dict[str, Any]] | None  # handed to the chat template
    choice: str  # "none" | "auto" | "required" | "named"
    parser: ToolParser | None  # reads calls out of the output text; None: the output is plain content
    constraint: ToolChoiceConstraint | None  # the grammar forcing a call ("required" / named)
    keep_special_tokens: bool  # detokenize with skip_special_tokens=False (the parser's markers are special)

    def finish_reason(self, tools_called: bool, engine_reason: str | None) -> str | None:
        """vLLM's (and OpenAI's): "tool_calls" when "auto" found calls or "required" stopped normally; a
        named call keeps the engine's reason ("stop")."""
        if tools_called and (self.choice == "auto" or (self.choice == "required" and engine_reason == "stop")):
            return "tool_calls"
        return engine_reason


# A request that names no tools and no tool choice.
NO_TOOLS = ToolHandling(None, "none", None, None, False)


def resolve_tools(request: ChatCompletionRequest, args: ServerArgs, harmony_model: bool = False) -> ToolHandling:
    tools = request.tools
    if tools == []:
        raise APIError("`tools` must not be an empty array. Either provide at least one tool or omit the field "
                       "entirely.", param="tools")
    choice = request.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if choice != "none" and not tools:
        raise APIError("When using `tool_choice`, `tools` must be set.", param="tool_choice")
    # NOTE: as vLLM's adjust_request, a configured parser's wish for special tokens holds for every tool
    # choice but "none"; constrained output has no special tokens, so it changes nothing there.
    keep_special = bool(choice != "none" and args.tool_call_parser
                        and TOOL_PARSERS[args.tool_call_parser].keeps_special_tokens)
    if choice == "none":
        return ToolHandling(tools, "none", None, None, False)
    if choice == "auto":
        configured = bool(args.enable_auto_tool_choice and args.tool_call_parser)
        if not (configured or harmony_model):
            raise APIError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                           param="tool_choice")
        parser = get_tool_parser(args.tool_call_parser) if configured else None
        return ToolHandling(tools, "auto", parser, None, keep_special)
    if isinstance(choice, dict):
        _check_named_choice(choice, tools or [])
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    try:
        constraint = tool_choice_constraint(tools, choice, bool(request.parallel_tool_calls), max_tokens)
    except ValueError as e:  # the choice itself is checked above: what is left is about the tools' schemas
        raise APIError(str(e), param="tools") from e
    assert constraint is not None
    kind = "required" if choice == "required" else "named"
    return ToolHandling(tools, kind, ConstrainedToolParser(constraint.function_name), constraint, keep_special)


def _check_named_choice(choice: dict[str, Any], tools: list[dict[str, Any]]) -> None:
    """vLLM's checks and wording for `{"type": "function", "function": {"name": ...}}`."""
    function = choice.get("function")
    if not isinstance(function, dict):
        raise APIError(f"Invalid value for `function`: `{function}` in `tool_choice`! {_NAMED_USAGE}",
                       param="tool_choice")
    if "name" not in function:
        raise APIError(f"Expected field `name` in `function` in `tool_choice`! {_NAMED_USAGE}", param="tool_choice")
    name = function["name"]
    if not isinstance(name, str) or not name:
        raise APIError(f"Invalid `name` in `function`: `{name}` in `tool_choice`! {_NAMED_USAGE}",
                       param="tool_choice")
    if not any(isinstance(t.get("function"), dict) and t["function"].get("name") == name for t in tools):
        raise APIError("The tool specified in `tool_choice` does not match any of the specified `tools`",
                       param="tool_choice")
