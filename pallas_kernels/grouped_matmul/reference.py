"""Grouped matmul in plain jnp, one dense matmul per group: the test oracle (clear, slow)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.grouped_matmul.common import Activation, Rhs, group_starts, validate_inputs
from pallas_kernels.grouped_matmul.mxfp4 import Mxfp4Weights


def grouped_matmul_reference(
    lhs: jax.Array,  # [M, K]
    rhs: Rhs,  # [E, K, N], dense or MXFP4
    group_sizes: jax.Array,  # [E] i32
    *,
    bias: jax.Array | None = None,  # [E, N]
    activation: Activation | None = None,
) -> jax.Array:  # [M, N] or [M, N / 2]
    """out[r] = act(lhs[r] @ rhs[e] + bias[e]) for the rows r of group e; zero for padding rows.
    MXFP4 weights are dequantized to lhs's dtype first (exact in bf16 and f32: an
    MXFP4 value has 2 significant bits within f32's exponent range)."""
    validate_inputs(lhs, rhs, group_sizes, bias, activation)
    if isinstance(rhs, Mxfp4Weights):
        rhs = rhs.dequantize(lhs.dtype)  # [E, K, N]
    m = lhs.shape[0]
    num_groups, _, n = rhs.shape
    starts = group_starts(group_sizes)  # [E + 1]
    rows = jnp.arange(m, dtype=jnp.int32)
    out = None
    for e in range(num_groups):
        y = jnp.dot(lhs, rhs[e], preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)  # [M, N]
        if bias is not None:
            y = y + bias[e].astype(jnp.float32)
        if activation is not None:
            y = activation(y)
        mine = (rows >= starts[e]) & (rows < starts[e + 1])  # [M]
        out = jnp.where(mine[:, None], y, 0.0 if out is None else out)
    if out is None:
        out = jnp.zeros((m, n if activation is None else n // 2), jnp.float32)
    return out.astype(lhs.dtype)
