"""bad_words as vLLM 0.34.0 enforces them: tokenized at validation (`update_from_tokenizer`), then at every step the
last token of each word whose other tokens are the request's last OUTPUT tokens is banned (`_bad_words_kernel`),
also where the last of those is the previous step's token, still on the device (async scheduling)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.runner.compilation import stand_in_sampler_flags, stands_in_for
from jaxllm.runner.input_batch import CachedRequestState, StepArrays, sampler_flags, sampling_arrays
from jaxllm.runner.sampler import LogprobWidths, sample
from jaxllm.sampling_params import SamplingParams
from jaxllm.validation import MAX_BAD_WORDS_TOTAL_TOKENS, MAX_NUM_BAD_WORDS, ValidationError, tokenize_bad_words

VOCAB = 12
MAX_MODEL_LEN = 32
SLOTS = 16
WIDTHS = LogprobWidths.of(20, VOCAB)


class _Tokenizer:
    """Token ids by text; an unknown text is one id per character (ord)."""

    def __init__(self, vocab: dict[str, list[int]]):
        self._vocab = vocab

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert not add_special_tokens
        return list(self._vocab.get(text, [ord(c) for c in text]))


def test_each_word_bare_then_after_a_space_where_that_is_another_word_of_as_many_tokens() -> None:
    tokenizer = _Tokenizer({"cat": [5, 6], " cat": [7, 6],  # another first token: kept
                            "dog": [8], " dog": [8],  # the same word: dropped
                            "bird": [9], " bird": [3, 9],  # longer: dropped
                            "eel": [4], " eel": []})  # nothing after a space: the bare form only
    words = ["cat", "  dog", "bird", "eel"]
    assert tokenize_bad_words(words, tokenizer, 600) == [[5, 6], [7, 6], [8], [9], [4]]


@pytest.mark.parametrize(("words", "vocab", "message"), [
    (["   "], {"": []}, "bad_words entries must tokenize to at least one token."),
    (["ab"], {"ab": [1, 700]}, "The model vocabulary size is 600, but the following tokens were specified as bad: "
                               "[700]. All token id values should be integers satisfying: 0 <= token_id <= 599."),
    ([str(i) for i in range(MAX_NUM_BAD_WORDS + 1)], {},
     f"Too many bad words after tokenization: {MAX_NUM_BAD_WORDS + 1}. The max number is {MAX_NUM_BAD_WORDS}."),
    (["x" * (MAX_BAD_WORDS_TOTAL_TOKENS + 1)], {},
     f"Too many total bad word tokens: {MAX_BAD_WORDS_TOTAL_TOKENS + 1}. The max is {MAX_BAD_WORDS_TOTAL_TOKENS}."),
])
def test_refused_as_vllm_refuses_them(words: list[str], vocab: dict[str, list[int]], message: str) -> None:
    with pytest.raises(ValidationError) as error:
        tokenize_bad_words(words, _Tokenizer(vocab), 600)
    assert (error.value.message, error.value.param) == (message, "bad_words")


def _state(outputs: list[int], bad_words: list[list[int]] | None, *, pending_row: int = -1,
           prompt: tuple[int, ...] = (1, 2)) -> CachedRequestState:
    """A request with these outputs on the host and, with pending_row, one more in that row of the previous step's
    tokens."""
    params = SamplingParams(temperature=0.0, bad_words_token_ids=bad_words)
    state = CachedRequestState("r", [*prompt, *outputs], len(prompt), params, seed=0, page_ids=[0])
    if pending_row >= 0:
        state.num_pending, state.last_sampled_row = 1, pending_row
    return state


def _sample_greedy(states: list[CachedRequestState], logits: np.ndarray, prev_tokens: np.ndarray) -> list[int]:
    flags = sampler_flags(states, bitmask_rows=False, logprob_widths=WIDTHS)
    assert flags.bad_words
    zeros = np.zeros(SLOTS, np.int32)
    arrays = StepArrays(zeros, zeros, zeros, zeros, np.zeros(SLOTS + 1, np.int32), zeros,
                        np.zeros((SLOTS, 1), np.int32), np.array([len(states)], np.int32), zeros,
                        [str(i) for i in range(len(states))], [True] * len(states))
    batch = sampling_arrays(arrays, states, SLOTS, flags, {}, VOCAB, MAX_MODEL_LEN)
    batch.prev_tokens = prev_tokens
    tokens, _ = sample(jnp.asarray(logits), batch, flags)
    return np.asarray(tokens)[: len(states)].tolist()


def test_the_last_token_is_banned_after_the_others_as_outputs_also_when_the_last_output_is_on_the_device() -> None:
    word, single = [5, 6, 7], [9]
    logits = np.zeros((SLOTS, VOCAB), np.float32)
    logits[:, 7], logits[:, 9], logits[:, 8] = 3.0, 2.0, 1.0  # 7, else 9, else 8
    prev_tokens = np.array([6, 4, 6, 6], np.int32)  # the previous step's sampled tokens, by row
    states = [
        _state([3, 5], [word], pending_row=0),  # 5 then 6 (on device): 7 banned
        _state([3, 5], [word], pending_row=1),  # 5 then 4: free
        _state([5, 6], [word]),  # on the host: banned
        _state([], [word], prompt=(5, 6)),  # the prompt does not count
        _state([6], [word], pending_row=2),  # 6 then 6: free
        _state([3], [single]),  # one token: always banned
        _state([5], [word, single], pending_row=3),  # both: the next best
        _state([5], None, pending_row=0),  # no bad words
    ]
    assert _sample_greedy(states, logits, prev_tokens) == [9, 7, 9, 7, 7, 7, 8, 7]


def _vllm_banned(outputs: list[int], words: list[list[int]]) -> set[int]:
    """vLLM 0.34.0's CPUBadWords.apply for one row: its whole output history."""
    return {w[-1] for w in words if len(w) - 1 <= len(outputs) and outputs[len(outputs) - len(w) + 1:] == w[:-1]}


