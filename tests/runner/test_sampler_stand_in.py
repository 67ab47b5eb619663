"""While a sampler variant compiles on its first use, a served step runs a stand-in with every stage on: it must
give every row the token (and each row that asks the logprobs) the variant itself gives. Issue 21: each new
variant compiled on first use stalled the engine 0.4-1.7 s."""

from __future__ import annotations

import numpy as np

from jaxllm.runner.compilation import stand_in_sampler_flags, stands_in_for
from jaxllm.runner.input_batch import CachedRequestState, StepArrays, sampler_flags, sampling_arrays
from jaxllm.runner.sampler import LogprobWidths, SamplerFlags, sample
from jaxllm.sampling_params import SamplingParams

VOCAB = 512
MAX_MODEL_LEN = 64
WIDTHS = LogprobWidths.of(20, VOCAB)
STAND_IN = stand_in_sampler_flags(WIDTHS)

# One request of each kind a variant is made of; a step's rows are some of them.
KINDS = {
    "greedy": {"temperature": 0.0},
    "almost greedy": {"temperature": 1e-6},
    "sampled": {"temperature": 0.9, "seed": 3},
    "hot": {"temperature": 2.0, "seed": 4},
    "top-k": {"temperature": 0.8, "top_k": 5, "seed": 5},
    "top-p": {"temperature": 0.8, "top_p": 0.5, "seed": 6},
    "penalised": {"temperature": 0.0, "repetition_penalty": 1.3, "presence_penalty": 0.4},
    "biased": {"temperature": 0.7, "logit_bias": {7: 5.0}, "seed": 7},
    "allowed": {"temperature": 0.0, "allowed_token_ids": [9, 10, 11]},
    "logprobs": {"temperature": 0.0, "logprobs": 3},
    "token logprobs": {"temperature": 0.6, "logprob_token_ids": [4, 5], "seed": 8},
}
# Steps whose variants lack some of the stand-in's stages (each step's ops compile once, eagerly).
STEPS = [["greedy", "almost greedy"], ["sampled", "hot", "penalised"],
         ["greedy", "logprobs", "top-k", "top-p"], ["biased", "allowed", "token logprobs"]]
SLOTS = len(KINDS)  # every step padded to one shape: the eager ops compile once


def _step(kinds: list[str]) -> tuple[StepArrays, list[CachedRequestState]]:
    rng = np.random.default_rng(len(kinds))
    states = [CachedRequestState(kind, [1, *rng.integers(3, VOCAB, 6).tolist()], 4, SamplingParams(**KINDS[kind]),
                                 seed=11 * i, page_ids=[0]) for i, kind in enumerate(kinds)]
    zeros = np.zeros(SLOTS, np.int32)
    kv_lens = zeros.copy()
    kv_lens[: len(states)] = [len(s.token_ids) for s in states]
    arrays = StepArrays(zeros, zeros, zeros, zeros, np.zeros(SLOTS + 1, np.int32), kv_lens,
                        np.zeros((SLOTS, 1), np.int32), np.array([len(states)], np.int32), zeros,
                        [s.req_id for s in states], [True] * len(states))
    return arrays, states


def _sample(logits: np.ndarray, arrays: StepArrays, states: list[CachedRequestState], flags: SamplerFlags,
            bitmask: dict[str, np.ndarray]):
    batch = sampling_arrays(arrays, states, SLOTS, flags, bitmask, VOCAB, MAX_MODEL_LEN)
    return sample(logits, batch, flags)


def _logits(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, (SLOTS, VOCAB)).astype(np.float32)


def test_the_stand_in_samples_every_row_as_the_variant() -> None:
    for kinds in STEPS:
        arrays, states = _step(kinds)
        flags = sampler_flags(states, bitmask_rows=False, logprob_widths=WIDTHS)
        assert stands_in_for(STAND_IN, flags), kinds
        logits = _logits(len(kinds))
        tokens, logprobs = _sample(logits, arrays, states, flags, {})
        stand_in_tokens, stand_in_logprobs = _sample(logits, arrays, states, STAND_IN, {})
        rows = len(states)
        np.testing.assert_array_equal(np.asarray(stand_in_tokens)[:rows], np.asarray(tokens)[:rows], str(kinds))
        if logprobs is not None:  # the runner reads a row's top `logprobs` and its logprob_token_ids columns
            np.testing.assert_array_equal(np.asarray(stand_in_logprobs.chosen), np.asarray(logprobs.chosen))
            width = logprobs.top_ids.shape[1]
            np.testing.assert_array_equal(np.asarray(stand_in_logprobs.top_ids)[:, :width],
                                          np.asarray(logprobs.top_ids))


def test_a_step_with_grammar_masks_or_wide_logprobs_has_no_stand_in() -> None:
    """It waits for its own variant: the bitmask decides when a step samples, and the stand-in's table is narrow."""
    arrays, states = _step(["greedy", "sampled"])
    assert not stands_in_for(STAND_IN, sampler_flags(states, bitmask_rows=True, logprob_widths=WIDTHS))
    wide = LogprobWidths.of(-1, VOCAB)
    state = CachedRequestState("all", [1, 5, 6], 3, SamplingParams(temperature=0.0, logprobs=-1), seed=0, page_ids=[0])
    flags = sampler_flags([state], bitmask_rows=False, logprob_widths=wide)
    assert flags.top_logprobs == VOCAB and not stands_in_for(stand_in_sampler_flags(wide), flags)
