"""int4 weights: each checkpoint layout against a per-element loop written from its definition, the
pack -> dequantize round trip, the conversion to `Int4Weights`, and the int4 matmul (reference, XLA,
the Mosaic GPU kernel in the simulator and through the CUDA lowering at Llama-3.1-8B's shapes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.int4_matmul import Int4Weights, int4_matmul_reference, int4_matmul_xla
from pallas_kernels.int4_matmul import formats as F
from pallas_kernels.int4_matmul.mosaic_gpu import Plan, default_plan, int4_matmul_mosaic

GROUP = 128


def random_words(rng, shape) -> np.ndarray:
    return rng.integers(-(2**31), 2**31, shape, dtype=np.int64).astype(np.int32)


def nibble(word, i: int, bits: int = 4) -> int:
    """Code i of a 32-bit word, bits [bits * i, bits * (i + 1))."""
    return (int(word) & 0xFFFFFFFF) >> (bits * i) & ((1 << bits) - 1)


# ----------------------------------------------------------------------------------------------
# Each format against its definition, element by element


def test_awq_matches_its_definition():
    rng = np.random.default_rng(0)
    k, n = 2 * GROUP, 16
    qweight, qzeros = random_words(rng, (k, n // 8)), random_words(rng, (k // GROUP, n // 8))
    scales = rng.uniform(-0.1, 0.1, (k // GROUP, n)).astype(np.float16)
    out = F.dequantize_awq(qweight, qzeros, scales, GROUP)
    order = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of a word holds column 8c + order[i]
    expected = np.zeros((k, n), np.float32)
    for r in range(k):
        for c in range(n // 8):
            for i in range(8):
                col = 8 * c + order[i]
                q, z = nibble(qweight[r, c], i), nibble(qzeros[r // GROUP, c], i)
                expected[r, col] = (q - z) * np.float32(scales[r // GROUP, col])
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_gptq_matches_its_definition(bits, checkpoint_format):
    rng = np.random.default_rng(1)
    per_word = 32 // bits
    k, n = 2 * GROUP, 8
    qweight, qzeros = random_words(rng, (k // per_word, n)), random_words(rng, (k // GROUP, n // per_word))
    scales = rng.uniform(-0.1, 0.1, (k // GROUP, n)).astype(np.float16)
    g_idx = rng.permutation(np.arange(k) // GROUP).astype(np.int32)  # desc_act: groups in any order
    out = F.dequantize_gptq(qweight, qzeros, scales, g_idx, bits=bits, group_size=GROUP, sym=False,
                            checkpoint_format=checkpoint_format)
    sym = F.dequantize_gptq(qweight, None, scales, g_idx, bits=bits, group_size=GROUP, sym=True)
    expected = np.zeros((k, n), np.float32)
    expected_sym = np.zeros((k, n), np.float32)
    for r in range(k):
        g = g_idx[r]
        for col in range(n):
            q = nibble(qweight[r // per_word, col], r % per_word, bits)
            z = nibble(qzeros[g, col // per_word], col % per_word, bits) + (checkpoint_format == "gptq")
            expected[r, col] = (q - z) * np.float32(scales[g, col])
            expected_sym[r, col] = (q - 2 ** (bits - 1)) * np.float32(scales[g, col])
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(sym, expected_sym)


@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_quantized_matches_its_definition(symmetric):
    rng = np.random.default_rng(2)
    k, n = 2 * GROUP, 16
    packed = random_words(rng, (n, k // 8))  # [out, in / 8]
    scales = rng.uniform(-0.1, 0.1, (n, k // GROUP)).astype(np.float32)
    zero_point = None if symmetric else random_words(rng, (n // 8, k // GROUP))
    out = F.dequantize_pack_quantized(packed, scales, zero_point, group_size=GROUP)  # [in, out]
    expected = np.zeros((k, n), np.float32)
    for o in range(n):
        for i in range(k):
            q = nibble(packed[o, i // 8], i % 8) - 8
            z = 0 if symmetric else nibble(zero_point[o // 8, i // GROUP], o % 8) - 8
            expected[i, o] = (q - z) * scales[o, i // GROUP]
    np.testing.assert_array_equal(out, expected)


# ----------------------------------------------------------------------------------------------
# Packers: the round trip, on host and on device


def quantized(rng, k=2 * GROUP, n=64, sym=False, scale_dtype=np.float16):
    w = rng.standard_normal((k, n)).astype(np.float32) / 8
    return F.quantize_groups(w, GROUP, sym=sym, scale_dtype=scale_dtype)


def expected_weights(codes, zeros, scales):
    """The float weights quantize_groups' codes stand for: (q - z) * s, [in, out] float32."""
    return (codes - np.repeat(zeros, GROUP, 0)).astype(np.float32) * np.repeat(scales.astype(np.float32), GROUP, 0)


