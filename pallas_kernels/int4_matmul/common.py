"""The contract every int4 matmul implementation shares, and the kernel's weight layout.

    x    [M, K]  bf16 (or f32 on the reference and XLA paths)
    w    `Int4Weights` standing for a float [K, N] (in -> out)
    out  [M, N]  in x's dtype; float32 accumulation: out = x[:, perm] @ dequantize(w)

`Int4Weights` (one Linear's weight, input features as rows):
    values      int4 [K, N]        signed codes t = q - 8 (q: the checkpoint's unsigned code)
    scales      [K / G, N]         one scale per group of G consecutive rows and per column
    zeros       [K / G, N] | None  the zero points in the signed domain, z - 8, in the scales'
                                   dtype (exact: integers in [-8, 8]); None: symmetric (z = 8)
    input_perm  int32 [K] | None   GPTQ desc_act: row r of values multiplies x[:, input_perm[r]]
    group_size  G (static)
and w[r, n] = (t[r, n] - zeros[r // G, n]) * scales[r // G, n], computed in float32 (exact: a
5-bit integer times the scale) and rounded once to the compute dtype. The scales are kept in the
compute dtype (bf16 for a bf16 model: an fp16 checkpoint scale is rounded to bf16 at load, as
vLLM's Marlin path does), so the kernel's bf16 arithmetic (t - zero, exact; times the scale, one
rounding) gives the same bf16 weights as the reference.

Tensor parallelism: column-parallel layers split N (values, scales and zeros along their last
axis); row-parallel layers split K along whole groups (values' rows by multiples of G, scales' and
zeros' rows by the matching groups). With an `input_perm` a row-parallel split would need x's
columns from other shards: such a layer needs x replicated.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

SIGNED_OFFSET = 8  # 4-bit codes q in [0, 15] are stored as t = q - 8 in [-8, 7]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int4Weights:
    values: jax.Array  # int4 [K, N]
    scales: jax.Array  # [K / G, N]
    zeros: jax.Array | None  # [K / G, N], z - 8, or None (symmetric)
    input_perm: jax.Array | None  # int32 [K], or None
    group_size: int = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int]:
        """(K, N), as the float weight it stands for."""
        return tuple(self.values.shape)

    def validate(self) -> None:
        k, n = self.shape
        if jnp.dtype(self.values.dtype) != jnp.dtype(jnp.int4):
            raise ValueError(f"Int4Weights.values must be int4, got {self.values.dtype}")
        if k % self.group_size:
            raise ValueError(f"K={k} is not a multiple of group_size {self.group_size}")
        groups = (k // self.group_size, n)
        if tuple(self.scales.shape) != groups:
            raise ValueError(f"scales {self.scales.shape} are not [K / G, N] = {groups}")
        if self.zeros is not None and (tuple(self.zeros.shape) != groups or self.zeros.dtype != self.scales.dtype):
            raise ValueError(f"zeros {self.zeros.dtype}{self.zeros.shape} are not {self.scales.dtype}{groups}")
        if self.input_perm is not None and tuple(self.input_perm.shape) != (k,):
            raise ValueError(f"input_perm {self.input_perm.shape} is not [K] = ({k},)")

    def dequantize(self, dtype=jnp.bfloat16) -> jax.Array:
        """[K, N] in `dtype`, rows in the kernel's order (`input_perm` not applied)."""
        scales = jnp.repeat(self.scales.astype(jnp.float32), self.group_size, axis=0)  # [K, N]
        centred = self.values.astype(jnp.float32)
        if self.zeros is not None:
            centred = centred - jnp.repeat(self.zeros.astype(jnp.float32), self.group_size, axis=0)
        return (centred * scales).astype(dtype)


def permute_input(x: jax.Array, w: Int4Weights) -> jax.Array:
    """x [M, K] with its columns in w's row order."""
    return x if w.input_perm is None else jnp.take(x, w.input_perm, axis=1)


def validate_inputs(x: jax.Array, w: Int4Weights) -> None:
    """Shape checks shared by every implementation (static, so free under jit)."""
    if x.ndim != 2:
        raise ValueError(f"x must be [M, K], got shape {x.shape}")
    w.validate()
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"K of x ({x.shape[1]}) and w ({w.shape[0]}) differ")
