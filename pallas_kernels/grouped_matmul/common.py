"""The contract every grouped matmul implementation shares.

    lhs          [M, K]     rows sorted by group: group e owns rows
                            [sum(group_sizes[:e]), sum(group_sizes[:e + 1])); rows past
                            sum(group_sizes) are padding (any content; their output rows are zero)
    rhs          [E, K, N]  one weight matrix per group (in -> out), dense or packed MXFP4
                            (`mxfp4.Mxfp4Weights`, the same [E, K, N] in 4-bit codes and scales)
    group_sizes  [E] i32    sum <= M; any group may be empty
    bias         [E, N]     optional, added before the activation
    activation   optional `Activation`: SwiGLU on the gate/up halves of the N columns

    out          [M, N] (no activation) or [M, N / 2], in lhs's dtype; float32 accumulation.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul.mxfp4 import Mxfp4Weights

Rhs = jax.Array | Mxfp4Weights  # [E, K, N]

@dataclasses.dataclass(frozen=True)
class Activation:
    """A gated activation fused after the matmul (and bias): out = act(gate) * up, N -> N / 2.

    kind "swiglu": silu(gate) * up. kind "swiglu_oai" (gpt-oss): gate = min(gate, limit),
    up = clip(up, -limit, limit), out = (up + 1) * gate * sigmoid(alpha * gate).
    layout "split": gate = columns [0, N/2), up = [N/2, N); "interleaved": gate = even
    columns, up = odd columns.
    """

    kind: Literal["swiglu", "swiglu_oai"]
    layout: Literal["split", "interleaved"] = "split"
    alpha: float = 1.702  # swiglu_oai only
    limit: float = 7.0  # swiglu_oai only

    def __post_init__(self):
        if self.kind not in ("swiglu", "swiglu_oai"):
            raise ValueError(f"unknown activation kind {self.kind!r}")
        if self.layout not in ("split", "interleaved"):
            raise ValueError(f"unknown gate/up layout {self.layout!r}")

    def gate_up(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[..., N] -> (gate, up), each [..., N / 2]."""
        half = y.shape[-1] // 2
        if self.layout == "split":
            return y[..., :half], y[..., half:]
        return y[..., 0::2], y[..., 1::2]

    def combine(self, gate: jax.Array, up: jax.Array) -> jax.Array:
        """The activation of float32 gate and up halves (same shape)."""
        if self.kind == "swiglu":
            return gate * _sigmoid(gate) * up
        gate = jnp.minimum(gate, self.limit)
        up = jnp.clip(up, -self.limit, self.limit)
        return (up + 1.0) * gate * _sigmoid(self.alpha * gate)

    def __call__(self, y: jax.Array) -> jax.Array:
        """[..., N] float32 -> [..., N / 2]."""
        return self.combine(*self.gate_up(y))


def _sigmoid(x: jax.Array) -> jax.Array:
    # NOTE: spelled out rather than jax.nn.sigmoid (lax.logistic), which Mosaic GPU does not lower.
    return 1.0 / (1.0 + jnp.exp(-x))


def interleaved_to_split(rhs: jax.Array, bias: jax.Array | None = None):
    """rhs [E, K, N] (and bias [E, N]) with interleaved gate/up columns -> the split layout.

    For models stored interleaved (gpt-oss): permute once at load time, then call with
    `Activation(kind, layout="split")`; the product is the same.
    """
    order = jnp.concatenate([jnp.arange(0, rhs.shape[-1], 2), jnp.arange(1, rhs.shape[-1], 2)])
    return rhs[..., order], None if bias is None else bias[..., order]


def output_columns(n: int, activation: Activation | None) -> int:
    return n if activation is None else n // 2


