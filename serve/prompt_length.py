"""A prompt too long to fit, found from its length in characters, before paying for tokenizing it.

vLLM's rule: a prompt of more than `max_chars_per_token` × (max_model_len - max_tokens) characters gets a 400
without being tokenized. vLLM takes the longest vocabulary entry as `max_chars_per_token`, which holds only
when the tokenizer keeps every character of the text: one whose normalizer collapses spaces (the bundled
stories260K's does) or whose pre-tokenizer drops whitespace can fit any number of characters in one token.
Here the bound is used only for pipelines known to keep the text, and NFC/NFKC composition (up to 4
characters into 1) is allowed for; for other tokenizers the prompt is tokenized, off the event loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Normalizers that never shorten the text, and those that shorten it by at most this factor (composition).
_KEEPING_NORMALIZERS = {"Prepend", "Lowercase", "NFD", "NFKD"}
_COMPOSING_NORMALIZERS = {"NFC", "NFKC"}
_MAX_COMPOSED = 4  # the longest canonical decomposition is 4 code points
# Pre-tokenizers that keep every character (Split and Punctuation unless told to remove the matches).
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts", "Split", "Punctuation"}


def max_chars_per_token(tokenizer: Any) -> int | None:
    """The most characters of prompt text one token can stand for, or None when no bound holds."""
    backend = tokenizer.backend_tokenizer
    shrink = _normalizer_shrink(_component(backend.normalizer))
    pre_tokenizer = _component(backend.pre_tokenizer)
    if shrink is None or not _keeps_text(pre_tokenizer) or not _model_keeps_text(backend.model, pre_tokenizer):
        return None
    if any(added.lstrip or added.rstrip for added in tokenizer.added_tokens_decoder.values()):
        return None  # such a token takes in the whitespace beside it, however long
    return shrink * max(len(token) for token in tokenizer.get_vocab())


@dataclass(frozen=True)
class InputCharLimit:
    """The longest prompt text (in characters) that could fit beside `max_output_tokens` of output."""

    max_model_len: int
    max_output_tokens: int
    max_chars_per_token: int

    @property
    def max_input_tokens(self) -> int:
        return self.max_model_len - self.max_output_tokens

    @property
    def max_chars(self) -> int:
        return self.max_input_tokens * self.max_chars_per_token

    def message(self, num_chars: int) -> str:
        """vLLM's 400 for a prompt of `num_chars` characters over `max_chars`."""
        return (f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{self.max_output_tokens} output tokens and your prompt contains {num_chars} characters (more "
                f"than {self.max_chars} characters, which is the upper bound for {self.max_input_tokens} input "
                "tokens). Please reduce the length of the input prompt or the number of requested output tokens.")


def input_char_limit(max_chars_per_token: int | None, max_model_len: int, max_tokens: int | None,
                     truncate_prompt_tokens: int | None) -> InputCharLimit | None:
    """The limit for a request, or None when none applies: no bound for this tokenizer, a prompt the request
    truncates (any length may fit), or `max_tokens` past the context (its own error says so)."""
    output_tokens = max_tokens or 0
    if max_chars_per_token is None or truncate_prompt_tokens is not None or output_tokens > max_model_len:
        return None
    return InputCharLimit(max_model_len, output_tokens, max_chars_per_token)


def _component(component: Any) -> dict[str, Any] | None:
    """A normalizer's or pre-tokenizer's JSON description (what tokenizer.json holds), or None if unset."""
    return None if component is None else json.loads(component.__getstate__())


def _normalizer_shrink(normalizer: dict[str, Any] | None) -> int | None:
    """By how much the normalizer can shorten the text at most (1: never), or None if without bound."""
    if normalizer is None:
        return 1
    kind = normalizer["type"]
    if kind == "Sequence":
        factor = 1
        for part in normalizer["normalizers"]:
            part_factor = _normalizer_shrink(part)
            if part_factor is None:
                return None
            factor *= part_factor
        return factor
    if kind == "Replace":  # a literal string replaced by one at least as long (" " -> "▁")
        pattern = normalizer["pattern"]
        return 1 if "String" in pattern and len(normalizer["content"]) >= len(pattern["String"]) else None
    if kind in _COMPOSING_NORMALIZERS:
        return _MAX_COMPOSED
    return 1 if kind in _KEEPING_NORMALIZERS else None


def _keeps_text(pre_tokenizer: dict[str, Any] | None) -> bool:
    if pre_tokenizer is None:
        return True
    kind = pre_tokenizer["type"]
    if kind == "Sequence":
        return all(_keeps_text(part) for part in pre_tokenizer["pretokenizers"])
    return kind in _KEEPING_PRE_TOKENIZERS and str(pre_tokenizer.get("behavior", "")).lower() != "removed"


def _model_keeps_text(model: Any, pre_tokenizer: dict[str, Any] | None) -> bool:
    """A BPE model that gives every character a token: all bytes in the vocabulary (byte-level), byte
    fallback, or an unknown token per unknown character (not fused into one, nor dropped)."""
    if type(model).__name__ != "BPE":
        return False
    byte_level = "ByteLevel" in _types(pre_tokenizer)
    return byte_level or bool(model.byte_fallback) or (model.unk_token is not None and not model.fuse_unk)


def _types(component: dict[str, Any] | None) -> list[str]:
    """A component's type and those of its parts (a Sequence's)."""
    if component is None:
        return []
    parts = component.get("normalizers") or component.get("pretokenizers") or []
    return [component["type"], *(kind for part in parts for kind in _types(part))]
