"""Pythonic tool calls (Llama 3.2, ToolACE): the whole output is a Python list of calls,
`[get_weather(city="Paris"), get_time(zone='UTC', exact=True)]`.

As vLLM's `pythonic` parser: the output must start with `[` and parse as a list of calls whose keyword
arguments are literals (strings, numbers, True/False/None or JSON's true/false/null, lists, dicts);
names may be dotted; `content` is None when calls are found, and anything else is all content. Streaming
sends each call when its closing parenthesis arrives, its arguments in one fragment.
"""

from __future__ import annotations

import ast
import warnings
from typing import Any

from serve.tool_parsers.base import (
    ExtractedToolCalls,
    ToolCallStream,
    dump_arguments,
    keep_calls,
    make_tool_call_id,
    tool_call,
)

_NAME_LITERALS = {"null": None, "true": True, "false": False}


class _NotACall(Exception):
    pass


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Dict):
        if not all(isinstance(k, ast.Constant) for k in node.keys):
            raise _NotACall("dict keys must be literals")
        return {k.value: _literal(v) for k, v in zip(node.keys, node.values, strict=True)}  # type: ignore[union-attr]
    if isinstance(node, ast.List):
        return [_literal(v) for v in node.elts]
    if isinstance(node, ast.Name) and node.id in _NAME_LITERALS:
        return _NAME_LITERALS[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        return -node.operand.value  # type: ignore[operator]
    raise _NotACall("arguments must be literals")


def _dotted_name(node: ast.expr) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        raise _NotACall("invalid function name")
    parts.append(node.id)
    return ".".join(reversed(parts))


def _call(node: ast.expr) -> tuple[str, str]:
    """(name, arguments JSON) of one call node."""
    if not isinstance(node, ast.Call):
        raise _NotACall("not a call")
    arguments = {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg is not None}
    return _dotted_name(node.func), dump_arguments(arguments)


def _parse(source: str, mode: str) -> ast.AST:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # e.g. invalid escapes in a model's strings
        return ast.parse(source, mode=mode)


class PythonicToolParser:
    keeps_special_tokens = False

    def extract_tool_calls(self, model_output: str, request: Any = None) -> ExtractedToolCalls:
        if not model_output.startswith("["):
            return ExtractedToolCalls(False, [], model_output)
        try:
            body = _parse(model_output, "exec").body  # type: ignore[attr-defined]
            if len(body) != 1 or not isinstance(body[0], ast.Expr) or not isinstance(body[0].value, ast.List):
                raise _NotACall("not a list of calls")
            elements = body[0].value.elts
            if not elements:
                raise _NotACall("empty list")
            calls = [tool_call(*_call(e), make_tool_call_id()) for e in elements]
        except (SyntaxError, ValueError, TypeError, _NotACall):
            return ExtractedToolCalls(False, [], model_output)
        return ExtractedToolCalls(True, keep_calls(calls, request), None)

    def stream(self, request: Any = None) -> PythonicToolCallStream:
        return PythonicToolCallStream(request)


class PythonicToolCallStream(ToolCallStream):
    def __init__(self, request: Any) -> None:
        super().__init__(request)
        self._text = ""  # everything so far (tool-call mode only)
        self._pos = 0  # scan position in _text
        self._mode: str | None = None  # None (undecided), "calls", "content", "done"
        self._stack: list[str] = []  # open brackets and the quote of an open string
        self._escaped = False
        self._call_start = 1  # where the current call's text starts in _text
        self._after_call = False  # a call just ended: only whitespace, "," or "]" may follow

    def _consume(self, text: str) -> None:
        if self._mode == "content":
            self._emit_content(text)
            return
        if self._mode == "done":
            return
        self._text += text
        if self._mode is None:
            if not self._text:
                return
            if not self._text.startswith("["):
                self._mode = "content"
                self._emit_content(self._text)
                return
            self._mode, self._pos, self._stack = "calls", 1, ["["]
        self._scan()

    def _scan(self) -> None:
        text = self._text
        while self._pos < len(text) and self._mode == "calls":
            ch = text[self._pos]
            self._pos += 1
            top = self._stack[-1] if self._stack else None
            if top in ("'", '"'):
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == top:
                    self._stack.pop()
                continue
            depth = len(self._stack)
            if depth == 1 and (ch in ",]" or not ch.isspace()):
                if ch in ",]" and not self._after_call:
                    self._give_up()  # an element that is not a call, or an empty list
                    continue
                if ch not in ",]" and self._after_call:
                    self._give_up()  # text after a call inside the list
                    continue
            if ch in "'\"([{":
                self._stack.append(ch)
            elif ch in ")]}":
                if not self._stack or self._stack.pop() != {")": "(", "]": "[", "}": "{"}[ch]:
                    self._give_up()
                elif ch == ")" and len(self._stack) == 1:
                    self._end_call(text[self._call_start : self._pos])
                elif not self._stack:
                    self._mode = "done"  # the closing "]"; vLLM would reject trailing text, we ignore it
            elif ch == "," and depth == 1:
                self._call_start, self._after_call = self._pos, False

    def _end_call(self, source: str) -> None:
        try:
            name, arguments = _call(_parse(source.strip(), "eval").body)  # type: ignore[attr-defined]
        except (SyntaxError, ValueError, TypeError, _NotACall):
            self._give_up()
            return
        index = self.start_call(name)
        self.emit_arguments(index, arguments)
        self._after_call = True

    def _give_up(self) -> None:
        if not self.tool_calls:
            self._emit_content(self._text)
            self._mode = "content"
        else:
            self._mode = "done"

    def _finish(self) -> None:
        if self._mode == "calls" and not self.tool_calls:
            self._emit_content(self._text)  # e.g. a truncated "[get_wea"
        self._mode = "done"
