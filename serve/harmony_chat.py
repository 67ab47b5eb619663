"""gpt-oss output, read as harmony on token ids (serve.harmony), into chat message fields, as vLLM maps them.

Harmony is on for a model whose config.json says `model_type: gpt_oss` (vLLM's `use_harmony`), flags or not,
and for any model under `--reasoning-parser openai_gptoss` or `--tool-call-parser openai`:

- the `analysis` channel -> reasoning (`reasoning` and `reasoning_content`, as the text reasoning parsers);
- `final`, and `commentary` without a recipient (a preamble meant for the user) -> content;
- a message to `functions.NAME` -> a tool call (`--tool-call-parser openai`, tool_choice "auto"), else dropped
  (vLLM's: a gpt-oss model takes tool_choice "auto" without --enable-auto-tool-choice, and drops the calls);
- anything else (calls of built-in tools such as `browser.search`) -> dropped.

    harmony = uses_harmony(args.reasoning_parser, args.tool_call_parser, info.model_type)
    parsers = harmony_output_parsers(reasoning_parser, tool_parser, request, tokenizer)  # None: no harmony tokens
    stop_token_ids = assistant_action_stops(info.model_type, tokenizer)  # a gpt-oss chat request's extra stops
    parsers.parse(text, token_ids) -> ParsedOutput
    stream = parsers.stream(); stream.feed(text, token_ids) / stream.finish() -> chat `delta` dict | None

The text is not read: special tokens skipped, it has lost the format. A whole output is parsed by streaming it
through in one feed, so the streamed and non-streamed replies agree; an output cut off by max_tokens keeps what
its open message wrote, in that message's field. Each message's text is decoded on its own (its tokens only).
NOTE: two messages of one field are joined with "\\n" (vLLM's non-streamed join), streamed too, where vLLM's
stream runs them together.
"""

from __future__ import annotations

from typing import Any

from jaxllm.engine.detokenizer import make_incremental_detokenizer
from serve.errors import APIError
from serve.harmony import (
    CALL,
    REASONING_EFFORTS,
    RETURN,
    GptOssReasoningParser,
    HarmonyFramer,
    HarmonyTokens,
    Header,
    MessageContent,
    MessageStart,
    harmony_tokens,
)
from serve.output_parsing import ParsedOutput, ReasoningParser
from serve.tool_parsers import ToolParser
from serve.tool_parsers.openai import HarmonyToolCallStream, OpenAIToolParser

GPT_OSS = "gpt_oss"  # the model_type vLLM serves through harmony


def uses_harmony(reasoning_parser: str | None, tool_call_parser: str | None, model_type: str | None) -> bool:
    """Whether chat output is read as harmony: the model is gpt-oss, or the flags name a harmony parser."""
    return model_type == GPT_OSS or reasoning_parser == "openai_gptoss" or tool_call_parser == "openai"


def assistant_action_stops(model_type: str | None, tokenizer: Any) -> list[int]:
    """The ids of `<|return|>` and `<|call|>`, which end a gpt-oss chat reply whatever its generation config says
    (vLLM adds harmony's `stop_tokens_for_assistant_actions` to its chat requests' stop_token_ids); [] for
    another model, or a tokenizer without the harmony tokens."""
    if model_type != GPT_OSS or harmony_tokens(tokenizer) is None:
        return []
    return tokenizer.convert_tokens_to_ids([RETURN, CALL])


def check_reasoning_effort(effort: str | None) -> None:
    """vLLM's 400 for an effort harmony's system message has no words for (`none`, `minimal`, `xhigh`, ...)."""
    if effort is not None and effort not in REASONING_EFFORTS:
        raise APIError(f"reasoning_effort={effort!r} is not supported by Harmony. Supported values are: "
                       f"{', '.join(reversed(REASONING_EFFORTS))}.", param="reasoning_effort")


def harmony_output_parsers(reasoning: ReasoningParser | GptOssReasoningParser | None, tools: ToolParser | None,
                           request: Any, tokenizer: Any) -> HarmonyOutputParsers | None:
    """The request's parsers; only the harmony ones take part (`openai_gptoss` counts the reasoning tokens, `openai`
    reads the calls: under another tool parser they are dropped). None when the tokenizer has no harmony tokens
    (logged once): the output is then plain content."""
    tokens = harmony_tokens(tokenizer)
    if tokens is None:
        return None
    return HarmonyOutputParsers(reasoning if isinstance(reasoning, GptOssReasoningParser) else None,
                                tools if isinstance(tools, OpenAIToolParser) else None, request, tokens, tokenizer)


