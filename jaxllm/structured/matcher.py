"""`GrammarMatcher`: one request's position in its grammar, the seam the engine drives each step.

    matcher.fill_bitmask(row)        # before sampling: row [ceil(vocab_size / 32)] int32, written in place
    ok = matcher.accept_token(tok)   # after sampling: advance (False: the token breaks the grammar)
    matcher.is_terminated()          # only EOS may follow (grammar complete, EOS taken, or an error)

Both release the GIL inside llguidance; their host cost per token is in bench/RESULTS.md. NOTE: llguidance's
own thread pool (`LLExecutor`) filled a batch of masks slower than a plain loop, so there is no batch API.
"""

from __future__ import annotations

from collections.abc import Sequence

import llguidance
import numpy as np

from jaxllm.structured.bitmask import bitmask_words


class GrammarMatcher:
    def __init__(
        self, ll_matcher: llguidance.LLMatcher, vocab_size: int, tokenizer_vocab_size: int, eos_token_ids: Sequence[int]
    ) -> None:
        self._ll = ll_matcher
        self.vocab_size = vocab_size
        self.num_words = bitmask_words(vocab_size)
        self._eos = frozenset(eos_token_ids)
        # Tokens llguidance knows and the model can sample: ids at or past this are never allowed.
        self._num_tokens = min(vocab_size, tokenizer_vocab_size)
        self._eos_taken = False
        # NOTE: llguidance writes masks of its own length (the tokenizer's, padded up to vocab_size); when
        # the model's vocabulary is smaller than the tokenizer's, the mask goes through a scratch row and
        # is cut to vocab_size.
        ll_words = bitmask_words(max(vocab_size, tokenizer_vocab_size))
        self._scratch = None if ll_words == self.num_words else np.zeros(ll_words, np.int32)

    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token. False when the grammar forbids it (the request should stop:
        with the bitmask applied this cannot happen); the matcher then allows only EOS."""
        if self._eos_taken or not 0 <= token_id < self._num_tokens:
            return False
        ok = self._ll.consume_token(token_id)
        if ok and token_id in self._eos:
            self._eos_taken = True
        return ok

    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        """Advance by several tokens (e.g. accepted draft tokens); stops at the first forbidden one."""
        return all(self.accept_token(t) for t in token_ids)

    def fill_bitmask(self, out: np.ndarray) -> None:
        """Write the allowed next tokens into out [ceil(vocab_size / 32)] int32 (contiguous)."""
        if out.dtype != np.int32 or out.shape != (self.num_words,) or not out.flags.c_contiguous:
            raise ValueError(f"bitmask row must be a contiguous int32 array of shape ({self.num_words},), "
                             f"got {out.dtype} {out.shape}")
        if self._scratch is None:
            self._ll.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
            return
        self._ll.unsafe_compute_mask_ptr(self._scratch.ctypes.data, self._scratch.nbytes)
        out[:] = self._scratch[: self.num_words]
        _clear_bits_from(out, self.vocab_size)

    def is_terminated(self) -> bool:
        """True when nothing but EOS may follow: the grammar is complete, EOS was taken, or a forbidden
        token put the matcher in its error state."""
        return self._eos_taken or self._ll.is_stopped()

    def is_accepting(self) -> bool:
        """True when the output so far is a complete match (EOS is allowed now)."""
        return self._eos_taken or self._ll.is_accepting()

    @property
    def error(self) -> str | None:
        """llguidance's message when a forbidden token was consumed, else None."""
        return self._ll.get_error() or None

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (rejected speculative tokens)."""
        if num_tokens > 0:
            self._ll.rollback(num_tokens)
            self._eos_taken = False

    def reset(self) -> None:
        """Back to the grammar's start state (a preempted request recomputed from scratch)."""
        self._ll.reset()
        self._eos_taken = False


def _clear_bits_from(row: np.ndarray, first_id: int) -> None:
    """Clear the bits of token ids >= first_id in row [W] int32."""
    word, bit = divmod(first_id, 32)
    if bit:
        row[word] &= np.int32(np.uint32((1 << bit) - 1).view(np.int32))
        word += 1
    row[word:] = 0
