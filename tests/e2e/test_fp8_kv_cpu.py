"""`--kv-cache-dtype fp8` end to end on CPU (stories260K, fp32 activations): the pool holds twice
the pages of a bf16 pool in the same bytes, and greedy decoding equals a float model whose
attention reads fake-quantized K/V (quantize to e4m3 and back, scale 1.0)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.config import DEFAULT_MODEL, ModelConfig, ParallelConfig
from jaxllm.runner import kv_cache
from jaxllm.runner.model_loading import load_model
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention.common import FP8_KV_DTYPE, quantize_fp8
from tests.e2e.conftest import COMMON, assert_pool_free
from tests.paged import PagedRunner

PROMPT = [1, *np.random.default_rng(4).integers(3, 512, 28).tolist()]
CHUNKS = [13, 16]  # every step pads to 16 tokens: one compile per runner
NUM_DECODE = 12
POOL_BYTES = 8 << 20


def fake_quantized_attention(q, kv_pages, *args, **kwargs):
    """The float reference over pages rounded through e4m3 (what FP8 pages with scale 1.0 hold)."""
    return ragged_paged_attention_reference(q, quantize_fp8(kv_pages, 1.0).astype(kv_pages.dtype), *args, **kwargs)


@pytest.fixture(scope="module")
def loaded():
    return load_model(ModelConfig(model=DEFAULT_MODEL, dtype="float32"), ParallelConfig())


@pytest.fixture(scope="module")
def fake_quantized_run(loaded):
    runner = PagedRunner(loaded, "reference")
    runner.forward = jax.jit(loaded.forward_fn(fake_quantized_attention), donate_argnums=(1,))
    return runner.run(PROMPT, CHUNKS, NUM_DECODE)


def test_fp8_pages_equal_the_fake_quantized_model(loaded, fake_quantized_run):
    """Same tokens, logits within 1e-3, under the XLA path reading e4m3 pages."""
    want_logits, want_tokens = fake_quantized_run
    runner = PagedRunner(loaded, "xla")
    runner.kv = [jnp.zeros(pages.shape, FP8_KV_DTYPE) for pages in runner.kv]
    logits, tokens = runner.run(PROMPT, CHUNKS, NUM_DECODE)
    assert tokens == want_tokens
    np.testing.assert_allclose(logits, want_logits, atol=1e-3, rtol=1e-3)


def test_engine_with_fp8_pages(fake_quantized_run):
    llm = LLM(DEFAULT_MODEL, kv_cache_dtype="fp8", kv_cache_memory_bytes=POOL_BYTES, max_num_seqs=4,
              max_num_batched_tokens=16, token_buckets=[16], async_scheduling=False, **COMMON)
    runner = llm.engine.runner
    assert all(pages.dtype == FP8_KV_DTYPE for pages in runner.kv_pages)
    bf16_page = kv_cache.bytes_per_page(runner.model.arch, 16, jnp.bfloat16, 1, runner.model.rules)
    assert llm.engine.block_manager.num_pages == 2 * (POOL_BYTES // bf16_page)
    greedy = SamplingParams(temperature=0.0, max_tokens=NUM_DECODE, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": PROMPT}, greedy, use_tqdm=False)
    assert list(out[0].outputs[0].token_ids) == fake_quantized_run[1]
    assert_pool_free(llm)