def validate_inputs(lhs, rhs, group_sizes, bias, activation) -> None:
    """Shape and dtype checks shared by every implementation (static, so free under jit)."""
    if lhs.ndim != 2:
        raise ValueError(f"lhs must be [M, K], got shape {lhs.shape}")
    if isinstance(rhs, Mxfp4Weights):
        rhs.validate()
    elif rhs.ndim != 3:
        raise ValueError(f"rhs must be [E, K, N], got shape {rhs.shape}")
    num_groups, k, n = rhs.shape
    if lhs.shape[1] != k:
        raise ValueError(f"K of lhs ({lhs.shape[1]}) and rhs ({k}) differ")
    if group_sizes.shape != (num_groups,) or group_sizes.dtype != jnp.int32:
        raise ValueError(f"group_sizes must be int32 [E]={num_groups}, got {group_sizes.dtype}{group_sizes.shape}")
    if bias is not None and bias.shape != (num_groups, n):
        raise ValueError(f"bias must be [E, N]=({num_groups}, {n}), got {bias.shape}")
    if activation is not None and n % 2:
        raise ValueError(f"an activation needs an even N (gate and up halves), got {n}")


def group_starts(group_sizes: jax.Array) -> jax.Array:
    """[E + 1] i32: group e owns rows [starts[e], starts[e + 1])."""
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(group_sizes, dtype=jnp.int32)])


class TileColumn:
    """The columns of `row_tiles`' rows, one row per tile of <= block_m rows of one group."""

    GROUP = 0  # the group; num_groups for the padding rows past sum(group_sizes)
    LOAD_FROM = 1  # first row of the block_m-row window the tile reads (a multiple of 8, <= ROW)
    ROW = 2  # first row it owns
    COUNT = 3  # rows it owns, [ROW, ROW + COUNT) inside the window (0: a row past the last tile)


def padded_rows(m: int, block_m: int) -> int:
    """Rows lhs is padded to so that every tile's window can be read: a multiple of 8, >= block_m."""
    return max(-(-m // 8) * 8, block_m)


def max_row_tiles(m: int, num_groups: int, block_m: int) -> int:
    """An upper bound of `row_tiles`' count: each of the at most min(E, M) non-empty groups and
    the padding rows span their rows plus < 8 rows of window alignment, and add one partial tile."""
    segments = min(num_groups, m) + 1
    return (m + 7 * segments) // block_m + segments + 1


def row_tiles(group_sizes: jax.Array, *, m: int, block_m: int, with_padding: bool) -> tuple[jax.Array, jax.Array]:
    """(tiles [max_row_tiles, 4] i32 with columns `TileColumn`, number of real tiles [] i32).

    Every non-empty group is cut into tiles of <= block_m consecutive rows; empty groups get no
    tile. With `with_padding`, the rows past sum(group_sizes) get tiles of group E too. Tiles past
    the real ones have COUNT 0. A group's tiles read the windows [w, w + block_m) from w = its
    first row rounded down to 8, in steps of block_m (TMA loads of lhs start on a multiple of 8
    rows), each owning the group's rows inside its window; windows are moved back to lie inside
    `padded_rows(m, block_m)` rows.
    """
    num_groups = group_sizes.shape[0]
    starts = group_starts(group_sizes)  # [E + 1]
    total = starts[-1]
    seg_start = starts if with_padding else starts[:-1]  # [S]
    seg_len = jnp.concatenate([group_sizes, (m - total)[None]]) if with_padding else group_sizes
    seg_len = jnp.maximum(seg_len, 0)
    seg_window = seg_start // 8 * 8  # the first tile's window
    tiles = jnp.where(seg_len > 0, (seg_start + seg_len - seg_window + block_m - 1) // block_m, 0)  # [S]
    tile_end = jnp.cumsum(tiles)
    w = jnp.arange(max_row_tiles(m, num_groups, block_m), dtype=jnp.int32)
    # NOTE: compare_all, one fused compare-and-count; the default binary search is a while loop
    # of tiny kernels on a GPU.
    seg = jnp.searchsorted(tile_end, w, side="right", method="compare_all").astype(jnp.int32)
    seg = jnp.minimum(seg, seg_start.shape[0] - 1)
    local = w - (tile_end[seg] - tiles[seg])
    active = w < tile_end[-1]
    window = seg_window[seg] + local * block_m
    row = jnp.maximum(window, seg_start[seg])
    count = jnp.where(active, jnp.minimum(window + block_m, seg_start[seg] + seg_len[seg]) - row, 0)
    load_from = jnp.clip(window, 0, padded_rows(m, block_m) - block_m)
    columns = [seg, load_from, row, count]
    return jnp.stack([c.astype(jnp.int32) for c in columns], axis=1), tile_end[-1].astype(jnp.int32)
