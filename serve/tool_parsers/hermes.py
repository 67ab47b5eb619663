"""Hermes / Qwen2.5 / Qwen3 tool calls: `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`.

As vLLM's `hermes` parser: `content` is the text before the first `<tool_call>`; a final call may lack its
closing tag; if any call is not a JSON object with `name` and `arguments`, nothing is a call and the whole
output is content. The server must detokenize with `skip_special_tokens=False` (`keeps_special_tokens`).
"""

from __future__ import annotations

import json
import re
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

START, END = "<tool_call>", "</tool_call>"
_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)


class HermesToolParser:
    keeps_special_tokens = True

    def extract_tool_calls(self, model_output: str, request: Any = None) -> ExtractedToolCalls:
        if START not in model_output:
            return ExtractedToolCalls(False, [], model_output)
        try:
            calls = []
            for closed, unclosed in _CALL_RE.findall(model_output):
                obj = json.loads(closed or unclosed)
                name = obj["name"]
                if not isinstance(name, str):
                    raise TypeError("name is not a string")
                calls.append(tool_call(name, dump_arguments(obj["arguments"]), make_tool_call_id()))
        except (ValueError, KeyError, TypeError):
            return ExtractedToolCalls(False, [], model_output)
        content = model_output[: model_output.find(START)]
        return ExtractedToolCalls(True, keep_calls(calls, request), content or None)

    def stream(self, request: Any = None) -> HermesToolCallStream:
        return HermesToolCallStream(request)


class HermesToolCallStream(ToolCallStream):
    def __init__(self, request: Any) -> None:
        super().__init__(request)
        self._buffer = ""  # text not yet processed
        self._call: CallObjectReader | None = None  # the call being read
        self._call_raw = ""  # raw text of the current call region, in case it must go back to content
        self._plain = False  # a call failed before any was sent: everything is content now

    def _consume(self, text: str) -> None:
        if self._plain:
            self._emit_content(text)
            return
        self._buffer += text
        while self._buffer:
            if self._call is not None:
                if not self._read_call():
                    return
                continue
            start = self._buffer.find(START)
            if start == -1:
                keep = partial_tag_overlap(self._buffer, START)
                self._content_before_calls(self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep :]
                return
            self._content_before_calls(self._buffer[:start])
            self._buffer = self._buffer[start + len(START) :]
            self._call, self._call_raw = CallObjectReader(self), START

    def _content_before_calls(self, text: str) -> None:
        # vLLM drops text between and after calls; only text before the first call is content.
        if not self.tool_calls:
            self._emit_content(text)

    def _read_call(self) -> bool:
        """Advance the current call; False when it needs more text."""
        call = self._call
        assert call is not None
        if not call.writer.output:  # skip whitespace before the object
            stripped = self._buffer.lstrip()
            self._call_raw += self._buffer[: len(self._buffer) - len(stripped)]
            self._buffer = stripped
            if not stripped:
                return False
        consumed = call.feed(self._buffer)
        self._call_raw += self._buffer[:consumed]
        self._buffer = self._buffer[consumed:]
        if call.failed:
            self._give_up(call.committed)
            return True
        if not call.done:
            return False
        self._call = None  # the rest up to the next <tool_call> (e.g. </tool_call>) is dropped
        return True

    def _give_up(self, committed: bool) -> None:
        self._call = None
        if committed or self.tool_calls:
            return  # calls were sent: the broken one keeps what it had, the text until the next call is dropped
        self._plain = True
        self._emit_content(self._call_raw + self._buffer)
        self._buffer = ""

    def _finish(self) -> None:
        if self._call is not None and not self._call.committed and not self.tool_calls:
            self._emit_content(self._call_raw + self._buffer)  # e.g. a truncated `<tool_call>{"na`
        elif self._call is None and not self.tool_calls and not self._plain:
            self._emit_content(self._buffer)  # a held-back partial "<tool_c"
        self._buffer = ""
