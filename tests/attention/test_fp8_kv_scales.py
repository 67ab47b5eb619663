"""FP8 KV scales beside the pages (jaxllm/models/kv_scales.py): the first write calibrates them from its
real tokens (padding ignored), later writes keep them, and attention through q * k_scale and
out * v_scale equals the reference over the dequantized pages; a checkpoint's scales are read per layer."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from jaxllm.models.batch import ForwardBatch
from jaxllm.models.kv_scales import K_SCALE_CONSTANT, V_SCALE_CONSTANT, ScaledKvPages, read_checkpoint_kv_scales
from jaxllm.models.layers import Kernels, attend
from jaxllm.models.loader import open_checkpoint
from pallas_kernels.ragged_paged_attention import (
    AttentionParams,
    ragged_paged_attention_reference,
    ragged_paged_attention_xla,
)
from pallas_kernels.ragged_paged_attention.common import FP8_KV_DTYPE

HQ, HKV, D, PAGE, NUM_PAGES = 4, 2, 16, 4, 8
PARAMS = AttentionParams(sm_scale=0.25)
KERNELS = Kernels(ragged_paged_attention_xla)


def step(q, k, v, kv: ScaledKvPages, batch: ForwardBatch) -> tuple[jax.Array, ScaledKvPages]:
    """`attend` under jit, as the model runs it."""
    return _attend(q, k, v, kv, batch, KERNELS, PARAMS)


_attend = jax.jit(attend, static_argnums=(5, 6))


def one_request_step(start: int, n: int, num_tokens: int = 16) -> ForwardBatch:
    """One request's tokens start..start+n on pages 5, 2, 7, ...; tokens past n are padding."""
    pages = np.array([5, 2, 7, 0, 1, 3, 4, 6], np.int32)
    pos = np.arange(start, start + n)
    slots = np.full(num_tokens, NUM_PAGES * PAGE, np.int32)  # padding: past the pool
    slots[:n] = pages[pos // PAGE] * PAGE + pos % PAGE
    return ForwardBatch(
        input_ids=np.zeros(num_tokens, np.int32), positions=np.zeros(num_tokens, np.int32), slot_mapping=slots,
        cu_q_lens=np.array([0, n, n], np.int32), kv_lens=np.array([start + n, 0], np.int32),
        page_indices=np.stack([pages, np.zeros_like(pages)]), num_seqs=np.array([1], np.int32),
        logits_indices=np.zeros(2, np.int32),
    )


def dequantized(kv: ScaledKvPages) -> np.ndarray:
    scales = np.asarray(kv.scales)
    return np.asarray(kv.pages, np.float32) * scales[:, None, None, None, None]


def want(q: np.ndarray, kv: ScaledKvPages, batch: ForwardBatch) -> np.ndarray:
    """The float reference over the pages the FP8 ones stand for."""
    out = ragged_paged_attention_reference(q, dequantized(kv), batch.kv_lens, batch.page_indices, batch.cu_q_lens,
                                           batch.num_seqs, PARAMS)
    return np.asarray(out).reshape(q.shape[0], -1)


def test_first_write_calibrates_and_later_writes_keep_the_scales():
    rng = np.random.default_rng(0)
    n = 11
    q = rng.standard_normal((16, HQ, D)).astype(np.float32)
    k = 3.0 * rng.standard_normal((16, HKV, D)).astype(np.float32)
    v = 0.5 * rng.standard_normal((16, HKV, D)).astype(np.float32)
    k[n:], v[n:] = 1e4, -1e4  # padded tokens: far larger, and ignored
    empty = ScaledKvPages(jnp.zeros((2, HKV, NUM_PAGES, PAGE, D), FP8_KV_DTYPE), jnp.zeros(2, jnp.float32))
    batch = one_request_step(0, n)
    out, kv = step(q, k, v, empty, batch)
    expected = [np.abs(k[:n]).max() / K_SCALE_CONSTANT, np.abs(v[:n]).max() / V_SCALE_CONSTANT]
    np.testing.assert_allclose(np.asarray(kv.scales), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out)[:n], want(q, kv, batch)[:n], atol=1e-5, rtol=1e-5)
    written = dequantized(kv)[0, :, [5, 2, 7], :, :].transpose(1, 0, 2, 3).reshape(HKV, 12, D)[:, :n]  # [Hkv, n, D]
    np.testing.assert_allclose(written, k[:n].transpose(1, 0, 2), rtol=0.07, atol=1e-3)  # e4m3: 3 mantissa bits

    # A decode with keys 10x larger: the scales stay, the write saturates to +-448 * k_scale.
    decode = one_request_step(n, 1)
    out, after = step(q, 10 * k, 10 * v, kv, decode)
    np.testing.assert_array_equal(np.asarray(after.scales), np.asarray(kv.scales))
    np.testing.assert_allclose(np.asarray(out)[:1], want(q, after, decode)[:1], atol=1e-5, rtol=1e-5)


def test_given_scales_are_used_as_they_are():
    """Scales already set (a checkpoint's) are never measured again; bf16 q reads through them."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((16, HQ, D)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((16, HKV, D)), jnp.bfloat16) for _ in range(2))
    start = ScaledKvPages(jnp.zeros((2, HKV, NUM_PAGES, PAGE, D), FP8_KV_DTYPE), jnp.array([0.02, 0.05], jnp.float32))
    batch = one_request_step(0, 9)
    out, kv = step(q, k, v, start, batch)
    np.testing.assert_array_equal(np.asarray(kv.scales), np.float32([0.02, 0.05]))
    np.testing.assert_allclose(np.asarray(out, np.float32)[:9], want(np.asarray(q, np.float32), kv, batch)[:9],
                               atol=3e-2, rtol=3e-2)


def test_checkpoint_scales_per_layer(tmp_path: Path):
    """k_scale / v_scale, one kv_scale for both, compressed-tensors' output scales, per-head tensors (their
    largest), a layer without (1.0); none at all is None."""
    tensors = {
        "model.layers.0.self_attn.k_scale": np.array(0.5, np.float32),
        "model.layers.0.self_attn.v_scale": np.array(0.25, np.float32),
        "model.layers.1.self_attn.kv_scale": np.array([0.125], np.float32),
        "model.layers.3.self_attn.k_proj.output_scale": np.array([0.1, 0.3], np.float32),
        "model.layers.3.self_attn.v_proj.output_scale": np.array([0.2, 0.05], np.float32),
        "model.layers.3.self_attn.k_proj.weight_scale": np.array(9.0, np.float32),  # a weight's, not the cache's
        "model.layers.0.mlp.down_proj.weight": np.zeros((2, 2), np.float32),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    scales = read_checkpoint_kv_scales(open_checkpoint(tmp_path), num_layers=4)
    np.testing.assert_allclose(scales, [[0.5, 0.25], [0.125, 0.125], [1.0, 1.0], [0.3, 0.2]])
    save_file({"model.layers.0.mlp.down_proj.weight": np.zeros((2, 2), np.float32)},
              str(tmp_path / "model.safetensors"))
    assert read_checkpoint_kv_scales(open_checkpoint(tmp_path), num_layers=4) is None
