"""The engine on a tiny DeepSeek-V3 (MLA over the latent page pool): prefix caching, chunked prefill
and preemption give the tokens each prompt gets alone, and every page comes back."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from tests.e2e.conftest import COMMON, assert_pool_free
from tests.fixtures import fixture_tokenizer
from tests.models.hf_tiny import make_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    return make_checkpoint("deepseek_v3", tmp_path_factory.mktemp("deepseek"))


def test_latent_pool_prefix_caching_chunked_prefill_and_preemption(deepseek_dir):
    rng = np.random.default_rng(5)
    shared = rng.integers(3, 320, 48).tolist()  # three full 16-token pages every prompt starts with
    prompts = [shared + rng.integers(3, 320, n).tolist() for n in (5, 17, 30, 9)]
    engine = {**COMMON, "tokenizer": str(fixture_tokenizer("llama2")), "max_model_len": 128}  # ids < 320 decode
    alone = LLM(str(deepseek_dir), max_num_seqs=1, max_num_batched_tokens=128, token_buckets=[16, 128],
                enable_prefix_caching=False, **engine)
    want = [alone.generate([{"prompt_token_ids": p}], GREEDY)[0].outputs[0].token_ids for p in prompts]
    # 16-token steps (every prompt prefilled in chunks) and 9 pages of 16 tokens for 3 requests of up to
    # 102 tokens (some are preempted and recomputed), the shared prefix cached by the first.
    tight = LLM(str(deepseek_dir), max_num_seqs=4, max_num_batched_tokens=16, token_buckets=[16],
                num_gpu_blocks_override=9, async_scheduling=False, **engine)
    first = tight.generate([{"prompt_token_ids": prompts[0]}], GREEDY)[0]
    rest = tight.generate([{"prompt_token_ids": p} for p in prompts[1:]], GREEDY)
    assert [first.outputs[0].token_ids] + [o.outputs[0].token_ids for o in rest] == want
    assert all(o.num_cached_tokens >= 48 for o in rest)  # the shared pages came from the prefix cache
    assert tight.engine.metrics.num_preemptions_total > 0, "the 9-page pool should have forced preemption"
    assert tight.engine.block_manager.num_pages == 9
    assert_pool_free(tight)
