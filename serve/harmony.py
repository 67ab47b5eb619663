"""OpenAI's harmony format (gpt-oss), read on token ids as the model writes it after `<|start|>assistant`:

    <|channel|>analysis<|message|>Need the weather.<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{...}<|call|>

    tokens = harmony_tokens(tokenizer)        # the special tokens' ids; None when the tokenizer lacks them
    framer = HarmonyFramer(tokens, tokenizer)
    framer.feed(token_ids) -> [MessageStart(header) | MessageContent(token_ids) | MessageEnd()]

A message is `<|start|>{header}<|message|>{content}`, ended by `<|end|>`, `<|call|>` or `<|return|>`. The
header holds the role, the channel after `<|channel|>`, the recipient (`to=functions.NAME`, before or after the
channel) and the content type (`<|constrain|>json`, or a bare last word as in `commentary json`). The first
message has no `<|start|>`: the prompt ends with `<|start|>assistant`.

The ids come from the checkpoint's own tokenizer (o200k's 200006... are never assumed), and no `openai-harmony`
package is needed: it downloads its vocabulary at run time, which a server without network cannot.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("jaxllm.serve")

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
CONSTRAIN, CALL, RETURN = "<|constrain|>", "<|call|>", "<|return|>"
FUNCTIONS = "functions."  # the namespace of the request's tools, as harmony's developer message declares them
REASONING_EFFORTS = ("low", "medium", "high")  # what harmony's system message takes (`Reasoning: high`)
_ROLES = frozenset({"assistant", "system", "developer", "user", "tool"})
_CHANNEL_NAME = re.compile(r"[^\s<]*")


@dataclass(frozen=True)
class HarmonyTokens:
    start: int
    message: int
    channel: int
    message_ends: frozenset[int]  # <|end|>, <|call|>, <|return|>


@functools.lru_cache(maxsize=4)
def harmony_tokens(tokenizer: Any) -> HarmonyTokens | None:
    """The harmony special tokens' ids in `tokenizer`; None (logged once) when it does not have all of them."""
    ids = {text: _single_token_id(tokenizer, text) for text in (START, END, MESSAGE, CHANNEL, CONSTRAIN, CALL, RETURN)}
    missing = [text for text, token_id in ids.items() if token_id is None]
    if missing:
        logger.error("The tokenizer has no harmony token %s: gpt-oss output is left as plain content.",
                     ", ".join(missing))
        return None
    return HarmonyTokens(ids[START], ids[MESSAGE], ids[CHANNEL], frozenset((ids[END], ids[CALL], ids[RETURN])))


def _single_token_id(tokenizer: Any, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


@dataclass(frozen=True)
class Header:
    channel: str | None
    recipient: str | None
    content_type: str | None

    @property
    def function_name(self) -> str | None:
        """NAME when the message is addressed to `functions.NAME`: a call of one of the request's tools."""
        if self.recipient is None or not self.recipient.startswith(FUNCTIONS):
            return None
        return self.recipient[len(FUNCTIONS):] or None

    @property
    def is_reasoning(self) -> bool:
        """The chain of thought: the analysis channel, less calls of the request's tools made from it."""
        return self.channel == "analysis" and self.function_name is None


def parse_header(text: str) -> Header:
    """A header's text, its special tokens written out: `assistant to=functions.f<|channel|>commentary json`,
    `<|channel|>commentary to=functions.f <|constrain|>json`, `<|channel|>final`."""
    channel = None
    at = text.find(CHANNEL)
    if at != -1:
        after = text[at + len(CHANNEL):]
        name = _CHANNEL_NAME.match(after)
        assert name is not None  # the pattern matches the empty string
        channel = name.group() or None
        text = f"{text[:at]} {after[name.end():]}"
    words = [word.removeprefix(CONSTRAIN) for word in text.replace(CONSTRAIN, f" {CONSTRAIN}").split()]
    words = [word for word in words if word]
    if words and words[0] in _ROLES:
        words = words[1:]
    recipients = [word.removeprefix("to=") for word in words if word.startswith("to=")]
    others = [word for word in words if not word.startswith("to=")]
    return Header(channel, recipients[-1] if recipients else None, others[-1] if others else None)


@dataclass(frozen=True)
class MessageStart:
    header: Header


@dataclass(frozen=True)
class MessageContent:
    token_ids: list[int]


@dataclass(frozen=True)
class MessageEnd:
    pass


HarmonyEvent = MessageStart | MessageContent | MessageEnd


class HarmonyFramer:
    """One output's token ids -> its messages' headers, content ids and ends, as the ids come in.

    Lenient where harmony's own parser raises: tokens between a message's end and the next `<|start|>` are read
    as header (a missing `<|start|>`), and a header that ends without `<|message|>` is dropped."""

    def __init__(self, tokens: HarmonyTokens, tokenizer: Any) -> None:
        self._tokens, self._tokenizer = tokens, tokenizer
        self._in_content = False
        self._header_ids: list[int] = []

    def feed(self, token_ids: list[int]) -> list[HarmonyEvent]:
        events: list[HarmonyEvent] = []
        content: list[int] = []
        for token_id in token_ids:
            if self._in_content:
                if token_id in self._tokens.message_ends:
                    if content:
                        events.append(MessageContent(content))
                        content = []
                    events.append(MessageEnd())
                    self._in_content = False
                else:
                    content.append(token_id)
            elif token_id == self._tokens.message:
                header = self._tokenizer.decode(self._header_ids, skip_special_tokens=False)
                events.append(MessageStart(parse_header(header)))
                self._in_content, self._header_ids = True, []
            elif token_id == self._tokens.start or token_id in self._tokens.message_ends:
                self._header_ids = []
            else:
                self._header_ids.append(token_id)
        if content:
            events.append(MessageContent(content))
        return events


class GptOssReasoningParser:
    """`--reasoning-parser openai_gptoss`: gpt-oss's reasoning is its analysis channel, read on token ids with the
    rest of its harmony output (serve.harmony_chat); this parser counts its tokens for the usage."""

    def __init__(self, chat_template_kwargs: dict[str, Any] | None = None) -> None:
        """`chat_template_kwargs` do not change what is reasoning: gpt-oss always writes an analysis channel."""

    def count_reasoning_tokens(self, token_ids: list[int], tokenizer: Any) -> int:
        """The content tokens of the output's reasoning messages (headers and markers not counted)."""
        tokens = harmony_tokens(tokenizer)
        if tokens is None:
            return 0
        count, reasoning = 0, False
        for event in HarmonyFramer(tokens, tokenizer).feed(token_ids):
            if isinstance(event, MessageStart):
                reasoning = event.header.is_reasoning
            elif isinstance(event, MessageContent) and reasoning:
                count += len(event.token_ids)
        return count
