"""The mixture-of-experts MLP: a router, a top-k choice, and one gated MLP per expert applied to
the tokens routed to it through a grouped GEMM.

Dispatch sorts the (token, expert) pairs into expert-contiguous rows with per-expert group sizes,
runs gate/up (SwiGLU fused) and down as two grouped GEMMs, and combines each token's k rows with
its routing weights. No capacity factor and nothing dropped: every token reaches its k experts.
Padding tokens of the step's bucket and experts held by other devices (expert parallelism) are
sorted past the last group, so they cost no expert's weights.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.model_arch import ModelArch
from jaxllm.models.batch import ForwardBatch
from jaxllm.models.layers import FusedFrom, Kernels, Linear, Part, param
from pallas_kernels.grouped_matmul import Activation

# (lhs [M, K], rhs [E, K, N], group_sizes [E] i32, *, activation) -> [M, N or N / 2]; pallas_kernels.grouped_matmul.
GroupedMatmul = Callable[..., jax.Array]
# (x [T, H], expert_ids [T, k] i32, expert_weights [T, k] f32, num_tokens [] i32, gate_up [E, H, 2, I],
#  down [E, I, H], gate_up_bias [E, 2, I] | None, *, activation) -> [T, H]: the runner's, sharded over the
#  mesh (runner/experts.py).
ExpertsFn = Callable[..., jax.Array]

SWIGLU = Activation("swiglu", "split")


class ExpertWeights(nnx.Module):
    """Every expert's gate/up [E, H, 2, I] and down [E, I, H] (in -> out, as the grouped GEMM takes
    them), assembled at load from HF's per-expert tensors `experts.{e}.{gate,up,down}.weight`."""

    def __init__(self, arch: ModelArch, dtype, names: tuple[str, str, str]):
        moe = arch.moe
        e, h, i = moe.num_experts, arch.hidden_size, moe.intermediate_size
        gate, up, down = names
        # HF [out, in] per expert, transposed into place.
        gate_up = [Part(f"experts.{x}.{name}.weight", (i, h), (1, 1, i, h), (x, 0, half, 0), perm=(0, 3, 1, 2))
                   for x in range(e) for half, name in ((0, gate), (1, up))]
        downs = [Part(f"experts.{x}.{down}.weight", (h, i), (1, h, i), (x, 0, 0), perm=(0, 2, 1)) for x in range(e)]
        self.gate_up_proj = param((e, h, 2, i), ("experts", "embed", None, "expert_mlp"), dtype,
                                  fused_from=FusedFrom(tuple(gate_up)))
        self.down_proj = param((e, i, h), ("experts", "expert_mlp", "embed"), dtype, fused_from=FusedFrom(tuple(downs)))


def route(logits: jax.Array, top_k: int, renormalize: bool) -> tuple[jax.Array, jax.Array]:
    """Router logits [T, E] -> (weights [T, k] f32, expert ids [T, k] i32): softmax over all experts,
    the k largest, rescaled to sum to 1 if `renormalize` (then equal to a softmax over the k logits)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, ids.astype(jnp.int32)


class SparseMoE(nnx.Module):
    """Router (`gate`, [E, H]) and experts; HF's names for the experts' projections in `names`."""

    def __init__(self, arch: ModelArch, dtype, names: tuple[str, str, str]):
        self.gate = Linear(arch.hidden_size, arch.moe.num_experts, (None, "embed"), dtype)
        self.experts = ExpertWeights(arch, dtype, names)
        self.top_k, self.renormalize = arch.moe.top_k, arch.moe.renormalize

    def __call__(self, x: jax.Array, batch: ForwardBatch, kernels: Kernels) -> jax.Array:
        """x [T, H] -> [T, H]."""
        logits = jnp.einsum("th,eh->te", x, self.gate.weight[...], preferred_element_type=jnp.float32)  # [T, E]
        weights, ids = route(logits, self.top_k, self.renormalize)
        return kernels.experts(x, ids, weights, batch.num_real_tokens(), self.experts.gate_up_proj[...],
                               self.experts.down_proj[...])


def moe_experts(x: jax.Array, expert_ids: jax.Array, expert_weights: jax.Array, num_tokens: jax.Array,
                gate_up: jax.Array, down: jax.Array, gate_up_bias: jax.Array | None = None, *, gmm: GroupedMatmul,
                first_expert: jax.Array | int = 0, activation: Activation = SWIGLU) -> jax.Array:
    """The experts held here applied to the tokens routed to them, weighted: [T, H] in x's dtype.

    x [T, H]; expert_ids, expert_weights [T, k]; gate_up [E_here, H, 2, I_here] (gate_up_bias
    [E_here, 2, I_here]); down [E_here, I_here, H]: experts first_expert .. first_expert + E_here - 1,
    each with its I_here columns (under tensor parallelism a partial sum, added over the devices by
    the caller; so a bias of down is the caller's too).
    """
    num_experts, hidden, _, inter = gate_up.shape
    t, k = expert_ids.shape
    local = expert_ids - first_expert  # [T, k]
    real = (jnp.arange(t) < num_tokens)[:, None] & (local >= 0) & (local < num_experts)  # [T, k]
    key = jnp.where(real, local, num_experts).reshape(-1)  # [T * k]; past the last group: skipped
    order = jnp.argsort(key, stable=True).astype(jnp.int32)  # [T * k] pair order, expert-contiguous
    group_sizes = jnp.bincount(key, length=num_experts + 1)[:num_experts].astype(jnp.int32)  # [E_here]
    rows = x[order // k]  # [T * k, H]
    bias = None if gate_up_bias is None else gate_up_bias.reshape(num_experts, 2 * inter)
    h = gmm(rows, gate_up.reshape(num_experts, hidden, 2 * inter), group_sizes, bias=bias,
            activation=activation)  # [T * k, I]
    y = gmm(h, down, group_sizes)  # [T * k, H]; rows past the groups are zero
    back = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=jnp.int32))  # pair -> its row
    y = y[back].reshape(t, k, hidden).astype(jnp.float32)  # [T, k, H]
    weights = jnp.where(real, expert_weights, 0.0)  # [T, k]
    return jnp.einsum("tkh,tk->th", y, weights).astype(x.dtype)
