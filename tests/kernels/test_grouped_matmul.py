"""Grouped matmul: the XLA path and the Mosaic GPU kernel against the per-group reference, on CPU.

The kernel is checked twice, as the attention kernel is (test_mosaic_gpu_attention.py): in the
Mosaic GPU simulator (race detector on, fresh buffers, the output too, filled with NaN so a row
the kernel never writes fails the finite check), and through the real CUDA lowering at the
shapes of Qwen3-30B-A3B and gpt-oss, which also checks layouts and the SMEM budget.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import (
    Activation,
    grouped_matmul_reference,
    grouped_matmul_xla,
    interleaved_to_split,
)
from pallas_kernels.grouped_matmul.common import TileColumn, padded_rows, row_tiles
from pallas_kernels.grouped_matmul.mosaic_gpu import (
    Plan,
    default_plan,
    grouped_matmul_mosaic,
    mosaic_unsupported_reason,
)

SWIGLU = Activation("swiglu")
OAI_SPLIT = Activation("swiglu_oai", layout="split")
OAI_INTERLEAVED = Activation("swiglu_oai", layout="interleaved")
SWIGLU_INTERLEAVED = Activation("swiglu", layout="interleaved")


def activation_id(activation: Activation | None) -> str:
    return "none" if activation is None else f"{activation.kind}-{activation.layout}"


@dataclasses.dataclass(frozen=True)
class Case:
    group_sizes: tuple[int, ...]
    m: int  # rows of lhs; rows past sum(group_sizes) are padding
    k: int = 128
    n: int = 128


# The group-size mixes: empty groups everywhere, one row, many rows, everything in one group,
# padding rows past the sum.
MIXES = {
    "empty_groups_and_padding": Case((0, 5, 1, 0, 20, 7, 0, 0), m=40),
    "one_row": Case((0, 0, 1, 0), m=8),
    "all_in_one_group": Case((0, 0, 37, 0), m=37),
    "every_group_one_row": Case((1,) * 8, m=8),
}
# 1000 rows in one group between small ones: many tiles of one weight matrix.
MANY_ROWS = Case((3, 1000, 0, 21), m=1030, k=64, n=64)


def make_inputs(case: Case, dtype=jnp.bfloat16, seed: int = 0, with_bias: bool = False):
    rng = np.random.default_rng(seed)
    num_groups = len(case.group_sizes)
    lhs = jnp.asarray(rng.standard_normal((case.m, case.k)), dtype)
    # Padding rows hold garbage: their output must still be zero.
    lhs = lhs.at[sum(case.group_sizes) :].set(jnp.asarray(1e4, dtype))
    rhs = jnp.asarray(rng.standard_normal((num_groups, case.k, case.n)) / np.sqrt(case.k), dtype)
    bias = jnp.asarray(rng.standard_normal((num_groups, case.n)), dtype) if with_bias else None
    return lhs, rhs, jnp.asarray(case.group_sizes, jnp.int32), bias


def relative_error(out: jax.Array, ref: jax.Array) -> float:
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def check_against_reference(out, lhs, rhs, group_sizes, bias, activation, tol) -> None:
    ref = grouped_matmul_reference(lhs, rhs, group_sizes, bias=bias, activation=activation)
    assert out.shape == ref.shape and out.dtype == lhs.dtype
    assert bool(jnp.isfinite(out.astype(jnp.float32)).all()), "unwritten (NaN-poisoned) or non-finite rows"
    assert not bool(jnp.any(out[int(group_sizes.sum()) :])), "padding rows must be zero"
    assert relative_error(out, ref) < tol


# ----------------------------------------------------------------------------------------------
# The XLA path (both of its forms)

XLA_FORMS = {"ragged_dot": None, "tile_loop": 0}  # dense_limit (None: the default)


@pytest.mark.parametrize("form", list(XLA_FORMS))
@pytest.mark.parametrize("mix", list(MIXES) + ["many_rows"])
def test_xla_matches_reference(mix, form):
    case = MANY_ROWS if mix == "many_rows" else MIXES[mix]
    lhs, rhs, group_sizes, _ = make_inputs(case, jnp.float32)
    limit = XLA_FORMS[form]
    kwargs = {} if limit is None else {"dense_limit": limit}
    out = jax.jit(lambda *a: grouped_matmul_xla(*a, **kwargs))(lhs, rhs, group_sizes)
    check_against_reference(out, lhs, rhs, group_sizes, None, None, tol=1e-5)


@pytest.mark.parametrize("form", list(XLA_FORMS))
@pytest.mark.parametrize(
    "activation", [None, SWIGLU, SWIGLU_INTERLEAVED, OAI_SPLIT, OAI_INTERLEAVED], ids=activation_id
)
def test_xla_bias_and_activations_match_reference(activation, form):
    lhs, rhs, group_sizes, bias = make_inputs(MIXES["empty_groups_and_padding"], jnp.float32, with_bias=True)
    limit = XLA_FORMS[form]
    kwargs = {} if limit is None else {"dense_limit": limit}
    out = grouped_matmul_xla(lhs, rhs, group_sizes, bias=bias, activation=activation, **kwargs)
    check_against_reference(out, lhs, rhs, group_sizes, bias, activation, tol=1e-5)


def test_activation_definitions():
    gate = jnp.asarray([-10.0, -1.0, 0.5, 9.0])
    up = jnp.asarray([8.0, -9.0, 2.0, 0.25])
    silu = gate / (1 + jnp.exp(-gate))
    np.testing.assert_allclose(SWIGLU.combine(gate, up), silu * up, rtol=1e-6)
    g = jnp.minimum(gate, 7.0)
    u = jnp.clip(up, -7.0, 7.0)
    oai = (u + 1) * g / (1 + jnp.exp(-1.702 * g))
    np.testing.assert_allclose(OAI_SPLIT.combine(gate, up), oai, rtol=1e-6)
    y = jnp.arange(8.0)[None]  # [1, 8]
    assert SWIGLU.gate_up(y)[0].tolist() == [[0, 1, 2, 3]]
    assert SWIGLU_INTERLEAVED.gate_up(y)[0].tolist() == [[0, 2, 4, 6]]
    assert SWIGLU_INTERLEAVED.gate_up(y)[1].tolist() == [[1, 3, 5, 7]]


def test_interleaved_to_split_keeps_the_product():
    lhs, rhs, group_sizes, bias = make_inputs(MIXES["empty_groups_and_padding"], jnp.float32, with_bias=True)
    split_rhs, split_bias = interleaved_to_split(rhs, bias)
    ref = grouped_matmul_reference(lhs, rhs, group_sizes, bias=bias, activation=OAI_INTERLEAVED)
    out = grouped_matmul_reference(lhs, split_rhs, group_sizes, bias=split_bias, activation=OAI_SPLIT)
    np.testing.assert_array_equal(out, ref)


# ----------------------------------------------------------------------------------------------
# Row tiles (the work list of the kernel and of the XLA tile loop)


@pytest.mark.parametrize("block_m", [64, 128])
def test_row_tiles_cover_every_row_once(block_m):
    sizes = [0, 5, 1, 0, 200, 7, 0, 0, 130, 1]
    m = sum(sizes) + 13  # padding rows too
    tiles, num_tiles = row_tiles(jnp.asarray(sizes, jnp.int32), m=m, block_m=block_m, with_padding=True)
    tiles = np.asarray(tiles)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    owner = np.zeros(m, int)
    for group, load_from, row, count in tiles[: int(num_tiles)]:
        assert count > 0 and load_from % 8 == 0
        assert load_from <= row and row + count <= load_from + block_m <= padded_rows(m, block_m)
        if group < len(sizes):
            assert starts[group] <= row and row + count <= starts[group + 1]
        else:
            assert row >= starts[-1]  # padding
        owner[row : row + count] += 1
    assert (owner == 1).all()
    assert (tiles[int(num_tiles) :, TileColumn.COUNT] == 0).all()
    assert not set(tiles[: int(num_tiles), TileColumn.GROUP]) & {0, 3, 6, 7}  # empty groups: no tile


# ----------------------------------------------------------------------------------------------
# The Mosaic GPU kernel in the simulator


# bf16 in, fp32 accumulation, one bf16 rounding of the output: ~3e-3 relative; a wrong row, group
# or column block is O(1).
BF16_TOL = 1e-2
DECODE_PLAN = Plan(block_m=64, block_n=64, block_k=64, num_stages=2)
PREFILL_PLAN = Plan(block_m=128, block_n=128, block_k=64, num_stages=3)


def check_simulated(simulator, case: Case, *, plan=None, with_bias=False, activation=None) -> None:
    lhs, rhs, group_sizes, bias = make_inputs(case, with_bias=with_bias)
    simulator.reset()
    out = grouped_matmul_mosaic(
        lhs, rhs, group_sizes, bias=bias, activation=activation, plan=plan, interpret=simulator.params()
    )
    out = jax.block_until_ready(out)
    check_against_reference(out, lhs, rhs, group_sizes, bias, activation, tol=BF16_TOL)
    assert not simulator.races_found()


@pytest.mark.parametrize("mix", list(MIXES))
def test_simulated_kernel_matches_reference(simulator, mix):
    check_simulated(simulator, MIXES[mix], plan=DECODE_PLAN)


def test_simulated_many_rows_prefill_plan(simulator):
    check_simulated(simulator, MANY_ROWS, plan=dataclasses.replace(PREFILL_PLAN, block_n=64))


@pytest.mark.parametrize("activation", [None, SWIGLU, OAI_SPLIT], ids=activation_id)
def test_simulated_bias_and_activation(simulator, activation):
    check_simulated(simulator, MIXES["empty_groups_and_padding"], plan=DECODE_PLAN, with_bias=True,
                    activation=activation)


def test_simulated_prefill_plan_with_activation(simulator):
    case = Case((70, 0, 90, 33), m=200, k=128, n=256)
    check_simulated(simulator, case, plan=PREFILL_PLAN, activation=SWIGLU)


# ----------------------------------------------------------------------------------------------
# CUDA lowering at real shapes (no GPU needed)

# (rows, K, N, experts, activation, bias)
LOWERING_SHAPES = {
    "qwen3_decode_gate_up": (64, 2048, 1536, 128, SWIGLU, False),
    "qwen3_decode_down": (64, 768, 2048, 128, None, False),
    "qwen3_prefill_gate_up": (32768, 2048, 1536, 128, SWIGLU, False),
    "qwen3_prefill_down": (32768, 768, 2048, 128, None, False),
    "gpt_oss_decode_gate_up": (32, 2880, 5760, 32, OAI_SPLIT, True),
    "mixtral_prefill_gate_up": (8192, 4096, 28672, 8, SWIGLU, False),
}


@pytest.mark.parametrize("name", list(LOWERING_SHAPES))
def test_kernel_lowers_for_cuda(name):
    m, k, n, num_groups, activation, with_bias = LOWERING_SHAPES[name]
    shape = jax.ShapeDtypeStruct
    args = [shape((m, k), jnp.bfloat16), shape((num_groups, k, n), jnp.bfloat16), shape((num_groups,), jnp.int32)]
    if with_bias:
        args.append(shape((num_groups, n), jnp.bfloat16))

    def run(lhs, rhs, group_sizes, *bias):
        return grouped_matmul_mosaic(lhs, rhs, group_sizes, bias=bias[0] if bias else None, activation=activation)

    text = jax.jit(run).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_default_plans():
    decode = default_plan(m=64 * 8, k=2048, n=1536, num_groups=128, activation=SWIGLU)
    prefill = default_plan(m=16384 * 8, k=2048, n=1536, num_groups=128, activation=SWIGLU)
    assert decode.block_m == 64 and prefill.block_m == 128
    for plan, blocks in ((decode, 2), (prefill, 2)):
        assert 2 * plan.smem_bytes(2, blocks) <= 227 * 1024  # two CTAs per SM


def test_unsupported_reasons():
    ok = dict(dtype=jnp.bfloat16, m=64, k=2048, n=1536, num_groups=128, activation=SWIGLU)
    assert mosaic_unsupported_reason(**ok) is None
    assert "dtype" in mosaic_unsupported_reason(**{**ok, "dtype": jnp.float32})
    assert "K=" in mosaic_unsupported_reason(**{**ok, "k": 2000})
    assert "interleaved" in mosaic_unsupported_reason(**{**ok, "activation": SWIGLU_INTERLEAVED})
    assert "output columns" in mosaic_unsupported_reason(**{**ok, "n": 1600})
    with pytest.raises(NotImplementedError, match="interleaved"):
        lhs, rhs, group_sizes, _ = make_inputs(MIXES["one_row"])
        grouped_matmul_mosaic(lhs, rhs, group_sizes, activation=SWIGLU_INTERLEAVED)
