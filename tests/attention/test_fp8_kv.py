"""FP8 KV pages (common.py): the write quantizes and saturates, the reference and the XLA path
read the same pages and equal attention over fake-quantized float pages."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention import (
    AttentionParams,
    XlaBlockSizes,
    ragged_paged_attention_reference,
    ragged_paged_attention_xla,
    write_kv_pages,
)
from pallas_kernels.ragged_paged_attention.common import FP8_E4M3_MAX, FP8_KV_DTYPE, quantize_fp8
from tests.attention.test_paged_attention import CASES, ragged_batch

K_SCALE, V_SCALE = 0.02, 0.05  # far from 1: a scale applied twice, or not at all, shows


def fp8_pages(kv: np.ndarray, k_scale: float, v_scale: float) -> jax.Array:
    """[2, Hkv, P, page, D] float -> e4m3 pages holding K / k_scale and V / v_scale."""
    return jnp.stack([quantize_fp8(jnp.asarray(kv[0]), k_scale), quantize_fp8(jnp.asarray(kv[1]), v_scale)])


def fake_quantized(pages: jax.Array, k_scale: float, v_scale: float) -> np.ndarray:
    """The float pages the FP8 pages stand for: quantize-dequantize, in float32."""
    return np.stack([np.asarray(pages[0], np.float32) * k_scale, np.asarray(pages[1], np.float32) * v_scale])


@pytest.mark.parametrize("case", ["decode_only", "mixed"])
@pytest.mark.parametrize("window", [None, 8])
def test_fp8_pages_equal_fake_quantized_float_pages(case, window):
    """Reference and XLA on e4m3 pages with scales == the float reference on the dequantized pages."""
    rng = np.random.default_rng(5)
    q_lens, kv_lens = CASES[case]
    q, kv, *meta = ragged_batch(rng, q_lens, kv_lens, num_slots=6, num_tokens=64)
    pages = fp8_pages(kv * 0.1, K_SCALE, V_SCALE)
    params = AttentionParams(sm_scale=0.25, sliding_window=window)
    fp8_params = dataclasses.replace(params, k_scale=K_SCALE, v_scale=V_SCALE)
    want = np.asarray(ragged_paged_attention_reference(q, fake_quantized(pages, K_SCALE, V_SCALE), *meta, params))
    ref = np.asarray(ragged_paged_attention_reference(q, pages, *meta, fp8_params))
    xla = np.asarray(ragged_paged_attention_xla(q, pages, *meta, fp8_params, blocks=XlaBlockSizes(32, 2, 8)))
    np.testing.assert_allclose(ref, want, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(xla, want, atol=2e-5, rtol=2e-5)
    assert np.abs(want[: sum(q_lens)]).max() > 0.01


def test_fp8_pages_with_bf16_queries_and_sinks():
    """bf16 q (the engine's case) over e4m3 pages: the XLA path equals the reference, sinks included."""
    rng = np.random.default_rng(6)
    q, kv, *meta = ragged_batch(rng, [1, 12, 1, 30], [64, 40, 1, 47], num_slots=6, num_tokens=64)
    pages = fp8_pages(kv, 0.5, 2.0)
    params = AttentionParams(sm_scale=0.25, k_scale=0.5, v_scale=2.0)
    sinks = jnp.asarray(rng.standard_normal(8), jnp.float32)
    qb = jnp.asarray(q, jnp.bfloat16)
    ref = np.asarray(ragged_paged_attention_reference(qb, pages, *meta, params, sinks=sinks), np.float32)
    xla = np.asarray(ragged_paged_attention_xla(qb, pages, *meta, params, sinks=sinks), np.float32)
    np.testing.assert_allclose(xla, ref, atol=3e-2, rtol=3e-2)


def test_write_quantizes_with_the_scales_and_saturates():
    pages = jnp.zeros((2, 1, 2, 4, 8), FP8_KV_DTYPE)
    k = jnp.full((3, 1, 8), 1.5, jnp.bfloat16).at[2].set(1e4)  # token 2 past e4m3's range
    v = jnp.full((3, 1, 8), -3.0, jnp.bfloat16)
    out = write_kv_pages(pages, k, v, jnp.array([0, 5, 6], jnp.int32), k_scale=0.5, v_scale=2.0)
    flat = np.asarray(out, np.float32).reshape(2, 8, 8)
    np.testing.assert_array_equal(flat[0, [0, 5], 0], [3.0, 3.0])  # 1.5 / 0.5
    assert flat[0, 6, 0] == FP8_E4M3_MAX, "saturated, not NaN"
    np.testing.assert_array_equal(flat[1, [0, 5, 6], 0], [-1.5, -1.5, -1.5])  # -3 / 2
    assert not np.any(flat[:, [1, 2, 3, 4, 7]]), "only the mapped slots are written"


def test_scales_are_ignored_on_float_pages():
    """Pages in q's dtype are not quantized: the scales change neither the write nor the read."""
    rng = np.random.default_rng(7)
    q, kv, *meta = ragged_batch(rng, [1, 12], [20, 12], num_slots=2, num_tokens=16)
    params = AttentionParams(sm_scale=0.25)
    scaled = dataclasses.replace(params, k_scale=3.0, v_scale=0.1)
    for attention in (ragged_paged_attention_reference, ragged_paged_attention_xla):
        np.testing.assert_array_equal(np.asarray(attention(q, kv, *meta, scaled)),
                                      np.asarray(attention(q, kv, *meta, params)))
    k = jnp.asarray(rng.standard_normal((2, 2, 16)), jnp.float32)
    written = write_kv_pages(jnp.asarray(kv), k, k, jnp.array([0, 1], jnp.int32), k_scale=3.0)
    np.testing.assert_array_equal(np.asarray(written[0, :, 0, :2]), np.asarray(k).transpose(1, 0, 2))
