"""--max-logprobs, `logprobs: -1` and `logprob_token_ids`: vLLM 0.34's rules and messages
(SamplingParams._validate_logprobs), and what reaches the outputs."""

from __future__ import annotations

import dataclasses

import pytest

from jaxllm.config import ModelConfig
from jaxllm.engine.core import EngineInfo
from jaxllm.sampling_params import SamplingParams
from jaxllm.validation import ValidationError, validate_logprobs
from tests.engine.conftest import VOCAB_SIZE, run_to_completion
from tests.engine.fake_runner import FAKE_LOGPROB_STEP

LIMIT = "Set max_logprobs (--max-logprobs) to at least"


@pytest.mark.parametrize(("max_logprobs", "params", "param", "message"), [
    (20, {"logprobs": 21}, "logprobs", "Requested sample logprobs of 21, which is greater than max allowed: 20"),
    (20, {"logprobs": -1}, "logprobs", "Requested sample logprobs of 512, which is greater than max allowed: 20"),
    (20, {"prompt_logprobs": -1}, "prompt_logprobs",
     "Requested prompt logprobs of 512, which is greater than max allowed: 20"),
    (5, {"prompt_logprobs": 6}, "prompt_logprobs",
     "Requested prompt logprobs of 6, which is greater than max allowed: 5"),
    (20, {"logprob_token_ids": list(range(129))}, "logprob_token_ids",
     "Requested logprob_token_ids of length 129, which is greater than max allowed: 128"),
    (20, {"logprob_token_ids": [3, 512, -1]}, "logprob_token_ids",
     "token_id(s) [512, -1] in logprob_token_ids contain out-of-vocab token ids. Vocabulary size: 512"),
    (20, {"logprobs": 2, "logprob_token_ids": [3, 4, 5]}, "logprob_token_ids",
     "When both logprobs and logprob_token_ids are set, logprobs must equal len(logprob_token_ids). Got "
     "logprobs=2, len(logprob_token_ids)=3."),
])
def test_over_the_limit_gets_vllms_message_naming_the_field(max_logprobs, params, param, message) -> None:
    with pytest.raises(ValidationError) as e:
        validate_logprobs(SamplingParams(**params), max_logprobs, VOCAB_SIZE)
    assert e.value.param == param
    assert str(e.value).startswith(message), str(e.value)
    if "Requested" in message and "logprob_token_ids" not in message:
        assert LIMIT in str(e.value)


@pytest.mark.parametrize(("max_logprobs", "params"), [
    (-1, {"logprobs": -1, "prompt_logprobs": -1}),  # --max-logprobs -1: the whole vocabulary
    (-1, {"logprobs": 512}),
    (512, {"logprobs": -1}),  # the vocabulary fits the limit
    (20, {"logprobs": 20, "prompt_logprobs": 0}),
    (20, {"logprob_token_ids": list(range(128))}),  # its own limit, not --max-logprobs (as 0.34)
    (20, {"logprobs": 3, "logprob_token_ids": [7, 8, 9]}),
])
def test_within_the_limits_is_served(max_logprobs, params) -> None:
    validate_logprobs(SamplingParams(**params), max_logprobs, VOCAB_SIZE)


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_below_minus_one_is_refused_when_built(field) -> None:
    with pytest.raises(ValidationError) as e:
        SamplingParams(**{field: -2})
    assert str(e.value) == f"{field} must be non-negative or -1, got -2." and e.value.param == field


def test_the_engine_takes_its_limit_from_the_config(make_engine) -> None:
    engine = make_engine()
    info = EngineInfo.describe(engine)
    with pytest.raises(ValidationError, match="max allowed: 20"):
        info.new_request("r", [5], SamplingParams(logprobs=-1))
    unlimited = dataclasses.replace(info, config=dataclasses.replace(engine.config, model=ModelConfig(max_logprobs=-1)))
    engine.add_request(unlimited.new_request("r", [5, 6], SamplingParams(logprobs=-1, max_tokens=2)))
    completion = run_to_completion(engine)["r"].outputs[0]
    assert [len(entry) for entry in completion.logprobs] == [VOCAB_SIZE, VOCAB_SIZE]


def test_logprob_token_ids_give_those_ids_after_the_sampled_one(make_engine) -> None:
    """vLLM's order: the sampled token first, then each of logprob_token_ids (rank: its place in the list),
    instead of the top-k; logprobs is counted as len(logprob_token_ids)."""
    engine = make_engine()
    info = EngineInfo.describe(engine)
    params = SamplingParams(logprob_token_ids=[40, 7, 300], max_tokens=3, ignore_eos=True)
    assert params.num_logprobs == 3
    engine.add_request(info.new_request("r", [5, 6], params))
    completion = run_to_completion(engine)["r"].outputs[0]
    for token_id, entry in zip(completion.token_ids, completion.logprobs, strict=True):
        assert list(entry)[0] == token_id and entry[token_id].logprob == FAKE_LOGPROB_STEP
        assert [t for t in entry if t != token_id] == [t for t in (40, 7, 300) if t != token_id]
        assert entry[7].logprob == FAKE_LOGPROB_STEP * ((7 - token_id) % VOCAB_SIZE + 1)
    assert completion.cumulative_logprob == pytest.approx(3 * FAKE_LOGPROB_STEP)