def test_quantize_is_round_to_nearest_within_the_range():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((2 * GROUP, 32)).astype(np.float32)
    for sym in (True, False):
        codes, zeros, scales = F.quantize_groups(w, GROUP, sym=sym)
        assert codes.min() >= 0 and codes.max() <= 15 and zeros.min() >= 0 and zeros.max() <= 15
        step = np.repeat(scales.astype(np.float32), GROUP, 0)
        assert (np.abs(expected_weights(codes, zeros, scales) - w) <= 0.51 * step + 1e-6).all()


def test_awq_round_trip():
    codes, zeros, scales = quantized(np.random.default_rng(4))
    qweight, qzeros = F.pack_awq(codes, zeros)
    assert qweight.dtype == np.int32 and qweight.shape == (2 * GROUP, 8) and qzeros.shape == (2, 8)
    np.testing.assert_array_equal(F.dequantize_awq(qweight, qzeros, scales, GROUP),
                                  expected_weights(codes, zeros, scales))
    on_device = F.dequantize_awq(*(jnp.asarray(a) for a in (qweight, qzeros, scales)), GROUP)
    np.testing.assert_array_equal(on_device, expected_weights(codes, zeros, scales))


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_gptq_round_trip(checkpoint_format):
    codes, zeros, scales = quantized(np.random.default_rng(5))
    qweight, qzeros = F.pack_gptq(codes, zeros, checkpoint_format=checkpoint_format)
    assert qweight.shape == (2 * GROUP // 8, 64) and qzeros.shape == (2, 8)
    out = F.dequantize_gptq(qweight, qzeros, scales, group_size=GROUP, sym=False,
                            checkpoint_format=checkpoint_format)
    np.testing.assert_array_equal(out, expected_weights(codes, zeros, scales))


def test_gptq_v1_refuses_a_zero_point_of_zero():
    codes, zeros, _ = quantized(np.random.default_rng(6))
    with pytest.raises(ValueError, match="gptq_v2"):
        F.pack_gptq(codes, np.zeros_like(zeros))


def test_pack_quantized_round_trip():
    for sym in (True, False):
        codes, zeros, scales = quantized(np.random.default_rng(7), sym=sym, scale_dtype=np.float32)
        signed_zeros = None if sym else (zeros - 8).T
        packed, zero_point = F.pack_pack_quantized((codes - 8).T, signed_zeros)
        assert packed.shape == (64, 2 * GROUP // 8)
        out = F.dequantize_pack_quantized(packed, scales.T, zero_point, group_size=GROUP)
        np.testing.assert_array_equal(out, expected_weights(codes, zeros, scales))


# ----------------------------------------------------------------------------------------------
# The kernel layout


def int4_from(fmt: str, rng, k=2 * GROUP, n=64, scale_dtype=jnp.float32) -> tuple[Int4Weights, np.ndarray]:
    """(Int4Weights converted from a random checkpoint of `fmt`, its float weights [in, out] in the
    kernel's row order)."""
    sym = fmt.endswith("sym")
    codes, zeros, scales = quantized(rng, k, n, sym=sym)
    dense = expected_weights(codes, zeros, scales)
    if fmt == "awq":
        return F.awq_to_int4(*F.pack_awq(codes, zeros), scales, GROUP, scale_dtype), dense
    if fmt.startswith("gptq"):
        qweight, qzeros = F.pack_gptq(codes, zeros)
        w = F.gptq_to_int4(qweight, qzeros, scales, group_size=GROUP, sym=sym, scale_dtype=scale_dtype)
        return w, dense
    signed_zeros = None if sym else (zeros - 8).T
    packed, zero_point = F.pack_pack_quantized((codes - 8).T, signed_zeros)
    return F.pack_quantized_to_int4(packed, scales.T, zero_point, group_size=GROUP, scale_dtype=scale_dtype), dense


@pytest.mark.parametrize("fmt", ["awq", "gptq", "gptq_sym", "pack_quantized", "pack_quantized_sym"])
def test_int4_weights_hold_each_format(fmt):
    w, dense = int4_from(fmt, np.random.default_rng(8))
    assert (w.zeros is None) == fmt.endswith("sym")
    w = jax.device_put(w)
    w.validate()
    np.testing.assert_array_equal(w.dequantize(jnp.float32), dense)


def test_desc_act_becomes_an_input_permutation():
    rng = np.random.default_rng(9)
    k = 3 * GROUP
    codes, zeros, scales = quantized(rng, k=k)
    g_idx = rng.permutation(np.arange(k) // GROUP).astype(np.int32)
    qweight, qzeros = F.pack_gptq(codes, zeros)
    dense = F.dequantize_gptq(qweight, qzeros, scales, g_idx, group_size=GROUP, sym=False)  # [in, out]
    w = jax.device_put(F.gptq_to_int4(qweight, qzeros, scales, g_idx, group_size=GROUP, sym=False,
                                      scale_dtype=jnp.float32))
    assert w.input_perm is not None
    x = jnp.asarray(rng.standard_normal((5, k)), jnp.float32)
    np.testing.assert_allclose(int4_matmul_reference(x, w), x @ dense, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exactly"):
        F.gptq_to_int4(qweight, qzeros, scales, np.zeros(k, np.int32), group_size=GROUP, sym=False)


def test_a_column_shard_converts_alone_to_that_shard():
    w, _ = int4_from("awq", np.random.default_rng(10), n=128)
    codes, zeros, scales = quantized(np.random.default_rng(10), n=128)
    qweight, qzeros = F.pack_awq(codes, zeros)
    shard = F.awq_to_int4(qweight[:, 8:], qzeros[:, 8:], scales[:, 64:], GROUP, jnp.float32)
    np.testing.assert_array_equal(shard.values.astype(np.int8), w.values[:, 64:].astype(np.int8))
    row_shard = F.awq_to_int4(qweight[GROUP:], qzeros[1:], scales[1:], GROUP, jnp.float32)
    np.testing.assert_array_equal(row_shard.zeros, w.zeros[1:])


# ----------------------------------------------------------------------------------------------
# The matmul


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xla_matches_reference(dtype):
    rng = np.random.default_rng(11)
    w, dense = int4_from("awq", rng, scale_dtype=jnp.float32 if dtype == jnp.float32 else jnp.bfloat16)
    w = jax.device_put(w)
    x = jnp.asarray(rng.standard_normal((7, 2 * GROUP)), dtype)
    ref = int4_matmul_reference(x, w)
    out = jax.jit(int4_matmul_xla)(x, w)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), rtol=tol, atol=tol)
    if dtype == jnp.float32:
        np.testing.assert_allclose(ref, x @ dense, rtol=1e-5, atol=1e-5)


# (rows, plan): a 5-row decode with a K split; 130 rows over three 64-row blocks
SIMULATED = {
    "decode_split_k": (5, Plan(block_m=64, block_n=128, block_k=64, num_stages=2, k_splits=2), "awq"),
    "row_blocks_sym": (130, Plan(block_m=64, block_n=64, block_k=64, num_stages=2), "gptq_sym"),
}


@pytest.mark.parametrize("name", list(SIMULATED))
def test_simulated_kernel_matches_reference(simulator, name):
    m, plan, fmt = SIMULATED[name]
    rng = np.random.default_rng(12)
    w = jax.device_put(int4_from(fmt, rng, n=128, scale_dtype=jnp.bfloat16)[0])
    x = jnp.asarray(rng.standard_normal((m, 2 * GROUP)), jnp.bfloat16)
    simulator.reset()
    out = jax.block_until_ready(int4_matmul_mosaic(x, w, plan=plan, interpret=simulator.params()))
    ref = int4_matmul_reference(x, w)
    assert out.shape == ref.shape and bool(jnp.isfinite(out.astype(jnp.float32)).all())
    # The same bf16 weights, float32 accumulation in another order: bf16 output rounding apart.
    np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), rtol=1e-2, atol=1e-2)
    assert not simulator.races_found()


