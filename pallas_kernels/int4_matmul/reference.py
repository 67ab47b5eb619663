"""The int4 matmul in plain jnp: dequantize, then one float32 matmul (the test oracle)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.int4_matmul.common import Int4Weights, permute_input, validate_inputs


def int4_matmul_reference(x: jax.Array, w: Int4Weights) -> jax.Array:  # x [M, K] -> [M, N]
    """x[:, perm] @ w.dequantize(x.dtype), accumulated in float32 at full precision."""
    validate_inputs(x, w)
    y = jnp.dot(
        permute_input(x, w), w.dequantize(x.dtype), preferred_element_type=jnp.float32,
        precision=lax.Precision.HIGHEST,
    )  # [M, N]
    return y.astype(x.dtype)
