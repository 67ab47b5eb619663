"""The int4 matmul on XLA: dequantize to x's dtype, then XLA's dot (cuBLAS on a GPU). What CPUs and
the tests run, and the prefill-sized alternative to the Mosaic kernel's in-kernel dequantization.
Exact against the reference (the same dequantized weights, float32 accumulation)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.int4_matmul.common import Int4Weights, permute_input, validate_inputs


def int4_matmul_xla(x: jax.Array, w: Int4Weights) -> jax.Array:  # x [M, K] -> [M, N]
    validate_inputs(x, w)
    y = jnp.dot(permute_input(x, w), w.dequantize(x.dtype), preferred_element_type=jnp.float32)  # [M, N]
    return y.astype(x.dtype)
