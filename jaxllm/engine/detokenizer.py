"""Incremental detokenization and stop conditions of one request's output.

`IncrementalDetokenizer` turns tokens into text one at a time without ever emitting a broken
UTF-8 sequence: it decodes a small window of token strings (prefix/read offsets, as vLLM's
`detokenize_incrementally`) and holds the new text back while it ends in U+FFFD, i.e. while a
multibyte character is incomplete.

`OutputDetokenizer` adds the stop conditions: EOS and `stop_token_ids`, stop strings (found
across token boundaries; the text after them, and the stop string itself unless
`include_stop_str_in_output`, is removed), `min_tokens`, `max_tokens` and the context length. It
keeps back the tail that could be the start of a stop string, so a partial stop string is never
streamed. With `defer_text` (the output is read only once finished and no stop string needs the
text on the way) the per-token decode is skipped and the text made when first read, in one
tokenizer call where that gives the same text.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jaxllm.sampling_params import SamplingParams

try:  # tokenizers >= 0.21
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover
    DecodeStream = None

if TYPE_CHECKING:  # NOTE: a type only; the engine never imports transformers itself
    from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded before the first output token (as vLLM): enough context for the
# tokenizer's merges and leading-space rules, few enough to stay cheap.
PREFIX_WINDOW = 5
MAX_PARTIAL_CHAR_TOKENS = 3  # a UTF-8 character is at most 4 bytes


@functools.lru_cache(maxsize=8)
def _added_tokens(tokenizer: PreTrainedTokenizerBase) -> frozenset[str]:
    return frozenset(tokenizer.get_added_vocab())


def make_incremental_detokenizer(tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int],
                                 skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True):
    """The fast Rust stream decoder where it applies (fast tokenizer, special tokens skipped),
    else the general token-string window."""
    if skip_special_tokens and getattr(tokenizer, "_tokenizer", None) is not None and DecodeStream is not None:
        return StreamDetokenizer(tokenizer, prompt_token_ids)
    return IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens, spaces_between_special_tokens)


class StreamDetokenizer:
    """`tokenizers.decoders.DecodeStream` (Rust: several times cheaper a token than the window below).

    Primed with the prompt's last tokens for context; a prompt that ends mid-character is primed
    up to its last whole character and its partial bytes are fed after, so the character comes out
    whole with the output token that completes it (as IncrementalDetokenizer does).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer
        self.history = list(prompt_token_ids[-(PREFIX_WINDOW + 2):])  # context for a fallback
        self.fallback: IncrementalDetokenizer | None = None
        tail = list(self.history)
        whole = len(tail)
        for _ in range(MAX_PARTIAL_CHAR_TOKENS):
            if whole == 0 or not self.backend.decode(tail[:whole], skip_special_tokens=True).endswith(
                    REPLACEMENT_CHAR):
                break
            whole -= 1
        self.primed_whole = whole
        self.stream: DecodeStream | None = DecodeStream(ids=tail[:whole], skip_special_tokens=True)
        for token_id in tail[whole:]:
            self.stream.step(self.backend, token_id)
        self.untouched = True  # no output token stepped yet (decode_all's one-call path)
        self.byte_level = type(self.backend.decoder).__name__ == "ByteLevel"

    def decode_all(self, token_ids: list[int]) -> str:
        """The text decode_next would emit for these tokens, one after another, from this state.

        NOTE: one Rust decode of prompt tail + outputs, less the primed prefix's text, is what the
        stream emits token by token (and far cheaper than going through the step loop), for
        byte-level BPE decoders (Llama-3, Qwen, GPT-2) even over invalid UTF-8, and for others
        (SentencePiece byte fallback) when the text is valid UTF-8: byte fallback turns a whole run
        of byte tokens into U+FFFD when the run is invalid, where the stream sees it in pieces.
        Other outputs, and one that ends inside a character (the stream holds such a tail back),
        take the token-by-token path."""
        if self.fallback is None and self.stream is not None and self.untouched:
            primed = self.history[:self.primed_whole]
            prefix = self.backend.decode(primed, skip_special_tokens=True) if primed else ""
            full = self.backend.decode(self.history + list(token_ids), skip_special_tokens=True)
            clean = self.byte_level or REPLACEMENT_CHAR not in full
            if clean and full.startswith(prefix) and not full.endswith(REPLACEMENT_CHAR):
                # The stream did not see these tokens: any later token goes through the window.
                self.history.extend(token_ids)
                self.stream = None
                return full[len(prefix):]
        return "".join(self.decode_next(t) for t in token_ids)

    def decode_next(self, token_id: int) -> str:
        """The text that token_id completes ("" while a character is incomplete)."""
        self.untouched = False
        if self.fallback is None and self.stream is None:
            self.fallback = IncrementalDetokenizer(self.tokenizer, self.history)
        if self.fallback is None:
            try:
                text = self.stream.step(self.backend, token_id) or ""
                self.history.append(token_id)
                return text
            except Exception:  # noqa: BLE001 - e.g. "Invalid prefix" when a decoder rewrites its prefix
                # NOTE: the stream cannot go on; the window detokenizer takes over from here,
                # with everything before this token as its context.
                self.fallback = IncrementalDetokenizer(self.tokenizer, self.history)
        return self.fallback.decode_next(token_id)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int],
                 skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.separator = " " if spaces_between_special_tokens else ""
        self.added_tokens = _added_tokens(tokenizer)
        prompt_tail = prompt_token_ids[-(PREFIX_WINDOW + 2):]
        self.tokens: list[str] = tokenizer.convert_ids_to_tokens(prompt_tail, skip_special_tokens=skip_special_tokens)
        # NOTE: a prompt ending mid-character leaves its partial bytes unread, so the character
        # is emitted whole with the output token that completes it.
        self.read_offset = len(self.tokens)
        for _ in range(MAX_PARTIAL_CHAR_TOKENS):
            if self.read_offset == 0 or not self.tokens_to_text(self.tokens[:self.read_offset]).endswith(
                    REPLACEMENT_CHAR):
                break
            self.read_offset -= 1
        self.prefix_offset = max(self.read_offset - PREFIX_WINDOW, 0)

    def tokens_to_text(self, tokens: list[str]) -> str:
        """Token strings to text; added (special) tokens verbatim, spaced if spaces_between_special_tokens."""
        if not self.added_tokens.intersection(tokens):
            return self.tokenizer.convert_tokens_to_string(tokens)
        parts: list[str] = []
        run: list[str] = []
        for token in tokens:
            if token in self.added_tokens:
                if run:
                    parts.append(self.tokenizer.convert_tokens_to_string(run))
                    run = []
                parts.append(token)
            else:
                run.append(token)
        if run:
            parts.append(self.tokenizer.convert_tokens_to_string(run))
        return self.separator.join(parts)

    def decode_all(self, token_ids: list[int]) -> str:
        return "".join(self.decode_next(t) for t in token_ids)

    def decode_next(self, token_id: int) -> str:
        """The text that token_id completes ("" while a character is incomplete)."""
        new_tokens = self.tokenizer.convert_ids_to_tokens([token_id], skip_special_tokens=self.skip_special_tokens)
        self.tokens.extend(new_tokens)
        prefix_text = self.tokens_to_text(self.tokens[self.prefix_offset:self.read_offset])
        new_text = self.tokens_to_text(self.tokens[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return new_text[len(prefix_text):]


@dataclass(frozen=True)
class Finish:
    reason: str  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop string or stop token id; None for EOS and length


def find_stop_string(text: str, num_new_chars: int, stops: list[str]) -> tuple[int, str] | None:
    """(index, stop string) of the earliest stop string that overlaps the last num_new_chars of text."""
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop, max(0, len(text) - num_new_chars - len(stop) + 1))
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    return best


class OutputDetokenizer:
    """Output text and finish state of one request (one sequence of an n > 1 request)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], params: SamplingParams,
                 max_tokens: int, max_model_len: int, defer_text: bool = False) -> None:
        self.params = params
        self.max_tokens = max_tokens
        self.max_context_outputs = max_model_len - len(prompt_token_ids)
        self.decoder = make_incremental_detokenizer(
            tokenizer, prompt_token_ids, params.skip_special_tokens, params.spaces_between_special_tokens
        ) if params.detokenize else None
        self.stops: list[str] = list(params.stop or [])
        # Characters kept back from the stream: they could be the start of a stop string.
        self.holdback = max((len(s) for s in self.stops), default=1) - 1 if not params.include_stop_str_in_output else 0
        self.token_ids: list[int] = []
        self.output_text = ""
        self.finish: Finish | None = None
        # Deferred: tokens [num_decoded:num_text_tokens] are in output_text only once text is read.
        self.defer_text = defer_text and self.decoder is not None and not self.stops
        self.num_decoded = 0
        self.num_text_tokens = 0

    def update(self, new_token_ids: list[int]) -> Finish | None:
        """Append sampled tokens; returns the finish state once a stop condition holds."""
        params = self.params
        for token_id in new_token_ids:
            if self.finish is not None:
                break
            self.token_ids.append(token_id)
            num_outputs = len(self.token_ids)
            may_stop = num_outputs > params.min_tokens
            if may_stop and not params.ignore_eos and token_id in params.all_stop_token_ids:
                self.finish = Finish("stop", None)
            elif may_stop and token_id in params.stop_token_ids:
                self.finish = Finish("stop", token_id)
            if self.finish is not None:  # the stop token's text is output only if asked
                if params.include_stop_str_in_output:
                    self._add_text(token_id)
                break
            checked_len = len(self.output_text)
            self._add_text(token_id)
            if may_stop and self.stops:
                found = find_stop_string(self.output_text, len(self.output_text) - checked_len, self.stops)
                if found is not None:
                    index, stop = found
                    self.output_text = self.output_text[:index + len(stop) if params.include_stop_str_in_output
                                                        else index]
                    self.finish = Finish("stop", stop)
                    break
            if num_outputs >= min(self.max_tokens, self.max_context_outputs):
                self.finish = Finish("length")
        return self.finish

    def text_to_emit(self) -> str:
        """The output text that is final: all of it once finished, else less a possible partial stop string."""
        if self.num_decoded < self.num_text_tokens:
            self.output_text += self.decoder.decode_all(self.token_ids[self.num_decoded:self.num_text_tokens])
            self.num_decoded = self.num_text_tokens
        if self.finish is not None or not self.holdback:
            return self.output_text
        return self.output_text[:max(0, len(self.output_text) - self.holdback)]

    def _add_text(self, token_id: int) -> None:
        """token_id's text onto output_text (deferred: counted, decoded when the text is read)."""
        self.num_text_tokens += 1
        if self.defer_text:
            return
        self.num_decoded = self.num_text_tokens
        if self.decoder is not None:
            self.output_text += self.decoder.decode_next(token_id)
