"""The FP8 matmul's test oracle: fake quantization in float32 (quantize the activations, dequantize
both operands, one float32 dot at full precision)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.fp8_matmul.common import Fp8Weights, quantize_activations


def fp8_matmul_reference(x: jax.Array, w: Fp8Weights) -> jax.Array:  # x [M, K] -> [M, *N]
    w.validate(x)
    (m, k), n_shape, groups = x.shape, w.values.shape[:-1], w.groups
    xq, xs = quantize_activations(x, w.input_scale, groups)  # [M, K], [M, Kg]
    x_float = (xq.astype(jnp.float32).reshape(m, groups, -1) * xs[..., None]).reshape(m, k)
    w_float = (w.values.astype(jnp.float32).reshape(-1, groups, k // groups)
               * w.scales.reshape(-1, groups)[..., None]).reshape(-1, k)  # [N, K]
    y = jnp.dot(x_float, w_float.T, precision=jax.lax.Precision.HIGHEST)  # [M, N]
    return y.reshape(m, *n_shape).astype(x.dtype)
