"""The sampler variant a step compiles: each optional stage on exactly when some request needs it."""

from __future__ import annotations

import pytest

from jaxllm.runner.input_batch import CachedRequestState, sampler_flags
from jaxllm.runner.sampler import LogprobWidths, SamplerFlags
from jaxllm.sampling_params import SamplingParams


def _state(outputs: int = 0, **params) -> CachedRequestState:
    prompt = [5, 6, 7]
    return CachedRequestState("r", prompt + [9] * outputs, len(prompt), SamplingParams(**params), seed=1, page_ids=[0])


PLAIN = {"temperature": 0.8}
WIDTHS = LogprobWidths.of(-1, 512)  # --max-logprobs -1: 20 for most requests, the vocabulary for the rest


@pytest.mark.parametrize(
    ("params", "outputs", "expected"),
    [
        ({"temperature": 0.0}, 0, SamplerFlags()),
        (PLAIN, 0, SamplerFlags(all_greedy=False)),
        ({"temperature": 0.8, "top_k": 5}, 0, SamplerFlags(all_greedy=False, top_k_top_p=True)),
        ({"temperature": 0.8, "top_p": 0.9}, 0, SamplerFlags(all_greedy=False, top_k_top_p=True)),
        ({"temperature": 0.8, "min_p": 0.1}, 0, SamplerFlags(all_greedy=False, top_k_top_p=True)),
        ({"temperature": 0.0, "top_k": 5}, 0, SamplerFlags()),  # greedy rows never sort
        ({"temperature": 0.0, "repetition_penalty": 1.1}, 0, SamplerFlags(penalties=True)),
        ({"temperature": 0.0, "presence_penalty": 0.5}, 0, SamplerFlags(penalties=True)),
        ({"temperature": 0.0, "logit_bias": {3: 1.0}}, 0, SamplerFlags(sparse_bias=True)),
        ({"temperature": 0.0, "allowed_token_ids": [3, 4]}, 0, SamplerFlags(sparse_bias=True)),
        ({"temperature": 0.0, "min_tokens": 2}, 1, SamplerFlags(sparse_bias=True)),  # still below min_tokens
        ({"temperature": 0.0, "min_tokens": 2}, 2, SamplerFlags()),  # reached: no more banning
        ({"temperature": 0.0, "logprobs": 2}, 0, SamplerFlags(logprobs=True, top_logprobs=20)),
        ({"temperature": 0.0, "logprobs": 0}, 0, SamplerFlags(logprobs=True, top_logprobs=20)),
        ({"temperature": 0.0, "logprobs": 21}, 0, SamplerFlags(logprobs=True, top_logprobs=512)),
        ({"temperature": 0.0, "logprobs": -1}, 0, SamplerFlags(logprobs=True, top_logprobs=512)),
        ({"temperature": 0.0, "logprob_token_ids": [3, 4]}, 0, SamplerFlags(logprobs=True, logprob_token_ids=True)),
    ],
)
def test_one_request_beside_a_plain_one_turns_on_its_stage(params, outputs, expected) -> None:
    greedy = _state(temperature=0.0)
    assert sampler_flags([greedy, _state(outputs, **params)], bitmask_rows=False, logprob_widths=WIDTHS) == expected
    if params.get("temperature", 1.0) == 0.0:  # beside a sampled request the batch is not all greedy
        mixed = sampler_flags([_state(**PLAIN), _state(outputs, **params)], bitmask_rows=False,
                              logprob_widths=WIDTHS)
        assert not mixed.all_greedy


def test_bitmask_and_an_empty_step() -> None:
    constrained = sampler_flags([_state(temperature=0.0)], bitmask_rows=True, logprob_widths=WIDTHS)
    assert constrained == SamplerFlags(bitmask=True)
    assert sampler_flags([], bitmask_rows=False, logprob_widths=WIDTHS) == SamplerFlags()
