"""What every tool-call parser returns, and the streaming machinery they share.

Non-streaming: `parser.extract_tool_calls(model_output, request) -> ExtractedToolCalls`.
Streaming: `stream = parser.stream(request)`, then `stream.feed(delta_text)` for each text delta and
`stream.finish()` at the end; each returns an OpenAI chat-completion `delta` dict (`{"content": ...}`,
`{"tool_calls": [...]}`, or both) or None when there is nothing to send yet. Tool-call deltas are shaped
as the OpenAI SDK accumulates them: `{"index", "id", "type": "function", "function": {"name"}}` first,
then `{"index", "function": {"arguments": <fragment>}}`, the fragments concatenating to the final
arguments JSON.

`request` is the chat request, a dict or an object; only `parallel_tool_calls` (default true) is read.
Arguments are always `json.dumps(value, ensure_ascii=False)` of the parsed value, streamed or not.
"""

from __future__ import annotations

import json
import random
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from serve.tool_parsers.json_stream import CanonicalJsonWriter

_ALPHANUMERIC = string.ascii_letters + string.digits


@dataclass
class ExtractedToolCalls:
    tools_called: bool
    # [{"id", "type": "function", "function": {"name", "arguments": <JSON string>}}]
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    content: str | None = None


def make_tool_call_id() -> str:
    """vLLM's tool call id: `chatcmpl-tool-` and 32 random hex digits."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def make_mistral_tool_call_id() -> str:
    """Mistral's tool call id: 9 random alphanumeric characters (mistral-common rejects other ids)."""
    return "".join(random.choices(_ALPHANUMERIC, k=9))


def tool_call(name: str, arguments: str, call_id: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def dump_arguments(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def request_field(request: Any, name: str, default: Any) -> Any:
    """A field of the chat request, given as a dict or an object (None when absent)."""
    if request is None:
        return default
    value = request.get(name, default) if isinstance(request, dict) else getattr(request, name, default)
    return default if value is None else value


def keep_calls(calls: list[dict[str, Any]], request: Any) -> list[dict[str, Any]]:
    """`parallel_tool_calls=false` keeps only the first call."""
    return calls if request_field(request, "parallel_tool_calls", True) else calls[:1]


def partial_tag_overlap(text: str, tag: str) -> int:
    """Length of the longest proper prefix of `tag` that ends `text` (text held back in case a tag follows)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ToolCallStream:
    """Base of the per-request streaming state: collects the content and tool-call deltas of one feed."""

    def __init__(self, request: Any, make_id: Callable[[], str] = make_tool_call_id) -> None:
        self._parallel = bool(request_field(request, "parallel_tool_calls", True))
        self._make_id = make_id
        self.tool_calls: list[dict[str, Any]] = []  # what was sent so far, accumulated
        self._content: list[str] = []
        self._deltas: list[dict[str, Any]] = []

    @property
    def tools_called(self) -> bool:
        return bool(self.tool_calls)

    def feed(self, delta_text: str) -> dict[str, Any] | None:
        self._consume(delta_text)
        return self._take()

    def finish(self) -> dict[str, Any] | None:
        """End of output: sends text held back in case it began a tag."""
        self._finish()
        return self._take()

    def _consume(self, text: str) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        pass

    def _take(self) -> dict[str, Any] | None:
        delta: dict[str, Any] = {}
        content = "".join(self._content)
        if content:
            delta["content"] = content
        if self._deltas:
            delta["tool_calls"] = self._deltas
        self._content, self._deltas = [], []
        return delta or None

    def _emit_content(self, text: str) -> None:
        if text:
            self._content.append(text)

    def start_call(self, name: str, call_id: str | None = None) -> int | None:
        """Send a call's id and name; returns its index, or None when parallel calls are off and one was sent."""
        if self.tool_calls and not self._parallel:
            return None
        index = len(self.tool_calls)
        call_id = call_id or self._make_id()
        self.tool_calls.append(tool_call(name, "", call_id))
        self._deltas.append({"index": index, "id": call_id, "type": "function", "function": {"name": name}})
        return index

    def emit_arguments(self, index: int | None, fragment: str) -> None:
        if index is None or not fragment:
            return
        self.tool_calls[index]["function"]["arguments"] += fragment
        self._deltas.append({"index": index, "function": {"arguments": fragment}})


class CallObjectReader:
    """Streams one JSON tool-call object, `{"name": "f", "arguments": {...}}`, into a `ToolCallStream`.

    The call is sent (committed) once its name is complete and its arguments have begun; argument
    fragments follow as the canonical JSON of the arguments grows. Until the commit nothing is sent, so a
    caller can still hand the raw text back as content when the object turns out not to be a call.
    """

    def __init__(self, stream: ToolCallStream, argument_keys: tuple[str, ...] = ("arguments",)) -> None:
        self._stream = stream
        self._argument_keys = argument_keys
        self.writer = CanonicalJsonWriter()
        self.committed = False
        self._index: int | None = None
        self._sent = 0

    @property
    def done(self) -> bool:
        return self.writer.done

    @property
    def failed(self) -> bool:
        """Invalid JSON, or a complete object that is not a call (no string name, no arguments)."""
        if self.writer.error is not None:
            return True
        return self.writer.done and not self.committed

    def feed(self, text: str) -> int:
        consumed = self.writer.feed(text)
        self._pump()
        return consumed

    def _arguments_span(self) -> tuple[int, int] | None:
        for key in self._argument_keys:
            if key in self.writer.members:
                start, end = self.writer.members[key]
                return start, len(self.writer.output) if end is None else end
        return None

    def _pump(self) -> None:
        members, output = self.writer.members, self.writer.output
        span = self._arguments_span()
        if not self.committed:
            name_span = members.get("name")
            if span is None or name_span is None or name_span[1] is None:
                return
            name = json.loads(output[name_span[0] : name_span[1]])
            if not isinstance(name, str):
                return
            self.committed = True
            self._index = self._stream.start_call(name)
        if span is not None:
            self._stream.emit_arguments(self._index, output[span[0] + self._sent : span[1]])
            self._sent = span[1] - span[0]
