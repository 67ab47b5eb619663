"""Llama 3.x JSON tool calls: `{"name": "f", "parameters": {...}}` (or `"arguments"`), optionally after
`<|python_tag|>`, several separated by `;`.

Non-streaming follows vLLM's `llama3_json` parser: every JSON object in the output is decoded; each must
have `name` and `arguments`/`parameters`, else nothing is a call and the whole output is content; when
calls are found `content` is None (text around them is dropped). Streaming sends text before the first
`{` as content (vLLM's streaming sends the whole output as content unless it starts with `{`), then the
calls; an object that turns out not to be a call goes back to content with everything after it.
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
    partial_tag_overlap,
    tool_call,
)

PYTHON_TAG = "<|python_tag|>"
_ARGUMENT_KEYS = ("arguments", "parameters")
_decoder = json.JSONDecoder()


class Llama3JsonToolParser:
    keeps_special_tokens = False

    def extract_tool_calls(self, model_output: str, request: Any = None) -> ExtractedToolCalls:
        if PYTHON_TAG not in model_output and "{" not in model_output:
            return ExtractedToolCalls(False, [], model_output)
        calls: list[dict[str, Any]] = []
        end = -1
        start = model_output.find("{")
        try:
            while start != -1:
                if start > end:
                    obj, length = _decoder.raw_decode(model_output[start:])
                    end = start + length
                    name = obj["name"]
                    arguments = obj["arguments"] if "arguments" in obj else obj["parameters"]
                    if not isinstance(name, str):
                        raise TypeError("name is not a string")
                    calls.append(tool_call(name, dump_arguments(arguments), make_tool_call_id()))
                start = model_output.find("{", max(start + 1, end))
        except (ValueError, KeyError, TypeError):
            return ExtractedToolCalls(False, [], model_output)
        if not calls:
            return ExtractedToolCalls(False, [], model_output)
        return ExtractedToolCalls(True, keep_calls(calls, request), None)

    def stream(self, request: Any = None) -> Llama3JsonToolCallStream:
        return Llama3JsonToolCallStream(request)


class Llama3JsonToolCallStream(ToolCallStream):
    def __init__(self, request: Any) -> None:
        super().__init__(request)
        self._buffer = ""
        self._call: CallObjectReader | None = None
        self._call_raw = ""  # raw text of the current call, in case it must go back to content
        self._tag = ""  # a <|python_tag|> waiting to see whether a call follows it
        self._plain = False  # something was not a call: everything is content now

    def _consume(self, text: str) -> None:
        if self._plain:
            self._emit_content(text)
            return
        self._buffer += text
        while self._buffer and not self._plain:
            if self._call is not None:
                if not self._read_call():
                    return
            elif self._tag:
                stripped = self._buffer.lstrip()
                if not stripped:
                    return
                if stripped[0] == "{":
                    self._start_reading(self._tag + self._buffer[: len(self._buffer) - len(stripped)])
                    self._buffer = stripped
                else:
                    self._outside(self._tag)
                self._tag = ""
            else:
                brace, tag = self._buffer.find("{"), self._buffer.find(PYTHON_TAG)
                if tag != -1 and (brace == -1 or tag < brace):
                    self._outside(self._buffer[:tag])
                    self._buffer, self._tag = self._buffer[tag + len(PYTHON_TAG) :], PYTHON_TAG
                elif brace != -1:
                    self._outside(self._buffer[:brace])
                    self._buffer = self._buffer[brace:]
                    self._start_reading("")
                else:
                    keep = partial_tag_overlap(self._buffer, PYTHON_TAG)
                    self._outside(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return

    def _start_reading(self, raw_prefix: str) -> None:
        self._call, self._call_raw = CallObjectReader(self, _ARGUMENT_KEYS), raw_prefix

    def _read_call(self) -> bool:
        """Advance the current call; False when it needs more text."""
        call = self._call
        assert call is not None
        consumed = call.feed(self._buffer)
        self._call_raw += self._buffer[:consumed]
        self._buffer = self._buffer[consumed:]
        if call.failed and not self.tool_calls:
            self._plain = True  # vLLM: an object that is not a call makes the whole output content
            self._emit_content(self._call_raw + self._buffer)
            self._buffer = ""
            return False
        if not (call.done or call.failed):
            return False
        self._call = None
        return True

    def _outside(self, text: str) -> None:
        if not self.tool_calls:  # separators (";", whitespace) and text after calls are dropped
            self._emit_content(text)

    def _finish(self) -> None:
        if self._plain:
            return
        if self._call is not None:
            if not self._call.committed and not self.tool_calls:
                self._emit_content(self._call_raw + self._buffer)
        else:
            self._outside(self._tag + self._buffer)
        self._buffer, self._tag = "", ""
