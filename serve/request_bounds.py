"""The work one request body may ask for: checked on its bytes before it is parsed, and exactly after.

    prescan(body, bounds)        the raw bytes: a body over a bound is refused before `json.loads` builds it
    check_parsed(value, bounds)  the parsed body: each bound exactly (a body the pre-scan let through)
    check_prompt_tokens(...)     the prompts' tokens once text prompts are tokenized

Parsing costs about 100 bytes of Python objects per JSON value: 2,500,000 one-token prompts in 20 MB parse
in 1.6 s to 244 MB before any check could run. So the pre-scan counts first: an upper bound on the body's
values from three `bytes.count`s (every value but the last of a container is followed by a comma), which
lets an ordinary body straight through; over it, a walk of the JSON structure counts exactly and stops at
the first bound passed. Token-id lists are read in one regex match each, and their ids count towards the
prompt-token and vocabulary bounds, not the JSON-values one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from serve.args import ServerArgs
from serve.errors import APIError

_WHITESPACE = re.compile(rb"[ \t\n\r]*")
# NOTE: possessive repeats (*+): a regex over a 2-million-id list keeps no backtracking state per id.
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
_SCALAR = re.compile(rb"-?(?:Infinity|[0-9][0-9.eE+-]*+)|true|false|null|NaN")
_INT_ARRAY = re.compile(rb"\[[ \t\n\r]*+(?:-?[0-9]++[ \t\n\r]*+(?:,[ \t\n\r]*+-?[0-9]++[ \t\n\r]*+)*+)?\]")
_DIGIT = re.compile(rb"[0-9]")
_OPENERS = b"[{"
_CLOSERS = b"]}"
_RAISE_WITH = "the maximum allowed count. To increase this limit, set {flag}"
# Their ids count towards the vocabulary bound, not the JSON-values one.
_TOKEN_ID_LISTS = frozenset({"allowed_token_ids", "stop_token_ids"})


@dataclass(frozen=True)
class RequestBounds:
    max_n_sequences: int
    max_completion_prompts: int
    max_prompt_tokens: int
    max_stop_strings: int
    max_num_bad_words: int
    max_json_values: int
    vocab_size: int  # a token-id list or logit_bias longer than the vocabulary repeats ids or leaves it

    @classmethod
    def of(cls, args: ServerArgs, vocab_size: int) -> RequestBounds:
        return cls(max_n_sequences=args.max_n_sequences, max_completion_prompts=args.max_completion_prompts,
                   max_prompt_tokens=args.max_prompt_tokens_per_request, max_stop_strings=args.max_stop_strings,
                   max_num_bad_words=args.max_num_bad_words, max_json_values=args.max_request_json_values,
                   vocab_size=vocab_size)

    def list_limits(self) -> dict[str, tuple[int, str]]:
        """Top-level list (or object) fields -> (most items, how that limit is raised or why it holds)."""
        vocabulary = (self.vocab_size, "the model's vocabulary size: its ids repeat or fall outside the vocabulary")
        return {
            "stop": (self.max_stop_strings, _RAISE_WITH.format(flag="--max-stop-strings")),
            "bad_words": (self.max_num_bad_words, _RAISE_WITH.format(flag="--max-num-bad-words")),
            "allowed_token_ids": vocabulary,
            "stop_token_ids": vocabulary,
            "logit_bias": vocabulary,
        }


# ---- the messages ----


def _too_many_prompts(bounds: RequestBounds) -> APIError:
    # NOTE: vLLM's words less the length, which the pre-scan stops counting past the limit.
    return APIError(f"prompt list length exceeds the maximum allowed count of {bounds.max_completion_prompts}. To "
                    "increase this limit, set --max-completion-prompts.", param="prompt")


def _too_many_tokens(limit: int) -> APIError:
    return APIError(f"The request's prompts hold more than {limit} tokens together, the maximum "
                    "allowed. To increase this limit, set --max-prompt-tokens-per-request.", param="prompt")


def _too_many_items(field: str, limit: int, why: str) -> APIError:
    return APIError(f"`{field}` holds more than {limit} items, {why}.", param=field)


def _too_many_values(bounds: RequestBounds) -> APIError:
    return APIError(f"The request body holds more than {bounds.max_json_values} JSON values (arrays, objects, "
                    "strings, numbers). To increase this limit, set --max-request-json-values.")


# ---- after parsing ----


def check_parsed(value: Any, bounds: RequestBounds) -> None:
    """Each bound on the parsed body (a JSON object; anything else is left to the request model's 400)."""
    if not isinstance(value, dict):
        return
    n = value.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > bounds.max_n_sequences:
        raise APIError(f"n must be at most {bounds.max_n_sequences}, got {n}. To increase this limit, set "
                       "--max-n-sequences.", param="n")
    prompt = value.get("prompt")
    if isinstance(prompt, list):
        if all(isinstance(token, int) for token in prompt):
            tokens = len(prompt)
        else:
            if len(prompt) > bounds.max_completion_prompts:
                raise _too_many_prompts(bounds)
            tokens = sum(len(item) for item in prompt if isinstance(item, list))
        check_prompt_tokens(tokens, bounds.max_prompt_tokens)
    conversations = value.get("messages")  # a batch chat's: a list of message lists
    if (isinstance(conversations, list) and len(conversations) > bounds.max_completion_prompts
            and all(isinstance(messages, list) for messages in conversations)):
        raise APIError(f"The batch holds more than {bounds.max_completion_prompts} conversations, the maximum "
                       "allowed count. To increase this limit, set --max-completion-prompts.", param="messages")
    for field, (limit, why) in bounds.list_limits().items():
        items = value.get(field)
        if isinstance(items, list | dict) and len(items) > limit:
            raise _too_many_items(field, limit, why)


def check_prompt_tokens(num_tokens: int, limit: int) -> None:
    """`limit`: --max-prompt-tokens-per-request."""
    if num_tokens > limit:
        raise _too_many_tokens(limit)


# ---- before parsing ----


def needs_walk(body: bytes, bounds: RequestBounds) -> bool:
    """Whether the body may hold more values than the JSON-values bound (when not, parsing it is cheap and
    `check_parsed` is enough): every value but the last of a container is followed by a comma."""
    return body.count(b",") + body.count(b"[") + body.count(b"{") + 1 > bounds.max_json_values


def prescan(body: bytes, bounds: RequestBounds) -> None:
    """Refuse a body over a bound from its bytes; a malformed one is left to the parser's error."""
    if not needs_walk(body, bounds):
        return
    try:
        _Walk(body, bounds).top_level()
    except _Malformed:
        pass


class _Malformed(Exception):
    """Not JSON the walk can follow: the parser reports it."""


class _TooManyItems(Exception):
    """A bounded field holds more items than its limit (the caller names the field)."""


class _Walk:
    """One pass over the JSON structure, counting as it goes: the top-level object's bounded fields by their
    items, every value against the JSON-values bound."""

    def __init__(self, body: bytes, bounds: RequestBounds) -> None:
        self.body = body
        self.bounds = bounds
        self.values = 0

    def top_level(self) -> None:
        pos = self._skip_whitespace(0)
        if not self.body.startswith(b"{", pos):
            self._value(pos)
            return
        self._count(1)
        pos += 1
        list_limits = self.bounds.list_limits()
        while True:
            pos = self._skip_whitespace(pos)
            head = self.body[pos:pos + 1]
            if head == b"}" or not head:
                return
            if head == b",":
                pos += 1
                continue
            key = self._match(_STRING, pos)
            name = self.body[key.start() + 1:key.end() - 1].decode(errors="replace")
            pos = self._skip_whitespace(key.end())
            if not self.body.startswith(b":", pos):
                raise _Malformed
            pos = self._skip_whitespace(pos + 1)
            if name == "prompt":
                pos = self._prompt(pos)
            elif name in list_limits:
                limit, why = list_limits[name]
                try:
                    pos = self._value(pos, item_limit=limit, token_ids=name in _TOKEN_ID_LISTS)
                except _TooManyItems:
                    raise _too_many_items(name, limit, why) from None
            else:
                pos = self._value(pos)

    def _prompt(self, pos: int) -> int:
        """A completions `prompt`: one token-id list, or a list of prompts (strings or token-id lists)."""
        if (flat := _INT_ARRAY.match(self.body, pos)) is not None:
            check_prompt_tokens(self._ids_in(flat), self.bounds.max_prompt_tokens)
            self._count(1)
            return flat.end()
        if not self.body.startswith(b"[", pos):
            return self._value(pos)
        self._count(1)
        pos += 1
        prompts = tokens = 0
        while True:
            pos = self._skip_whitespace(pos)
            head = self.body[pos:pos + 1]
            if head == b"]":
                return pos + 1
            if head == b",":
                pos += 1
                continue
            if not head:
                raise _Malformed
            prompts += 1
            if prompts > self.bounds.max_completion_prompts:
                raise _too_many_prompts(self.bounds)
            if (ids := _INT_ARRAY.match(self.body, pos)) is not None:
                tokens += self._ids_in(ids)
                check_prompt_tokens(tokens, self.bounds.max_prompt_tokens)
                self._count(1)
                pos = ids.end()
            else:
                pos = self._value(pos)

    def _value(self, pos: int, *, item_limit: int | None = None, token_ids: bool = False) -> int:
        """Past one JSON value from `pos`, counting its values; `item_limit`: raise _TooManyItems when the value
        holds more items (array elements, object members). `token_ids`: an id list counts as one value."""
        body = self.body
        depth = items = 0
        while True:
            pos = self._skip_whitespace(pos)
            head = body[pos:pos + 1]
            if not head:
                raise _Malformed
            if head in _CLOSERS:
                depth -= 1
                pos += 1
            elif head == b",":
                pos += 1
                continue
            else:
                string = self._match(_STRING, pos) if head == b'"' else None
                if string is not None and depth > 0:
                    after = self._skip_whitespace(string.end())
                    if body.startswith(b":", after):  # an object's key: not a value
                        pos = after + 1
                        continue
                if depth == 1:
                    items += 1
                if head == b"[" and (ids := _INT_ARRAY.match(body, pos)) is not None:
                    count = self._ids_in(ids)
                    if depth == 0:
                        items = count
                    self._count(1 if token_ids else 1 + count)
                    pos = ids.end()
                elif head in _OPENERS:
                    self._count(1)
                    depth += 1
                    pos += 1
                elif string is not None:
                    pos = string.end()
                    self._count(1)
                else:
                    pos = self._match(_SCALAR, pos).end()
                    self._count(1)
                if item_limit is not None and items > item_limit:
                    raise _TooManyItems
            if depth == 0:
                return pos

    def _ids_in(self, ids: re.Match[bytes]) -> int:
        if _DIGIT.search(self.body, ids.start(), ids.end()) is None:
            return 0
        return self.body.count(b",", ids.start(), ids.end()) + 1

    def _count(self, values: int) -> None:
        self.values += values
        if self.values > self.bounds.max_json_values:
            raise _too_many_values(self.bounds)

    def _skip_whitespace(self, pos: int) -> int:
        return _WHITESPACE.match(self.body, pos).end()  # type: ignore[union-attr]  # matches the empty string

    def _match(self, pattern: re.Pattern[bytes], pos: int) -> re.Match[bytes]:
        match = pattern.match(self.body, pos)
        if match is None:
            raise _Malformed
        return match
