"""Reasoning parsers: split `<think>...</think>` output into reasoning and content, streamed or not.

    parser = get_reasoning_parser("qwen3", chat_template_kwargs=request.chat_template_kwargs)
    reasoning, content = parser.extract_reasoning(text)          # non-streaming, each str | None
    stream = parser.stream(); stream.feed(delta_text) / stream.finish()
        # -> {"reasoning": ..., "content": ...} (keys only when non-empty) or None

The server sends reasoning as both `reasoning` (vLLM's current field) and `reasoning_content` (the older
name), and feeds only the content part to a tool-call parser. `openai_gptoss` is not read here: gpt-oss
writes OpenAI's harmony format, read on token ids by `serve.harmony_chat`.

Semantics (vLLM's current parsers, text-based rather than token-id based):
- both: a `<think>` in the output is dropped (templates that put it in the prompt make the output start
  inside the reasoning); text before `</think>` is reasoning, after it content (None when empty); with
  no `</think>` at all the whole output is reasoning (a truncated thought).
- qwen3: with `chat_template_kwargs={"enable_thinking": false}` the template closes the think block in
  the prompt, so the whole output is content. A `<tool_call>` followed by `<function` (Qwen3.5's XML tool
  calls, emitted inside the thinking block) also ends the reasoning; the call is content.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from serve.harmony import GptOssReasoningParser
from serve.tool_parsers.base import partial_tag_overlap

THINK_START, THINK_END = "<think>", "</think>"
TOOL_CALL = "<tool_call>"
_FUNCTION_OPEN = re.compile(r"<function[\s=]")
_FUNCTION = "<function"


def _after_start_tag(text: str) -> str:
    before, tag, after = text.partition(THINK_START)
    return after if tag else before


class DeepSeekR1ReasoningParser:
    def __init__(self, chat_template_kwargs: dict[str, Any] | None = None) -> None:
        self.thinking_enabled = True

    def extract_reasoning(self, model_output: str) -> tuple[str | None, str | None]:
        text = _after_start_tag(model_output)
        if THINK_END not in text:
            return text, None
        reasoning, _, content = text.partition(THINK_END)
        return reasoning, content or None

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self.thinking_enabled, implicit_tool_call_end=False)

    def count_reasoning_tokens(self, token_ids: list[int], tokenizer: Any) -> int:
        """The output's reasoning tokens (vLLM's `usage.completion_tokens_details.reasoning_tokens`): those
        before `</think>`, after a leading `<think>` (the tags not counted), all of them for a thought cut off,
        none with thinking off. Where the tags are not single tokens, the reasoning text's tokens."""
        if not self.thinking_enabled:
            return 0
        start, end = _tag_ids(tokenizer)
        if end is None:
            reasoning, _ = self.extract_reasoning(tokenizer.decode(token_ids))
            return len(tokenizer.encode(reasoning, add_special_tokens=False)) if reasoning else 0
        ids = token_ids[1:] if token_ids[:1] == [start] else token_ids
        return ids.index(end) if end in ids else len(ids)


class Qwen3ReasoningParser(DeepSeekR1ReasoningParser):
    def __init__(self, chat_template_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__(chat_template_kwargs)
        self.thinking_enabled = bool((chat_template_kwargs or {}).get("enable_thinking", True))

    def extract_reasoning(self, model_output: str) -> tuple[str | None, str | None]:
        # NOTE: vLLM still splits at a </think> when thinking is off; its streaming path sends everything as
        # content then. We take the streaming behaviour for both, so the two always agree.
        if not self.thinking_enabled:
            return None, model_output
        text = _after_start_tag(model_output)
        if THINK_END in text:
            reasoning, _, content = text.partition(THINK_END)
            return reasoning, content or None
        tool_call = text.find(TOOL_CALL)
        if tool_call != -1 and _FUNCTION_OPEN.match(text[tool_call + len(TOOL_CALL) :].lstrip()):
            return text[:tool_call] or None, text[tool_call:] or None
        return text, None

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self.thinking_enabled, implicit_tool_call_end=True)


@functools.lru_cache(maxsize=4)
def _tag_ids(tokenizer: Any) -> tuple[int | None, int | None]:
    """The ids of `<think>` and `</think>` where each is one token. NOTE: cached: a stream with running usage
    counts its reasoning tokens at every chunk."""
    return _single_token_id(tokenizer, THINK_START), _single_token_id(tokenizer, THINK_END)


