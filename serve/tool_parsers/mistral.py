"""Mistral tool calls after the `[TOOL_CALLS]` marker, in the formats Mistral's tokenizers produce:

- v0.3 (pre-v11): `[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]`
- v11:            `[TOOL_CALLS]f{"a": 1}[TOOL_CALLS]g{...}`
- v13:            `[TOOL_CALLS]f[ARGS]{"a": 1}`

As vLLM's `mistral` parser: `content` is the text before the first marker; ids are 9 random alphanumeric
characters (mistral-common rejects others). When the calls do not parse, vLLM returns the output without
its markers as content; we return the output unchanged. The server must detokenize with
`skip_special_tokens=False` (`[TOOL_CALLS]` is a special token).
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
    make_mistral_tool_call_id,
    partial_tag_overlap,
    tool_call,
)
from serve.tool_parsers.json_stream import CanonicalJsonWriter

BOT = "[TOOL_CALLS]"
ARGS = "[ARGS]"
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_decoder = json.JSONDecoder()


def _parse_segment(segment: str) -> list[tuple[str, Any]]:
    """The (name, arguments) calls in the text after one marker; raises ValueError/KeyError/TypeError."""
    segment = segment.strip()
    if segment.startswith("["):
        items, _ = _decoder.raw_decode(segment)
        if not isinstance(items, list):
            raise TypeError("tool calls are not a list")
        return [(_check_name(item["name"]), item["arguments"]) for item in items]
    name_match = _NAME_RE.match(segment)
    if name_match is None:
        raise ValueError("no function name after [TOOL_CALLS]")
    rest = segment[name_match.end() :].removeprefix(ARGS).lstrip()
    arguments, _ = _decoder.raw_decode(rest)
    return [(name_match.group(0), arguments)]


def _check_name(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError("name is not a string")
    return name


class MistralToolParser:
    keeps_special_tokens = True

    def extract_tool_calls(self, model_output: str, request: Any = None) -> ExtractedToolCalls:
        if BOT not in model_output:
            return ExtractedToolCalls(False, [], model_output)
        content, *segments = model_output.split(BOT)
        try:
            calls = [
                tool_call(name, dump_arguments(arguments), make_mistral_tool_call_id())
                for segment in segments
                if segment.strip()
                for name, arguments in _parse_segment(segment)
            ]
        except (ValueError, KeyError, TypeError):
            return ExtractedToolCalls(False, [], model_output)
        if not calls:
            return ExtractedToolCalls(False, [], model_output)
        return ExtractedToolCalls(True, keep_calls(calls, request), content or None)

    def stream(self, request: Any = None) -> MistralToolCallStream:
        return MistralToolCallStream(request)


# Streaming states after a marker.
_START = "start"  # whitespace, then "[" (array form) or a name
_NAME = "name"  # reading a function name
_ARGUMENTS = "arguments"  # reading the arguments object of a named call
_ARRAY = "array"  # in the array form, between items
_ITEM = "item"  # reading one {"name", "arguments"} object of the array
_DONE = "done"  # after the call(s) of this marker: text until the next marker is dropped


class MistralToolCallStream(ToolCallStream):
    def __init__(self, request: Any) -> None:
        super().__init__(request, make_mistral_tool_call_id)
        self._buffer = ""
        self._state: str | None = None  # None: before the first marker
        self._raw = ""  # raw text since the first marker, in case it must go back to content
        self._plain = False
        self._name = ""
        self._args: CanonicalJsonWriter | None = None
        self._args_index: int | None = None
        self._item: CallObjectReader | None = None

    def _consume(self, text: str) -> None:
        if self._plain:
            self._emit_content(text)
            return
        self._buffer += text
        while self._buffer and not self._plain:
            if self._state is None or self._state == _DONE:
                start = self._buffer.find(BOT)
                if start == -1:
                    keep = partial_tag_overlap(self._buffer, BOT)
                    self._outside(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return
                self._outside(self._buffer[:start])
                self._buffer = self._buffer[start:]
                self._take_raw(len(BOT))
                self._state = _START
            elif not self._step():
                return

    def _outside(self, text: str) -> None:
        if self._state is None:
            self._emit_content(text)
        else:
            self._raw += text

    def _take_raw(self, n: int) -> str:
        taken, self._buffer = self._buffer[:n], self._buffer[n:]
        self._raw += taken
        return taken

    def _step(self) -> bool:
        """One state transition; False when more text is needed."""
        if self._state == _START:
            stripped = self._buffer.lstrip()
            self._take_raw(len(self._buffer) - len(stripped))
            if not stripped:
                return False
            if stripped[0] == "[" and not stripped.startswith(ARGS):
                self._take_raw(1)
                self._state = _ARRAY
            else:
                self._state, self._name = _NAME, ""
            return True
        if self._state == _NAME:
            match = _NAME_RE.match(self._buffer)
            self._name += self._take_raw(match.end() if match else 0)
            if not self._buffer or (len(self._buffer) < len(ARGS) and ARGS.startswith(self._buffer)):
                return False  # the name, or an "[ARGS]" marker, may go on
            if self._buffer.startswith(ARGS):
                self._take_raw(len(ARGS))
            rest = self._buffer.lstrip()
            self._take_raw(len(self._buffer) - len(rest))
            if not rest:
                return False
            if not self._name or rest[0] != "{":
                return self._fail()
            self._state, self._args = _ARGUMENTS, CanonicalJsonWriter()
            self._args_index = self.start_call(self._name)
            return True
        if self._state == _ARGUMENTS:
            assert self._args is not None
            before = len(self._args.output)
            consumed = self._args.feed(self._buffer)
            self._take_raw(consumed)
            self.emit_arguments(self._args_index, self._args.output[before:])
            if self._args.error is not None:
                return self._fail()
            if self._args.done:
                self._state = _DONE
            return self._args.done
        if self._state == _ARRAY:
            stripped = self._buffer.lstrip()
            self._take_raw(len(self._buffer) - len(stripped))
            if not stripped:
                return False
            if stripped[0] == ",":
                self._take_raw(1)
            elif stripped[0] == "]":
                self._take_raw(1)
                self._state = _DONE
            elif stripped[0] == "{":
                self._item, self._state = CallObjectReader(self), _ITEM
            else:
                return self._fail()
            return True
        # _ITEM
        assert self._item is not None
        consumed = self._item.feed(self._buffer)
        self._take_raw(consumed)
        if self._item.failed:
            return self._fail()
        if not self._item.done:
            return False
        self._state = _ARRAY
        return True

    def _fail(self) -> bool:
        """The text after the marker is not a call: content if nothing was sent, else dropped."""
        if not self.tool_calls:
            self._plain = True
            self._emit_content(self._raw + self._buffer)
        self._state = _DONE
        self._buffer = ""
        return False

    def _finish(self) -> None:
        if self._plain:
            return
        if self._state is None:
            self._emit_content(self._buffer)
        elif not self.tool_calls:
            self._emit_content(self._raw + self._buffer)
        self._buffer = ""
