"""Incremental JSON re-serialization, so streamed tool-call arguments equal the non-streamed ones.

Non-streamed arguments are `json.dumps(value, ensure_ascii=False)` of the parsed value (vLLM's choice);
`CanonicalJsonWriter` produces that same text chunk by chunk while the model is still writing the value,
emitting only what can no longer change (a number waits for the character after it, a string escape for
its last character). Concatenating its output gives exactly `json.dumps(json.loads(raw), ensure_ascii=False)`
for valid JSON without duplicate keys.
"""

from __future__ import annotations

import json

_WHITESPACE = " \t\n\r"
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_LITERALS = ("true", "false", "null")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")

# Parser states.
_VALUE = 0  # expecting a value
_KEY = 1  # in an object, expecting a key (or "}" right after "{")
_COLON = 2  # after a key
_AFTER = 3  # after a value: "," or a closer
_STRING = 4
_NUMBER = 5
_LITERAL = 6


class CanonicalJsonWriter:
    """Feed the characters of one JSON value; read `output` (canonical, only grows).

    Also records where each top-level object member's value sits in `output` (`members`), so a caller can
    read `"name"` or stream the `"arguments"` member of a tool-call object.
    """

    def __init__(self) -> None:
        self.output = ""
        self.done = False
        self.error: str | None = None
        # top-level member name -> (start, end) of its value in `output`; end is None while it is open.
        self.members: dict[str, tuple[int, int | None]] = {}
        self._parts: list[str] = []  # output not yet joined into self.output
        self._length = 0  # len(output) including _parts
        self._stack: list[str] = []  # open containers, "{" or "["
        self._state = _VALUE
        self._fresh = False  # just after "{" or "[": the container may close empty
        self._token = ""  # number or literal being read
        self._string_is_key = False
        self._chars: list[str] = []  # decoded characters of the current string not yet written
        self._key = ""  # decoded text of the current top-level key
        self._escape: str | None = None  # None, "" after a backslash, or "u" + hex digits so far
        self._high_surrogate: int | None = None
        self._member: str | None = None  # top-level member whose value is being written

    def feed(self, text: str) -> int:
        """Consume characters until the value ends or an error; returns how many were consumed."""
        consumed = 0
        for ch in text:
            if self.done or self.error is not None or not self._step(ch):
                break
            consumed += 1
        self._sync()
        return consumed

    def finish(self) -> None:
        """End of input: completes a top-level number or literal (an object or array needs no call)."""
        if self._state in (_NUMBER, _LITERAL) and not self._stack and not self.done and self.error is None:
            self._end_token()
            self._sync()

    # -- output ----------------------------------------------------------------------------------------

    def _sync(self) -> None:
        self._flush_string()
        self.output += "".join(self._parts)
        self._parts.clear()

    def _write(self, s: str) -> None:
        self._parts.append(s)
        self._length += len(s)

    def _flush_string(self) -> None:
        if self._chars:
            text = "".join(self._chars)
            self._chars.clear()
            self._write(json.dumps(text, ensure_ascii=False)[1:-1])
            if self._string_is_key and len(self._stack) == 1:
                self._key += text

    # -- structure -------------------------------------------------------------------------------------

    def _step(self, ch: str) -> bool:
        """Process one character; False when it is not part of the value (a top-level scalar ended)."""
        state = self._state
        if state == _STRING:
            self._string_char(ch)
            return True
        if state in (_NUMBER, _LITERAL):
            if (state == _NUMBER and ch in _NUMBER_CHARS) or (state == _LITERAL and ch.isalpha()):
                self._token += ch
                return True
            self._end_token()
            if self.done or self.error is not None:
                return False
            state = self._state
        if ch in _WHITESPACE:
            return True
        fresh, self._fresh = self._fresh, False
        if state == _VALUE:
            if ch == "]" and fresh:
                self._close(ch)
            else:
                self._start_value(ch)
        elif state == _KEY:
            if ch == '"':
                self._start_string(is_key=True)
            elif ch == "}" and fresh:
                self._close(ch)
            else:
                self.error = f"expected an object key, got {ch!r}"
        elif state == _COLON:
            if ch == ":":
                self._write(": ")
                self._state = _VALUE
            else:
                self.error = f"expected ':', got {ch!r}"
        elif ch == ",":  # _AFTER
            self._write(", ")
            self._state = _KEY if self._stack[-1] == "{" else _VALUE
        elif ch in "}]":
            self._close(ch)
        else:
            self.error = f"expected ',' or a closing bracket, got {ch!r}"
        return True

    def _start_value(self, ch: str) -> None:
        if self._stack == ["{"]:
            self._member = self._key
            self.members[self._key] = (self._length, None)
        if ch in "{[":
            self._write(ch)
            self._stack.append(ch)
            self._state = _KEY if ch == "{" else _VALUE
            self._fresh = True
        elif ch == '"':
            self._start_string(is_key=False)
        elif ch == "-" or ch.isdigit():
            self._state, self._token = _NUMBER, ch
        elif ch.isalpha():
            self._state, self._token = _LITERAL, ch
        else:
            self.error = f"unexpected character {ch!r}"

    def _value_ended(self) -> None:
        if not self._stack:
            self.done = True
            return
        if len(self._stack) == 1 and self._member is not None:
            self.members[self._member] = (self.members[self._member][0], self._length)
            self._member = None
        self._state = _AFTER

    def _close(self, ch: str) -> None:
        if not self._stack or {"}": "{", "]": "["}[ch] != self._stack[-1]:
            self.error = f"unexpected {ch!r}"
            return
        self._stack.pop()
        self._write(ch)
        self._value_ended()

    def _end_token(self) -> None:
        token, kind = self._token, self._state
        self._token = ""
        if kind == _LITERAL:
            if token not in _LITERALS:
                self.error = f"invalid literal {token!r}"
                return
            self._write(token)
        else:
            try:
                number = json.loads(token)
            except json.JSONDecodeError:
                self.error = f"invalid number {token!r}"
                return
            self._write(json.dumps(number))
        self._value_ended()

    # -- strings ---------------------------------------------------------------------------------------

    def _start_string(self, is_key: bool) -> None:
        self._write('"')
        self._state = _STRING
        self._string_is_key = is_key
        if is_key and len(self._stack) == 1:
            self._key = ""

    def _emit_char(self, c: str) -> None:
        """Append one decoded character, pairing UTF-16 surrogates from consecutive \\u escapes."""
        if self._high_surrogate is not None:
            high, self._high_surrogate = self._high_surrogate, None
            if 0xDC00 <= ord(c) <= 0xDFFF:
                c = chr(0x10000 + ((high - 0xD800) << 10) + (ord(c) - 0xDC00))
            else:
                self._chars.append(chr(high))
        if 0xD800 <= ord(c) <= 0xDBFF:
            self._high_surrogate = ord(c)
        else:
            self._chars.append(c)

    def _string_char(self, ch: str) -> None:
        if self._escape == "":
            if ch == "u":
                self._escape = "u"
            elif ch in _SIMPLE_ESCAPES:
                self._escape = None
                self._emit_char(_SIMPLE_ESCAPES[ch])
            else:
                self.error = f"invalid escape \\{ch}"
        elif self._escape is not None:
            if ch not in _HEX_DIGITS:
                self.error = "invalid \\u escape"
                return
            self._escape += ch
            if len(self._escape) == 5:
                code = int(self._escape[1:], 16)
                self._escape = None
                self._emit_char(chr(code))
        elif ch == "\\":
            self._escape = ""
        elif ch == '"':
            if self._high_surrogate is not None:
                self._chars.append(chr(self._high_surrogate))
                self._high_surrogate = None
            self._flush_string()
            self._write('"')
            if self._string_is_key:
                self._state = _COLON
            else:
                self._value_ended()
        elif ord(ch) < 0x20:
            self.error = "control character in a string"
        else:
            self._emit_char(ch)
