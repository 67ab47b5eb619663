"""The FP8 matmul on XLA's FP8 dot: `dot_general` on e4m3 operands (float32 accumulation), the scales
applied to its output. On Hopper XLA lowers the dot to cuBLASLt's FP8 GEMM; both operands contract
their minor dimension (x [M, K], w [*N, K]), the one layout that GEMM takes without a transpose. On
CPUs XLA upcasts the operands, so the path matches the reference to rounding.

Per-output-feature scales (Kg = 1): one dot, y * x_scale[m] * w_scale[n]; the dot's result is in x's
dtype, so a bf16 model's GEMM writes bf16 (no more bytes than its bf16 GEMM) and the scaling fuses
into what reads it. Block scales (Kg > 1): a dot batched over the Kg blocks of K ([Kg, M, *N] float32
partial sums), each scaled, then summed."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.fp8_matmul.common import Fp8Weights, quantize_activations


def fp8_matmul_xla(x: jax.Array, w: Fp8Weights) -> jax.Array:  # x [M, K] -> [M, *N]
    w.validate(x)
    (m, k), n_shape, groups = x.shape, w.values.shape[:-1], w.groups
    rank = len(n_shape)
    xq, xs = quantize_activations(x, w.input_scale, groups)  # [M, K] e4m3, [M, Kg]
    if groups == 1:
        y = jax.lax.dot_general(xq, w.values, (((1,), (rank,)), ((), ())), preferred_element_type=x.dtype)  # [M, *N]
        y = y.astype(jnp.float32) * xs.reshape(m, *(1,) * rank) * w.scales[..., 0]
    else:
        block = k // groups
        y = jax.lax.dot_general(xq.reshape(m, groups, block), w.values.reshape(*n_shape, groups, block),
                                (((2,), (rank + 1,)), ((1,), (rank,))),
                                preferred_element_type=jnp.float32)  # [Kg, M, *N]
        scales = xs.T.reshape(groups, m, *(1,) * rank) * jnp.moveaxis(w.scales, -1, 0)[:, None]  # [Kg, M, *N]
        y = jnp.sum(y * scales, axis=0)
    return y.astype(x.dtype)
