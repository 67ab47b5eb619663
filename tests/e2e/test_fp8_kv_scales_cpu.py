"""`--calculate-kv-scales` and a checkpoint's KV scales end to end on CPU (stories260K, fp32 activations).

The engine calibrates each layer's scales from the first real step (start-up runs none on the pool), keeps
them, and decodes the same greedy tokens as a float model whose layers read K/V fake-quantized at those
scales, fixed per layer (static `AttentionParams`); a checkpoint's k_scale / v_scale reach the pool."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxllm import LLM, SamplingParams
from jaxllm.config import DEFAULT_MODEL, CacheConfig, ModelConfig, ParallelConfig
from jaxllm.models.kv_scales import K_SCALE_CONSTANT, UNCALIBRATED, V_SCALE_CONSTANT, ScaledKvPages
from jaxllm.runner import kv_cache
from jaxllm.runner.model_loading import LoadedModel, load_model
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention.common import quantize_fp8
from tests.e2e.conftest import COMMON, assert_pool_free
from tests.paged import PagedRunner

PROMPT = [1, *np.random.default_rng(4).integers(3, 512, 28).tolist()]
FIRST_STEP = 16  # the engine's token budget: the prompt's first 16 tokens are the first step
NUM_DECODE = 12


def fake_quantized_attention(q, kv_pages, *args, **kwargs):
    """The float reference over pages rounded through e4m3 at the layer's static scales (params, args[4])."""
    params = args[4]
    k = quantize_fp8(kv_pages[0], params.k_scale).astype(jnp.float32) * params.k_scale
    v = quantize_fp8(kv_pages[1], params.v_scale).astype(jnp.float32) * params.v_scale
    return ragged_paged_attention_reference(q, jnp.stack([k, v]), *args, **kwargs)


def with_static_scales(loaded: LoadedModel, scales: np.ndarray) -> LoadedModel:
    """The model with layer l's AttentionParams holding scales[l] as its (k_scale, v_scale)."""
    model = nnx.merge(loaded.graphdef, jax.tree.unflatten(loaded.treedef, loaded.leaves))
    for layer, (k_scale, v_scale) in zip(model.model.layers, scales, strict=True):
        attn = layer.self_attn
        attn.params = dataclasses.replace(attn.params, k_scale=float(k_scale), v_scale=float(v_scale))
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    return dataclasses.replace(loaded, graphdef=graphdef, treedef=treedef, leaves=leaves)


@pytest.fixture(scope="module")
def loaded():
    return load_model(ModelConfig(model=DEFAULT_MODEL, dtype="float32"), ParallelConfig())


def engine(model: str, **kwargs) -> LLM:
    return LLM(model, kv_cache_dtype="fp8", kv_cache_memory_bytes=8 << 20, max_num_seqs=4,
               max_num_batched_tokens=FIRST_STEP, token_buckets=[16], async_scheduling=False, **COMMON, **kwargs)


def layer_scales(llm: LLM) -> np.ndarray:
    """[L, 2] (k_scale, v_scale) of the engine's pool."""
    pool = llm.engine.runner.kv_pages
    assert all(isinstance(layer, ScaledKvPages) for layer in pool)
    return np.stack([np.asarray(layer.scales) for layer in pool])


def greedy(llm: LLM, prompt: list[int]) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=NUM_DECODE, ignore_eos=True)
    return list(llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].token_ids)


def test_calibrated_engine_equals_the_fake_quantized_model(loaded):
    llm = engine(DEFAULT_MODEL, calculate_kv_scales=True)
    assert np.all(layer_scales(llm) == UNCALIBRATED), "start-up must not calibrate"
    tokens = greedy(llm, PROMPT)
    scales = layer_scales(llm)
    assert np.all(scales > 0)
    greedy(llm, PROMPT[::-1])
    np.testing.assert_array_equal(layer_scales(llm), scales)  # later steps only read them
    assert_pool_free(llm)

    runner = PagedRunner(with_static_scales(loaded, scales), "reference")
    runner.forward = jax.jit(runner.loaded.forward_fn(fake_quantized_attention), donate_argnums=(1,))
    logits = runner.step(PROMPT[:FIRST_STEP], 0)
    # The reference's float pages now hold the first step's K/V, each layer's from its input as the engine saw it.
    first = np.stack([[np.abs(np.asarray(pages[0])).max() / K_SCALE_CONSTANT,
                       np.abs(np.asarray(pages[1])).max() / V_SCALE_CONSTANT] for pages in runner.kv])
    # Layer 0 reads the embeddings: exact. Deeper layers see float noise between two implementations, which
    # e4m3 rounding amplifies where a value lies near a rounding boundary (0.5% measured at layer 3).
    np.testing.assert_allclose(scales[0], first[0], rtol=1e-6)
    np.testing.assert_allclose(scales, first, rtol=2e-2)
    logits = runner.step(PROMPT[FIRST_STEP:], FIRST_STEP)
    want = []
    for i in range(NUM_DECODE):
        want.append(int(np.argmax(logits[-1])))
        logits = runner.step(want[-1:], len(PROMPT) + i)
    assert tokens == want


def test_checkpoint_scales_reach_the_pool(loaded, tmp_path: Path):
    """A checkpoint with per-layer k_scale / v_scale: fp8 pages start from them; --calculate-kv-scales ignores
    them (as vLLM); auto pages ignore them."""
    model_dir = tmp_path / "stories-fp8-kv"
    shutil.copytree(DEFAULT_MODEL, model_dir)
    tensors = load_file(str(model_dir / "model.safetensors"))
    num_layers = loaded.arch.num_layers
    ckpt = np.stack([0.01 * (1 + np.arange(num_layers)), 0.02 * (1 + np.arange(num_layers))], axis=1).astype(np.float32)
    for layer, (k_scale, v_scale) in enumerate(ckpt):
        tensors[f"model.layers.{layer}.self_attn.k_scale"] = np.array(k_scale, np.float32)
        tensors[f"model.layers.{layer}.self_attn.v_scale"] = np.array(v_scale, np.float32)
    save_file(tensors, str(model_dir / "model.safetensors"))
    model = dataclasses.replace(loaded, model_dir=model_dir)

    fmt = kv_cache.kv_format(CacheConfig(kv_cache_dtype="fp8"), model, "auto")
    np.testing.assert_array_equal(np.asarray(fmt.scales, np.float32), ckpt)
    pool = kv_cache.allocate_kv_pages(model.arch, 4, 16, fmt, model.mesh, model.rules)
    np.testing.assert_array_equal(np.stack([np.asarray(layer.scales) for layer in pool]), ckpt)
    calibrating = kv_cache.kv_format(CacheConfig(kv_cache_dtype="fp8", calculate_kv_scales=True), model, "auto")
    assert np.all(np.asarray(calibrating.scales) == UNCALIBRATED)
    assert kv_cache.kv_format(CacheConfig(), model, "auto").scales is None
    assert kv_cache.kv_format(CacheConfig(kv_cache_dtype="fp8"), loaded, "auto").scales is None  # none in it
