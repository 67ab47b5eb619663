"""`--tool-call-parser openai`: gpt-oss's function calls, harmony messages addressed to `functions.NAME`.

    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"X"}<|call|>

They are read on token ids with the rest of the harmony output (serve.harmony_chat), which opens a call here at
each such message's header and feeds its content as the arguments; the stream turns them into `tool_calls`
deltas (id and name first, then argument fragments) and keeps the calls whole in `tool_calls`.

NOTE: the arguments are the model's JSON text as written (vLLM streams them so), not re-serialized as the
text parsers' are: a call is streamed as its tokens come, and text already sent cannot be taken back if the
JSON turns out broken. The non-streamed reply is built by the same stream, so the two always agree.
"""

from __future__ import annotations

from typing import Any

from serve.tool_parsers.base import ToolCallStream


class OpenAIToolParser:
    keeps_special_tokens = False  # the calls are read on token ids, not in the text

    def stream(self, request: Any = None) -> HarmonyToolCallStream:
        return HarmonyToolCallStream(request)


class HarmonyToolCallStream(ToolCallStream):
    """One choice's calls: `open(name)` at a call's header, then `feed(argument_text)` as its content comes."""

    def __init__(self, request: Any) -> None:
        super().__init__(request)
        self._index: int | None = None  # the open call's; None when parallel_tool_calls=false dropped it

    def open(self, name: str) -> None:
        self._index = self.start_call(name)

    def _consume(self, text: str) -> None:
        self.emit_arguments(self._index, text)
