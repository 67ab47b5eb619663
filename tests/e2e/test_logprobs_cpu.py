"""Logprobs through the real engine (stories260K, --max-logprobs -1): `logprobs: -1` and `prompt_logprobs: -1`
give the whole vocabulary's distribution, which agrees with the usual top-k and with `logprob_token_ids`."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from tests.e2e.conftest import assert_pool_free

VOCAB = 512
PROMPT = {"prompt_token_ids": [1, 403, 407, 261, 300]}
LABELS = [3, 300, 511]


def _values(entry: dict) -> dict[int, float]:
    return {token_id: lp.logprob for token_id, lp in entry.items()}


@pytest.fixture(scope="module")
def outputs(small_llm: LLM):
    """One batch: the whole vocabulary, the top 5, and three given ids (greedy, so all decode alike)."""
    greedy = dict(temperature=0.0, max_tokens=3, ignore_eos=True)
    params = [SamplingParams(logprobs=-1, prompt_logprobs=-1, **greedy),
              SamplingParams(logprobs=5, prompt_logprobs=5, **greedy),
              SamplingParams(logprob_token_ids=LABELS, **greedy)]
    outs = small_llm.generate([PROMPT] * 3, params, use_tqdm=False)
    assert_pool_free(small_llm)
    return outs


def test_the_whole_vocabulary_is_a_distribution_ranked_as_the_top_k(outputs) -> None:
    full, top5, _ = outputs
    assert full.outputs[0].token_ids == top5.outputs[0].token_ids
    for entries, narrow in ((full.outputs[0].logprobs, top5.outputs[0].logprobs),
                            (full.prompt_logprobs[1:], top5.prompt_logprobs[1:])):
        for entry, small in zip(entries, narrow, strict=True):
            values = _values(entry)
            assert sorted(values) == list(range(VOCAB))
            assert np.exp(np.array(list(values.values()), np.float64)).sum() == pytest.approx(1.0, abs=1e-4)
            for token_id, lp in small.items():
                assert values[token_id] == pytest.approx(lp.logprob, abs=1e-5)
                assert entry[token_id].rank == lp.rank
    assert full.prompt_logprobs[0] is None and len(full.prompt_logprobs) == len(PROMPT["prompt_token_ids"])


def test_logprob_token_ids_read_the_same_distribution(outputs) -> None:
    full, _, labelled = outputs
    completion = labelled.outputs[0]
    assert completion.token_ids == full.outputs[0].token_ids
    for token_id, entry, whole in zip(completion.token_ids, completion.logprobs, full.outputs[0].logprobs,
                                      strict=True):
        assert list(entry) == [token_id, *(t for t in LABELS if t != token_id)]
        for label in LABELS:
            assert entry[label].logprob == pytest.approx(whole[label].logprob, abs=1e-5)
    assert labelled.prompt_logprobs is None


def test_prompt_logprobs_do_not_depend_on_where_chunked_prefill_splits_the_prompt(small_llm):
    # small_llm's step holds 16 tokens: nine 10-token prompts in one batch are split mid-prompt by chunked
    # prefill, so a chunk's last row must score the request's own next prompt token, not the next request's.
    prompts = [{"prompt_token_ids": [1, *range(300 + 7 * i, 309 + 7 * i)]} for i in range(9)]
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    batched = small_llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, batched, strict=True):
        (alone,) = small_llm.generate(prompt, params, use_tqdm=False)
        for position, (got, want) in enumerate(zip(out.prompt_logprobs[1:], alone.prompt_logprobs[1:], strict=True)):
            token = prompt["prompt_token_ids"][position + 1]
            assert got[token].logprob == pytest.approx(want[token].logprob, abs=1e-4), (prompt, position)
