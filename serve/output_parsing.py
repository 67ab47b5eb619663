"""Chat output text -> message fields: the reasoning is split off first (--reasoning-parser), then tool calls
are read out of the remaining content (the request's tool parser), whole or as a stream of deltas.

    parsers = OutputParsers(reasoning_parser, tool_parser, request)
    parsers.parse(text, token_ids) -> ParsedOutput(reasoning, content, tool_calls)
    stream = parsers.stream(); stream.feed(delta_text, delta_token_ids) / stream.finish() -> chat `delta` dict | None

These parsers read the text; the ids are for those that read token ids (gpt-oss's harmony, serve.harmony_chat,
which the server uses in their place with the same calls).

Stream deltas carry `content`, `reasoning` and `reasoning_content` (the same text under vLLM's current
and older names), and `tool_calls` entries shaped as the OpenAI SDK accumulates them. A parser that
raises never fails the request: it is logged and its text goes on as plain content.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from serve.reasoning_parsers import DeepSeekR1ReasoningParser, Qwen3ReasoningParser, ReasoningStream
from serve.tool_parsers import ToolCallStream, ToolParser

logger = logging.getLogger("jaxllm.serve")

ReasoningParser = DeepSeekR1ReasoningParser | Qwen3ReasoningParser


@dataclass
class ParsedOutput:
    reasoning: str | None
    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # [{"id", "type", "function"}]


class OutputParsers:
    """The parsers one chat request's output goes through (either may be None)."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolParser | None, request: Any) -> None:
        self.reasoning, self.tools, self.request = reasoning, tools, request

    def parse(self, text: str, token_ids: list[int]) -> ParsedOutput:
        reasoning, content = None, text
        if self.reasoning is not None:
            try:
                reasoning, content = self.reasoning.extract_reasoning(text)
            except Exception:
                logger.exception("The reasoning parser failed; the output stays content.")
        if self.tools is None:
            return ParsedOutput(reasoning, content)
        try:
            extracted = self.tools.extract_tool_calls(content or "", self.request)
        except Exception:
            logger.exception("The tool parser failed; the output stays content.")
            return ParsedOutput(reasoning, content)
        if extracted.tools_called:
            return ParsedOutput(reasoning, extracted.content, extracted.tool_calls)
        return ParsedOutput(reasoning, content)

    def stream(self) -> ChoiceParser:
        return ChoiceParser(
            self.reasoning.stream() if self.reasoning is not None else None,
            self.tools.stream(self.request) if self.tools is not None else None,
        )


class ChoiceParser:
    """One choice's streaming state: reasoning first, then its content through the tool-call stream."""

    def __init__(self, reasoning: ReasoningStream | None, tools: ToolCallStream | None) -> None:
        self._reasoning, self._tools = reasoning, tools
        self.tools_called = False

    def feed(self, text: str, token_ids: list[int]) -> dict[str, Any] | None:
        return self._step(text, final=False)

    def finish(self) -> dict[str, Any] | None:
        """End of output: whatever the parsers held back in case a tag followed."""
        return self._step("", final=True)

    def _step(self, text: str, final: bool) -> dict[str, Any] | None:
        delta: dict[str, Any] = {}
        split = self._split_reasoning(text, final)
        if split.get("reasoning"):
            delta["reasoning"] = delta["reasoning_content"] = split["reasoning"]
        content = split.get("content", "")
        tool_calls: list[dict[str, Any]] = []
        for part in self._read_tool_calls(content, final):
            if part.get("content"):
                delta["content"] = delta.get("content", "") + part["content"]
            tool_calls += part.get("tool_calls", [])
        if tool_calls:
            delta["tool_calls"] = _coalesce(tool_calls)
            self.tools_called = True
        return delta or None

    def _split_reasoning(self, text: str, final: bool) -> dict[str, str]:
        if self._reasoning is None:
            return {"content": text}
        try:
            parts = [self._reasoning.feed(text)] if text else []
            if final:
                parts.append(self._reasoning.finish())
        except Exception:
            logger.exception("The reasoning parser failed; the rest of the output is content.")
            self._reasoning = None
            return {"content": text}
        out: dict[str, str] = {}
        for part in parts:
            for key, value in (part or {}).items():
                out[key] = out.get(key, "") + value
        return out

    def _read_tool_calls(self, content: str, final: bool) -> list[dict[str, Any]]:
        if self._tools is None:
            return [{"content": content}]
        try:
            parts = [self._tools.feed(content)] if content else []
            if final:
                parts.append(self._tools.finish())
        except Exception:
            logger.exception("The tool parser failed; the rest of the output is content.")
            self._tools = None
            return [{"content": content}]
        return [p for p in parts if p]


def _coalesce(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive deltas of the same call merged into one entry (its name and first arguments together)."""
    out: list[dict[str, Any]] = []
    for entry in entries:
        last = out[-1] if out else None
        if last is not None and last["index"] == entry["index"]:
            function = last.setdefault("function", {})
            for key, value in entry.get("function", {}).items():
                function[key] = function.get(key, "") + value
            for key in ("id", "type"):
                if key in entry:
                    last.setdefault(key, entry[key])
        else:
            out.append({**entry, "function": dict(entry.get("function", {}))})
    return out
