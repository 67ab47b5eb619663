"""Grouped matmul on XLA: what CPUs (and the tests) run, and the GPU fallback.

Two exact forms:
  - small problems: `jax.lax.ragged_dot`. XLA lowers it on CPU and on CUDA (jaxlib 0.10-0.11)
    by masking lhs into a dense [M, E * K] operand and running one dense dot: correct, but E times
    the FLOPs and an [M, E, K] temporary, so only where that temporary is small;
  - larger ones: a loop over row tiles of one group each (`common.row_tiles`): one [block_m, K]
    x [K, N] dot per tile, memory O(block_m * N), and empty groups cost nothing. The loop runs
    only over the real tiles (a while loop).

MXFP4 weights (`Mxfp4Weights`): where the problem has fewer row tiles than experts (decode), the
tile loop dequantizes only each tile's expert, so untouched experts cost nothing; otherwise every
expert is dequantized once to lhs's dtype and the dense forms above run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.grouped_matmul.common import (
    Activation,
    Rhs,
    TileColumn,
    group_starts,
    max_row_tiles,
    output_columns,
    padded_rows,
    row_tiles,
    validate_inputs,
)
from pallas_kernels.grouped_matmul.mxfp4 import Mxfp4Weights, dequantize_kernel_layout

# Largest masked operand (M * E * K elements) for which ragged_dot is used.
DENSE_LIMIT = 1 << 24
_TILE_ROWS = 64
_COLUMNS = (TileColumn.GROUP, TileColumn.LOAD_FROM, TileColumn.ROW, TileColumn.COUNT)


def grouped_matmul_xla(
    lhs: jax.Array,  # [M, K]
    rhs: Rhs,  # [E, K, N], dense or MXFP4
    group_sizes: jax.Array,  # [E] i32
    *,
    bias: jax.Array | None = None,  # [E, N]
    activation: Activation | None = None,
    dense_limit: int = DENSE_LIMIT,
) -> jax.Array:  # [M, N] or [M, N / 2]
    """Same contract as `grouped_matmul_reference`; `dense_limit` picks the form (see above)."""
    validate_inputs(lhs, rhs, group_sizes, bias, activation)
    m, k = lhs.shape
    num_groups, _, n = rhs.shape
    if isinstance(rhs, Mxfp4Weights):
        if dequantizes_per_tile(m, num_groups):

            def expert_weights(group):  # [K, N] in lhs's dtype
                return dequantize_kernel_layout(rhs.blocks[group], rhs.scales[group], lhs.dtype)

            return _tile_loop(lhs, expert_weights, n, group_sizes, bias, activation)
        rhs = rhs.dequantize(lhs.dtype)  # [E, K, N]
    if m * num_groups * k <= dense_limit:
        return _ragged_dot(lhs, rhs, group_sizes, bias, activation)
    return _tile_loop(lhs, lambda group: rhs[group], n, group_sizes, bias, activation)


def dequantizes_per_tile(m: int, num_groups: int) -> bool:
    """Whether MXFP4 weights are dequantized tile by tile (fewer row tiles than experts), not all at once."""
    return max_row_tiles(m, num_groups, _TILE_ROWS) < num_groups


def _ragged_dot(lhs, rhs, group_sizes, bias, activation):
    y = lax.ragged_dot(
        lhs, rhs, group_sizes, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32
    )  # [M, N]; rows past sum(group_sizes) are zero
    m = lhs.shape[0]
    num_groups = rhs.shape[0]
    starts = group_starts(group_sizes)  # [E + 1]
    rows = jnp.arange(m, dtype=jnp.int32)
    real = rows < starts[-1]  # [M]
    if bias is not None:
        # NOTE: the group of each row by comparing with every group end: one fused op, no loop.
        group = jnp.searchsorted(starts[1:], rows, side="right", method="compare_all")
        y = y + bias.astype(jnp.float32)[jnp.minimum(group, num_groups - 1)]
    if activation is not None:
        y = activation(y)
    return jnp.where(real[:, None], y, 0.0).astype(lhs.dtype)


def _tile_loop(lhs, expert_weights, n, group_sizes, bias, activation):
    """expert_weights(group [] i32) -> that group's [K, N]."""
    m, k = lhs.shape
    block_m = _TILE_ROWS
    padded_m = padded_rows(m, block_m)
    lhs = jnp.pad(lhs, ((0, padded_m - m), (0, 0)))  # [padded_m, K]: every tile's window inside
    tiles, num_tiles = row_tiles(group_sizes, m=m, block_m=block_m, with_padding=False)
    out_n = output_columns(n, activation)
    local_rows = jnp.arange(block_m, dtype=jnp.int32)

    def tile(i, out):  # out [M, out_n] f32
        group, load_from, row, count = (tiles[i, c] for c in _COLUMNS)
        x = lax.dynamic_slice(lhs, (load_from, 0), (block_m, k))  # [block_m, K]
        y = jnp.dot(x, expert_weights(group), preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)
        if bias is not None:
            y = y + bias[group].astype(jnp.float32)
        if activation is not None:
            y = activation(y)  # [block_m, out_n]
        shift = row - load_from
        mine = (local_rows >= shift) & (local_rows < shift + count)
        current = lax.dynamic_slice(out, (load_from, 0), (block_m, out_n))
        return lax.dynamic_update_slice(out, jnp.where(mine[:, None], y, current), (load_from, 0))

    out = lax.fori_loop(0, num_tiles, tile, jnp.zeros((padded_m, out_n), jnp.float32))
    return out[:m].astype(lhs.dtype)