def test_random_words_and_histories_ban_what_vllm_bans() -> None:
    """Prefixes and outputs of 3 ids, so prefixes often match; the words' last tokens the likeliest, so a ban shows;
    some words longer than the narrowest table, some outputs shorter than a prefix."""
    rng = np.random.default_rng(0)
    for _ in range(4):
        prev_tokens = rng.integers(0, 3, SLOTS).astype(np.int32)
        logits = rng.standard_normal((SLOTS, VOCAB)).astype(np.float32)
        states, expected = [], []
        for row in range(SLOTS):
            words = [[*rng.integers(0, 3, rng.integers(0, 5)).tolist(), int(rng.integers(3, VOCAB))]
                     for _ in range(rng.integers(1, 4))]
            outputs = rng.integers(0, 3, rng.integers(0, 6)).tolist()
            pending = row if rng.random() < 0.5 else -1
            states.append(_state(outputs, words, pending_row=pending))
            logits[row, [w[-1] for w in words]] += 10.0
            masked = logits[row].copy()
            masked[list(_vllm_banned(outputs + [int(prev_tokens[row])] * (pending >= 0), words))] = -np.inf
            expected.append(int(masked.argmax()))
        assert _sample_greedy(states, logits, prev_tokens) == expected


def test_a_step_without_bad_words_has_no_bad_words_stage() -> None:
    states = [_state([5], None), CachedRequestState("s", [1, 2], 2, SamplingParams(bad_words=["x"]), seed=0,
                                                    page_ids=[0])]  # not validated: no token ids
    assert not sampler_flags(states, bitmask_rows=False, logprob_widths=WIDTHS).bad_words


def test_a_step_with_bad_words_has_no_stand_in() -> None:
    """The stand-ins have no bad-words stage: such a step waits for its own variant rather than ignore them."""
    flags = sampler_flags([_state([5], [[5, 6]])], bitmask_rows=False, logprob_widths=WIDTHS)
    assert not stands_in_for(stand_in_sampler_flags(WIDTHS), flags)
