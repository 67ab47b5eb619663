"""The Llama family: Llama 2/3/3.x, Mistral, Qwen2/2.5 (q/k/v bias), Qwen3 (q/k norm).

HF tensors map onto the parameters by name (`model.layers.3.self_attn.o_proj.weight`), except the
two fused projections, assembled at load from their HF parts: `self_attn.qkv_proj` from
q_proj/k_proj/v_proj and `mlp.gate_up_proj` from gate_proj/up_proj (`layers.FusedFrom`).
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxllm.model_arch import ModelArch
from jaxllm.models.batch import ForwardBatch
from jaxllm.models.layers import CausalLM, GatedMLP, Kernels, PagedAttention, RMSNorm


class DecoderLayer(nnx.Module):
    def __init__(self, arch: ModelArch, layer: int, dtype, fuse_qkv: bool):
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.norm_eps, dtype)
        self.self_attn = PagedAttention(arch, layer, dtype, fuse_qkv)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.norm_eps, dtype)
        self.mlp = GatedMLP(arch, dtype)

    def __call__(self, x: jax.Array, kv_pages: jax.Array, batch: ForwardBatch, kernels: Kernels):
        attn_out, kv_pages = self.self_attn(self.input_layernorm(x), kv_pages, batch, kernels)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv_pages


def abstract_model(arch: ModelArch, dtype, fuse_qkv: bool = True) -> CausalLM:
    """The model with ShapeDtypeStruct leaves: structure, shapes and sharding axes, no memory.
    fuse_qkv=False keeps q/k/v apart (for KV heads replicated over tp, where q alone is sharded)."""
    return nnx.eval_shape(lambda: CausalLM(arch, dtype, lambda i: DecoderLayer(arch, i, dtype, fuse_qkv)))
