"""MXFP4 weights (gpt-oss's experts): the format against transformers' own dequantization, the
kernel layout, and the grouped matmul on packed weights (reference, XLA, the Mosaic GPU kernel in
the simulator and through the CUDA lowering) against the dense grouped matmul on the same values.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import Activation, grouped_matmul_reference, grouped_matmul_xla
from pallas_kernels.grouped_matmul.mosaic_gpu import Plan, default_plan, grouped_matmul_mosaic
from pallas_kernels.grouped_matmul.mxfp4 import (
    E2M1_VALUES,
    Mxfp4Weights,
    deinterleave_rows,
    dequantize_mxfp4,
    pack_for_kernel,
    quantize_mxfp4,
)
from pallas_kernels.grouped_matmul.xla import dequantizes_per_tile
from tests.kernels.test_grouped_matmul import BF16_TOL, Case, check_against_reference

OAI_SPLIT = Activation("swiglu_oai", layout="split")
OAI_INTERLEAVED = Activation("swiglu_oai", layout="interleaved")


def random_checkpoint(rng, shape, scale_range=(0, 255)):
    """Random checkpoint-layout (blocks [..., N, K/32, 16], scales [..., N, K/32]), every byte value."""
    *lead, n, k = shape
    blocks = rng.integers(0, 256, (*lead, n, k // 32, 16), dtype=np.uint8)
    scales = rng.integers(*scale_range, (*lead, n, k // 32), dtype=np.uint8)
    return blocks, scales


# ----------------------------------------------------------------------------------------------
# The format


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_dequantize_matches_transformers(dtype):
    torch = pytest.importorskip("torch")
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.default_rng(0)
    # Scales 0 and 1 give f32 subnormals; 255 (NaN in the spec) gives inf, as transformers' does.
    blocks, scales = random_checkpoint(rng, (3, 16, 256), scale_range=(0, 254))
    with np.errstate(over="ignore"):
        expected = convert_moe_packed_tensors(
            torch.from_numpy(blocks), torch.from_numpy(scales), dtype=getattr(torch, dtype)
        ).float().numpy()  # [E, K, N]
        host = dequantize_mxfp4(blocks, scales, jnp.dtype(dtype)).astype(np.float32)  # [E, N, K]
    np.testing.assert_array_equal(host.transpose(0, 2, 1), expected)
    assert (np.signbit(host.transpose(0, 2, 1)) == np.signbit(expected)).all()
    # On device: the same, except that XLA flushes f32 subnormals (scales 0 and 1) to zero.
    normal = scales[..., None].repeat(32, -1).reshape(host.shape) >= 2  # [E, N, K]
    device = np.asarray(dequantize_mxfp4(jnp.asarray(blocks), jnp.asarray(scales), dtype).astype(jnp.float32))
    np.testing.assert_array_equal(device[normal], host[normal])


def test_quantize_rounds_to_the_nearest_value_of_the_block_grid():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((2, 8, 256)).astype(np.float32) * np.exp(rng.uniform(-8, 8, (2, 8, 1)))
    blocks, scales = quantize_mxfp4(w)
    q = dequantize_mxfp4(blocks, scales, np.float32)  # [E, N, K]
    scale = np.ldexp(1.0, scales.astype(np.int32) - 127).repeat(32, -1)  # [E, N, K]
    grid = E2M1_VALUES[None, None, None, :8] * scale[..., None]  # every magnitude of each value's block
    nearest = np.abs(np.abs(w)[..., None] - grid).min(-1)
    np.testing.assert_allclose(np.abs(w - q), nearest, rtol=1e-6, atol=0)
    block_max = np.abs(w).reshape(2, 8, 8, 32).max(-1).repeat(32, -1)
    assert (np.abs(w) <= 6 * scale).all() and (block_max > 3 * scale).all()  # the smallest such scale
    again = dequantize_mxfp4(*quantize_mxfp4(q), np.float32)
    np.testing.assert_array_equal(again, q)  # representable values are kept
    # The same on device.
    device_blocks, device_scales = quantize_mxfp4(jnp.asarray(w))
    np.testing.assert_array_equal(device_blocks, blocks)
    np.testing.assert_array_equal(device_scales, scales)


@pytest.mark.parametrize("k", [128, 192, 320])
def test_kernel_layout_holds_the_checkpoint_values(k):
    rng = np.random.default_rng(2)
    blocks, scales = random_checkpoint(rng, (2, 24, k), scale_range=(100, 150))
    dense = dequantize_mxfp4(blocks, scales, np.float32).transpose(0, 2, 1)  # [E, K, N]
    packed = Mxfp4Weights(*pack_for_kernel(blocks, scales))
    assert packed.shape == dense.shape
    np.testing.assert_array_equal(packed.dequantize(np.float32), dense)
    on_device = pack_for_kernel(jnp.asarray(blocks), jnp.asarray(scales))
    np.testing.assert_array_equal(on_device[0], packed.blocks)
    np.testing.assert_array_equal(on_device[1], packed.scales)
    # A shard of N converts alone to the same bytes as that shard of the whole conversion.
    shard_blocks, _ = pack_for_kernel(blocks[:, 8:16], scales[:, 8:16])
    np.testing.assert_array_equal(shard_blocks, packed.blocks[:, :, 8:16])


# ----------------------------------------------------------------------------------------------
# The grouped matmul on packed weights


def make_packed_inputs(case: Case, dtype=jnp.bfloat16, seed: int = 0, with_bias: bool = False):
    """(lhs, packed rhs, its values dense [E, K, N] in lhs's dtype, group sizes, bias)."""
    rng = np.random.default_rng(seed)
    num_groups = len(case.group_sizes)
    lhs = jnp.asarray(rng.standard_normal((case.m, case.k)), dtype)
    lhs = lhs.at[sum(case.group_sizes) :].set(jnp.asarray(1e4, dtype))  # padding rows: garbage
    w = rng.standard_normal((num_groups, case.n, case.k)) / np.sqrt(case.k)  # [E, N, K], HF's [out, in]
    blocks, scales = quantize_mxfp4(w.astype(np.float32))
    packed = Mxfp4Weights(*(jnp.asarray(x) for x in pack_for_kernel(blocks, scales)))
    dense = jnp.asarray(dequantize_mxfp4(blocks, scales, dtype).transpose(0, 2, 1))  # [E, K, N]
    bias = jnp.asarray(rng.standard_normal((num_groups, case.n)), dtype) if with_bias else None
    return lhs, packed, dense, jnp.asarray(case.group_sizes, jnp.int32), bias


MIX = Case((0, 5, 1, 0, 20, 7, 0, 0), m=40, k=192, n=128)


@pytest.mark.parametrize("activation", [None, OAI_SPLIT], ids=["none", "swiglu_oai"])
def test_packed_reference_equals_dense_reference(activation):
    lhs, packed, dense, group_sizes, bias = make_packed_inputs(MIX, with_bias=True)
    out = grouped_matmul_reference(lhs, packed, group_sizes, bias=bias, activation=activation)
    ref = grouped_matmul_reference(lhs, dense, group_sizes, bias=bias, activation=activation)
    np.testing.assert_array_equal(out, ref)


def test_deinterleaved_rows_keep_the_product():
    """gpt-oss's interleaved gate/up rows, deinterleaved at load, with the split activation."""
    lhs, _, _, group_sizes, bias = make_packed_inputs(MIX, jnp.float32, with_bias=True)
    rng = np.random.default_rng(3)
    w = rng.standard_normal((len(MIX.group_sizes), MIX.n, MIX.k)).astype(np.float32) / 8  # [E, 2I, K]
    blocks, scales = quantize_mxfp4(w)
    interleaved = jnp.asarray(dequantize_mxfp4(blocks, scales, np.float32).transpose(0, 2, 1))
    split = Mxfp4Weights(*pack_for_kernel(deinterleave_rows(blocks, 1), deinterleave_rows(scales, 1)))
    ref = grouped_matmul_reference(lhs, interleaved, group_sizes, bias=bias, activation=OAI_INTERLEAVED)
    out = grouped_matmul_reference(lhs, split, group_sizes, bias=deinterleave_rows(bias, -1), activation=OAI_SPLIT)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


# Decode-like (fewer row tiles than experts: each tile dequantizes its own expert) and larger
# (every expert dequantized once).
XLA_CASES = {
    "per_tile": Case((0, 1, 0, 2, 0, 0, 1, 0), m=5, k=192, n=64),
    "all_experts": MIX,
}


@pytest.mark.parametrize("form", list(XLA_CASES))
def test_xla_packed_matches_reference(form):
    case = XLA_CASES[form]
    assert dequantizes_per_tile(case.m, len(case.group_sizes)) == (form == "per_tile")
    lhs, packed, _, group_sizes, bias = make_packed_inputs(case, jnp.float32, with_bias=True)
    out = jax.jit(lambda *a: grouped_matmul_xla(*a[:3], bias=a[3], activation=OAI_SPLIT))(
        lhs, packed, group_sizes, bias
    )
    check_against_reference(out, lhs, packed, group_sizes, bias, OAI_SPLIT, tol=1e-5)


# ----------------------------------------------------------------------------------------------
# The Mosaic GPU kernel


DECODE_PLAN = Plan(block_m=64, block_n=64, block_k=64, num_stages=2)


@pytest.mark.parametrize(
    "activation,with_bias", [(None, False), (OAI_SPLIT, True)], ids=["plain", "swiglu_oai_bias"]
)
def test_simulated_packed_kernel_matches_reference(simulator, activation, with_bias):
    # K = 192: three K steps, the last one a chunk's low nibbles only (its high ones are padding);
    # one 64-column block of output either way.
    case = MIX if activation is not None else dataclasses.replace(MIX, n=64)
    lhs, packed, _, group_sizes, bias = make_packed_inputs(case, with_bias=with_bias)
    simulator.reset()
    out = grouped_matmul_mosaic(
        lhs, packed, group_sizes, bias=bias, activation=activation, plan=DECODE_PLAN,
        interpret=simulator.params(),
    )
    out = jax.block_until_ready(out)
    check_against_reference(out, lhs, packed, group_sizes, bias, activation, tol=BF16_TOL)
    assert not simulator.races_found()


def test_simulated_packed_kernel_prefill_plan(simulator):
    """128-row tiles and a 128-column dequantized block (two swizzle tiles wide)."""
    case = Case((40, 0, 87), m=130, k=128, n=128)  # the last window is moved back inside the rows
    lhs, packed, _, group_sizes, _ = make_packed_inputs(case)
    simulator.reset()
    plan = Plan(block_m=128, block_n=128, block_k=64, num_stages=2)
    out = jax.block_until_ready(grouped_matmul_mosaic(lhs, packed, group_sizes, plan=plan,
                                                      interpret=simulator.params()))
    check_against_reference(out, lhs, packed, group_sizes, None, None, tol=BF16_TOL)
    assert not simulator.races_found()


# (rows, K, N, experts, activation, bias): gpt-oss-20b's two GEMMs at decode and prefill.
LOWERING_SHAPES = {
    "decode_gate_up": (32, 2880, 5760, 32, OAI_SPLIT, True),
    "decode_down": (32, 2880, 2880, 32, None, True),
    "prefill_gate_up": (16384, 2880, 5760, 32, OAI_SPLIT, True),
    "prefill_down": (16384, 2880, 2880, 32, None, True),
}


@pytest.mark.parametrize("name", list(LOWERING_SHAPES))
def test_packed_kernel_lowers_for_cuda(name):
    m, k, n, num_groups, activation, with_bias = LOWERING_SHAPES[name]
    shape = jax.ShapeDtypeStruct
    packed = jax.eval_shape(
        lambda: Mxfp4Weights(*pack_for_kernel(jnp.zeros((num_groups, n, k // 32, 16), jnp.uint8),
                                              jnp.zeros((num_groups, n, k // 32), jnp.uint8)))
    )
    args = [shape((m, k), jnp.bfloat16), packed, shape((num_groups,), jnp.int32)]
    if with_bias:
        args.append(shape((num_groups, n), jnp.bfloat16))

    def run(lhs, rhs, group_sizes, *bias):
        return grouped_matmul_mosaic(lhs, rhs, group_sizes, bias=bias[0] if bias else None, activation=activation)

    text = jax.jit(run).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_packed_default_plans_fit_two_ctas_per_sm():
    for m in (64, 16384 * 4):
        for activation, blocks in ((OAI_SPLIT, 2), (None, 1)):
            plan = default_plan(m=m, k=2880, n=5760, num_groups=32, activation=activation, packed=True)
            assert plan.block_k == 64 and plan.num_stages >= 2
            assert 2 * plan.smem_bytes(2, blocks, packed=True) <= 227 * 1024


def test_packed_kernel_refuses_other_block_k():
    lhs, packed, _, group_sizes, _ = make_packed_inputs(MIX)
    with pytest.raises(ValueError, match="block_k"):
        grouped_matmul_mosaic(lhs, packed, group_sizes, plan=dataclasses.replace(DECODE_PLAN, block_k=32))
