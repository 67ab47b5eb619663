"""Reading back outputs decoded under `tool_choice="required"` or a named tool (see
`jaxllm.structured.tool_choice`): the grammar already forced the shape, whatever `--tool-call-parser` is.

- required (`function_name=None`): the output is `[{"name": "f", "parameters": {...}}, ...]`.
- named: the output is the arguments object of `function_name`.
Output that does not parse (cut short by max_tokens) stays in content.
"""

from __future__ import annotations

import json
from typing import Any

from serve.tool_parsers.base import (
    CallObjectReader,
    ExtractedToolCalls,
    ToolCallStream,
    dump_arguments,
    keep_calls,
    make_tool_call_id,
    tool_call,
)
from serve.tool_parsers.json_stream import CanonicalJsonWriter


class ConstrainedToolParser:
    keeps_special_tokens = False

    def __init__(self, function_name: str | None) -> None:
        self.function_name = function_name

    def extract_tool_calls(self, model_output: str, request: Any = None) -> ExtractedToolCalls:
        try:
            value = json.loads(model_output)
            if self.function_name is not None:
                calls = [tool_call(self.function_name, dump_arguments(value), make_tool_call_id())]
            else:
                if not isinstance(value, list) or not value:
                    raise TypeError("expected a non-empty list of calls")
                calls = [tool_call(_name(c["name"]), dump_arguments(c["parameters"]), make_tool_call_id())
                         for c in value]
        except (ValueError, KeyError, TypeError):
            return ExtractedToolCalls(False, [], model_output)
        return ExtractedToolCalls(True, keep_calls(calls, request), None)

    def stream(self, request: Any = None) -> ToolCallStream:
        if self.function_name is not None:
            return NamedToolCallStream(request, self.function_name)
        return RequiredToolCallStream(request)


def _name(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("name is not a string")
    return value


class NamedToolCallStream(ToolCallStream):
    def __init__(self, request: Any, function_name: str) -> None:
        super().__init__(request)
        self._function_name = function_name
        self._writer = CanonicalJsonWriter()
        self._index: int | None = None

    def _consume(self, text: str) -> None:
        if self._writer.done or self._writer.error is not None:
            return
        if self._index is None:
            if not text.strip():
                return
            self._index = self.start_call(self._function_name)
        before = len(self._writer.output)
        self._writer.feed(text)
        self.emit_arguments(self._index, self._writer.output[before:])


class RequiredToolCallStream(ToolCallStream):
    def __init__(self, request: Any) -> None:
        super().__init__(request)
        self._buffer = ""
        self._state = "start"  # "start" -> "between" <-> "item" -> "done"
        self._item: CallObjectReader | None = None

    def _consume(self, text: str) -> None:
        self._buffer += text
        while self._buffer and self._state != "done":
            if self._state == "item":
                assert self._item is not None
                consumed = self._item.feed(self._buffer)
                self._buffer = self._buffer[consumed:]
                if self._item.failed:
                    self._state = "done"
                elif self._item.done:
                    self._state = "between"
                else:
                    return
                continue
            stripped = self._buffer.lstrip()
            self._buffer = stripped
            if not stripped:
                return
            expected = "[" if self._state == "start" else ",{]"
            if stripped[0] not in expected:
                self._state = "done"
            elif stripped[0] == "{":
                self._item, self._state = CallObjectReader(self, ("parameters",)), "item"
            else:
                self._state = "done" if stripped[0] == "]" else "between"
                self._buffer = stripped[1:]