class HarmonyOutputParsers:
    def __init__(self, reasoning: GptOssReasoningParser | None, tools: OpenAIToolParser | None, request: Any,
                 tokens: HarmonyTokens, tokenizer: Any) -> None:
        self.reasoning = reasoning  # counts the usage's reasoning tokens
        self._tools, self._request, self._tokens, self._tokenizer = tools, request, tokens, tokenizer

    def parse(self, text: str, token_ids: list[int]) -> ParsedOutput:
        stream = self.stream()
        delta = stream.feed(text, token_ids) or {}
        return ParsedOutput(delta.get("reasoning"), delta.get("content"), stream.tool_calls)

    def stream(self) -> HarmonyChoiceParser:
        tools = self._tools.stream(self._request) if self._tools is not None else None
        return HarmonyChoiceParser(self._tokens, self._tokenizer, tools)


class HarmonyChoiceParser:
    """One choice's streaming state: the message being read, where its text goes, its decoder."""

    def __init__(self, tokens: HarmonyTokens, tokenizer: Any, tools: HarmonyToolCallStream | None) -> None:
        self._framer = HarmonyFramer(tokens, tokenizer)
        self._tokenizer, self._tools = tokenizer, tools
        self._field: str | None = None  # the open message's: "reasoning", "content", "tool_calls"; None: dropped
        self._decoder: Any = None  # the open message's incremental detokenizer
        self._written: set[str] = set()  # fields that have text: a later message's text starts with "\n"
        self._separate = False  # the open message's first text needs that "\n"

    @property
    def tools_called(self) -> bool:
        return self._tools is not None and self._tools.tools_called

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """The calls so far, whole: `[{"id", "type", "function": {"name", "arguments"}}]`."""
        return self._tools.tool_calls if self._tools is not None else []

    def feed(self, text: str, token_ids: list[int]) -> dict[str, Any] | None:
        """The delta for the output's next tokens (`text`, the same output as text, is not read)."""
        texts: dict[str, str] = {}
        tool_calls: list[dict[str, Any]] = []
        for event in self._framer.feed(token_ids):
            if isinstance(event, MessageStart):
                tool_calls += self._open(event.header)
            elif isinstance(event, MessageContent):
                tool_calls += self._write(self._decode(event.token_ids), texts)
            else:
                self._field = None
        delta: dict[str, Any] = {}
        if texts.get("reasoning"):
            delta["reasoning"] = delta["reasoning_content"] = texts["reasoning"]
        if texts.get("content"):
            delta["content"] = texts["content"]
        if tool_calls:
            delta["tool_calls"] = tool_calls
        return delta or None

    def finish(self) -> None:
        """Nothing is held back: each message's text goes out as its tokens come (a character that max_tokens
        cut in two is dropped)."""

    def _open(self, header: Header) -> list[dict[str, Any]]:
        name = header.function_name
        if name is not None:
            self._field = "tool_calls" if self._tools is not None else None
        elif header.is_reasoning:
            self._field = "reasoning"
        elif header.channel == "final" or (header.channel == "commentary" and header.recipient is None):
            self._field = "content"
        else:
            self._field = None
        self._decoder = make_incremental_detokenizer(self._tokenizer, []) if self._field else None
        self._separate = self._field in self._written
        if self._field == "tool_calls":
            assert self._tools is not None and name is not None
            self._tools.open(name)
            return self._tool_deltas("")
        return []

    def _decode(self, token_ids: list[int]) -> str:
        if self._field is None:
            return ""
        # NOTE: decode_all's one-call path leaves the decoder's fast token stream for good, and a streamed
        # message comes a token at a time: those go through decode_next.
        if len(token_ids) == 1:
            return self._decoder.decode_next(token_ids[0])
        return self._decoder.decode_all(token_ids)

    def _write(self, text: str, texts: dict[str, str]) -> list[dict[str, Any]]:
        """The open message's next text into `texts`, or as its call's argument deltas (returned)."""
        if not text or self._field is None:
            return []
        if self._field == "tool_calls":
            return self._tool_deltas(text)
        if self._separate:
            text, self._separate = "\n" + text, False
        self._written.add(self._field)
        texts[self._field] = texts.get(self._field, "") + text
        return []

    def _tool_deltas(self, arguments: str) -> list[dict[str, Any]]:
        assert self._tools is not None
        return (self._tools.feed(arguments) or {}).get("tool_calls", [])