# Llama-3.1-8B's MLP GEMMs at decode and prefill sizes, group 128, with zero points (AWQ).
LOWERING = [(m, k, n) for m in (1, 64, 256) for k, n in ((4096, 14336), (14336, 4096))]


@pytest.mark.parametrize("m,k,n", LOWERING, ids=[f"m{m}-{k}x{n}" for m, k, n in LOWERING])
def test_kernel_lowers_for_cuda(m, k, n):
    groups = (k // GROUP, n)
    w = Int4Weights(
        jax.ShapeDtypeStruct((k, n), jnp.int4), jax.ShapeDtypeStruct(groups, jnp.bfloat16),
        jax.ShapeDtypeStruct(groups, jnp.bfloat16), None, GROUP,
    )
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    text = jax.jit(int4_matmul_mosaic).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    plan = default_plan(m=m, k=k, n=n)
    assert plan.smem_bytes() <= 227 * 1024
    assert (n // plan.block_n) * plan.k_splits >= 64 or m > 64  # decode fills the SMs


def test_wide_column_plan_lowers_for_cuda():
    """256-column blocks (bench/int4_matmul.py times them against the default)."""
    k, n = 4096, 4096
    w = Int4Weights(
        jax.ShapeDtypeStruct((k, n), jnp.int4), jax.ShapeDtypeStruct((k // GROUP, n), jnp.bfloat16), None, None, GROUP
    )
    plan = Plan(block_m=64, block_n=256, block_k=64, num_stages=4, k_splits=16)
    run = jax.jit(lambda x, w: int4_matmul_mosaic(x, w, plan=plan))
    text = run.trace(jax.ShapeDtypeStruct((8, k), jnp.bfloat16), w).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    with pytest.raises(ValueError, match="registers"):
        int4_matmul_mosaic(jnp.zeros((256, k), jnp.bfloat16), w, plan=Plan(128, 256, 64, 2))