def _single_token_id(tokenizer: Any, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


class ReasoningStream:
    """Per-request streaming state; text that may be the start of a tag is held back until it is not."""

    def __init__(self, thinking_enabled: bool, implicit_tool_call_end: bool) -> None:
        self._state = "start" if thinking_enabled else "content"
        self._implicit_tool_call_end = implicit_tool_call_end
        self._tool_call_checked = False  # only the first <tool_call> may end the reasoning (as vLLM)
        self._buffer = ""
        self._reasoning: list[str] = []
        self._content: list[str] = []

    def feed(self, delta_text: str) -> dict[str, str] | None:
        self._buffer += delta_text
        self._advance(final=False)
        return self._take()

    def finish(self) -> dict[str, str] | None:
        self._advance(final=True)
        return self._take()

    def _take(self) -> dict[str, str] | None:
        delta = {}
        if self._reasoning:
            delta["reasoning"] = "".join(self._reasoning)
        if self._content:
            delta["content"] = "".join(self._content)
        self._reasoning, self._content = [], []
        return {k: v for k, v in delta.items() if v} or None

    def _advance(self, final: bool) -> None:
        while True:
            if self._state == "start":
                stripped = self._buffer.lstrip()
                if stripped.startswith(THINK_START):
                    self._buffer = stripped[len(THINK_START) :]
                elif THINK_START.startswith(stripped) and not final:
                    return  # may still become <think>
                self._state = "reasoning"
            elif self._state == "reasoning":
                if not self._advance_reasoning(final):
                    return
            else:
                self._content.append(self._buffer)
                self._buffer = ""
                return

    def _advance_reasoning(self, final: bool) -> bool:
        """Emit reasoning up to the end of the thought; True when the state moved on to content."""
        buffer = self._buffer
        end = buffer.find(THINK_END)
        tool_call, hold = self._tool_call_end(buffer if end == -1 else buffer[:end], final)
        if tool_call != -1:
            self._reasoning.append(buffer[:tool_call])
            self._buffer, self._state = buffer[tool_call:], "content"
            return True
        if end != -1 and hold == -1:
            self._reasoning.append(buffer[:end])
            self._buffer, self._state = buffer[end + len(THINK_END) :], "content"
            return True
        if final:
            keep = 0
        elif hold != -1:
            keep = len(buffer) - hold
        else:
            keep = max(partial_tag_overlap(buffer, THINK_END), self._partial_tool_call(buffer))
        self._reasoning.append(buffer[: len(buffer) - keep])
        self._buffer = buffer[len(buffer) - keep :]
        return False

    def _partial_tool_call(self, text: str) -> int:
        if not self._implicit_tool_call_end or self._tool_call_checked:
            return 0
        return partial_tag_overlap(text, TOOL_CALL)

    def _tool_call_end(self, text: str, final: bool) -> tuple[int, int]:
        """(position of a confirmed `<tool_call><function` end, -1 if none; position to hold back from while
        a first `<tool_call>` waits for what follows it, -1 if none)."""
        if not self._implicit_tool_call_end or self._tool_call_checked:
            return -1, -1
        at = text.find(TOOL_CALL)
        if at == -1:
            return -1, -1
        after = text[at + len(TOOL_CALL) :].lstrip()
        if _FUNCTION_OPEN.match(after):
            self._tool_call_checked = True
            return at, -1
        if not final and (after == _FUNCTION[: len(after)] or after == _FUNCTION):
            return -1, at  # "<function" may still come
        self._tool_call_checked = True  # the first <tool_call> is not a call: reasoning goes on
        return -1, -1


REASONING_PARSERS = {
    "deepseek_r1": DeepSeekR1ReasoningParser,
    "qwen3": Qwen3ReasoningParser,
    "openai_gptoss": GptOssReasoningParser,  # harmony, read on token ids: serve.harmony_chat
}


def get_reasoning_parser(
    name: str, chat_template_kwargs: dict[str, Any] | None = None
) -> DeepSeekR1ReasoningParser | Qwen3ReasoningParser | GptOssReasoningParser:
    """The parser for `--reasoning-parser NAME`, for one request; ValueError for an unknown name."""
    try:
        parser_class = REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(
            f"invalid reasoning parser: {name} (chose from {{ {', '.join(REASONING_PARSERS)} }})"
        ) from None
    return parser_class(chat_template_kwargs)
