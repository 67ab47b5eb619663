"""The contract every FP8 matmul implementation shares.

    x    [M, K]  bf16 (or f32)
    w    `Fp8Weights` standing for a float [*N, K] (out <- in, nn.Linear's layout: K minor in both
         operands, the layout cuBLASLt's FP8 GEMM takes on Hopper without a transpose)
    out  [M, *N] in x's dtype, float32 accumulation

`Fp8Weights`:
    values       e4m3 [*N, K]
    scales       f32 [*N, Kg]     Kg = 1: one scale per output feature (a per-tensor scale repeated);
                                  Kg = K / 128: one per 128 inputs (128 x 128 blocks, repeated per row)
    input_scale  f32 [] | None    static activations: x / input_scale; None: dynamic, one scale per
                                  token (and per 128 inputs where Kg > 1), amax / 448
and w[n, k] = values[n, k] * scales[n, k // (K / Kg)]. Activations are quantized the same way in
every path (`quantize_activations`), so the paths differ only in where the scales are applied.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

E4M3_MAX = 448.0
# vLLM's floor on a dynamic scale: a row of zeros quantizes to zeros instead of dividing by zero.
MIN_DYNAMIC_SCALE = 1.0 / (E4M3_MAX * 512.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Weights:
    values: jax.Array  # e4m3 [*N, K]
    scales: jax.Array  # f32 [*N, Kg]
    input_scale: jax.Array | None  # f32 [], or None (dynamic)

    @property
    def groups(self) -> int:
        """Kg: scales along K."""
        return self.scales.shape[-1]

    def validate(self, x: jax.Array) -> None:
        k = self.values.shape[-1]
        if jnp.dtype(self.values.dtype) != jnp.dtype(jnp.float8_e4m3fn):
            raise ValueError(f"Fp8Weights.values must be float8_e4m3fn, got {self.values.dtype}")
        if x.ndim != 2 or x.shape[1] != k:
            raise ValueError(f"x {x.shape} is not [M, K={k}]")
        if tuple(self.scales.shape[:-1]) != tuple(self.values.shape[:-1]) or k % self.groups:
            raise ValueError(f"scales {self.scales.shape} are not [*N, Kg] for values {self.values.shape}")


def quantize_e4m3(x: jax.Array, scale: jax.Array) -> jax.Array:
    """x / scale, saturated to e4m3's range, rounded to e4m3 (computed in float32)."""
    return jnp.clip(x.astype(jnp.float32) / scale, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)


def quantize_activations(x: jax.Array, input_scale: jax.Array | None, groups: int) -> tuple[jax.Array, jax.Array]:
    """x [M, K] -> (e4m3 [M, K], f32 scales [M, groups]): the static `input_scale` for every token, or
    each token's (and each K / groups inputs') amax / 448."""
    m, k = x.shape
    xg = x.astype(jnp.float32).reshape(m, groups, k // groups)  # [M, Kg, K / Kg]
    if input_scale is None:
        scales = jnp.maximum(jnp.max(jnp.abs(xg), axis=-1) / E4M3_MAX, MIN_DYNAMIC_SCALE)  # [M, Kg]
    else:
        scales = jnp.broadcast_to(input_scale.astype(jnp.float32), (m, groups))
    return quantize_e4m3(xg, scales[..., None]).reshape(m, k), scales
