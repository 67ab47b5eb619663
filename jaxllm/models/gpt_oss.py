"""gpt-oss (`GptOssForCausalLM`): attention with q/k/v/o biases and a learned sink per head,
alternating sliding-window (128) and full layers, YaRN, and in every layer an MoE whose router has a
bias, picking top-4 of 32 experts (softmax over the chosen logits), each expert a clamped SwiGLU
with biases on both projections.

HF keeps the experts fused: `mlp.experts.gate_up_proj` [E, H, 2I] (in -> out, gate and up columns
interleaved), `gate_up_proj_bias` [E, 2I], `down_proj` [E, I, H], `down_proj_bias` [E, H]. Gate/up
load de-interleaved into [E, H, 2, I] (the grouped GEMM's split layout, which tensor parallelism
splits along I).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.model_arch import ModelArch
from jaxllm.models.batch import ForwardBatch
from jaxllm.models.layers import CausalLM, DecoderLayer, FusedFrom, Kernels, Linear, Part, param
from jaxllm.models.moe import route
from pallas_kernels.grouped_matmul import Activation


class GptOssExperts(nnx.Module):
    def __init__(self, arch: ModelArch, dtype):
        e, h, i = arch.moe.num_experts, arch.hidden_size, arch.moe.intermediate_size
        deinterleave = lambda name, shape, perm: FusedFrom((  # noqa: E731
            Part(f"experts.{name}", (*shape[:-1], 2 * i), (*shape[:-1], i, 2), (0,) * (len(shape) + 1), perm),))
        self.gate_up_proj = param((e, h, 2, i), ("experts", "embed", None, "expert_mlp"), dtype,
                                  fused_from=deinterleave("gate_up_proj", (e, h, 2 * i), (0, 1, 3, 2)))
        self.gate_up_proj_bias = param((e, 2, i), ("experts", None, "expert_mlp"), dtype,
                                       fused_from=deinterleave("gate_up_proj_bias", (e, 2 * i), (0, 2, 1)))
        self.down_proj = param((e, i, h), ("experts", "expert_mlp", "embed"), dtype)
        self.down_proj_bias = param((e, h), ("experts", "embed"), dtype)


class GptOssMLP(nnx.Module):
    def __init__(self, arch: ModelArch, dtype):
        self.router = Linear(arch.hidden_size, arch.moe.num_experts, (None, "embed"), dtype, bias=True)
        self.experts = GptOssExperts(arch, dtype)
        self.top_k = arch.moe.top_k
        self.activation = Activation("swiglu_oai", "split", limit=arch.moe.swiglu_limit)

    def __call__(self, x: jax.Array, batch: ForwardBatch, kernels: Kernels) -> jax.Array:
        logits = jnp.einsum("th,eh->te", x, self.router.weight[...], preferred_element_type=jnp.float32)
        weights, ids = route(logits + self.router.bias[...].astype(jnp.float32), self.top_k, renormalize=True)
        e = self.experts
        y = kernels.experts(x, ids, weights, batch.num_real_tokens(), e.gate_up_proj[...],
                            e.down_proj[...], e.gate_up_proj_bias[...], activation=self.activation)  # [T, H]
        # down's bias outside the experts' partial sums (added once, not once per device).
        down_bias = jnp.einsum("tk,tkh->th", weights, e.down_proj_bias[...][ids].astype(jnp.float32))
        return y + down_bias.astype(y.dtype)


def abstract_model(arch: ModelArch, dtype, fuse_qkv: bool = True) -> CausalLM:
    """The model with ShapeDtypeStruct leaves (see llama.abstract_model)."""
    return nnx.eval_shape(lambda: CausalLM(arch, dtype, lambda i: DecoderLayer(
        arch, i, dtype, fuse_qkv, GptOssMLP(arch, dtype))))
