"""GLM: GLM-4-9B-chat-hf (`GlmForCausalLM`) and the GLM-4-0414 series (`Glm4ForCausalLM`).

Llama's layout with three differences: RoPE over half of each head (`partial_rotary_factor` 0.5)
on interleaved pairs, q/k/v bias, and HF's `gate_up_proj` already fused ([2I, H], gate first).
GLM-4 adds a norm after the attention and one after the MLP, each before its residual add.
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxllm.model_arch import ModelArch
from jaxllm.models.batch import ForwardBatch
from jaxllm.models.layers import CausalLM, GatedMLP, Kernels, PagedAttention, RMSNorm


class GlmDecoderLayer(nnx.Module):
    def __init__(self, arch: ModelArch, layer: int, dtype, fuse_qkv: bool):
        h, eps = arch.hidden_size, arch.norm_eps
        self.input_layernorm = RMSNorm(h, eps, dtype)
        self.self_attn = PagedAttention(arch, layer, dtype, fuse_qkv)
        self.post_attention_layernorm = RMSNorm(h, eps, dtype)
        self.mlp = GatedMLP(arch, dtype, hf_fused=True)
        if arch.post_sublayer_norms:
            self.post_self_attn_layernorm = RMSNorm(h, eps, dtype)
            self.post_mlp_layernorm = RMSNorm(h, eps, dtype)
        else:
            self.post_self_attn_layernorm = self.post_mlp_layernorm = None

    def __call__(self, x: jax.Array, kv_pages: jax.Array, batch: ForwardBatch, kernels: Kernels):
        attn_out, kv_pages = self.self_attn(self.input_layernorm(x), kv_pages, batch, kernels)
        if self.post_self_attn_layernorm is not None:
            attn_out = self.post_self_attn_layernorm(attn_out)
        x = x + attn_out
        mlp_out = self.mlp(self.post_attention_layernorm(x))
        if self.post_mlp_layernorm is not None:
            mlp_out = self.post_mlp_layernorm(mlp_out)
        return x + mlp_out, kv_pages


def abstract_model(arch: ModelArch, dtype, fuse_qkv: bool = True) -> CausalLM:
    """The model with ShapeDtypeStruct leaves (see llama.abstract_model)."""
    return nnx.eval_shape(lambda: CausalLM(arch, dtype, lambda i: GlmDecoderLayer(arch, i, dtype, fuse_qkv)))
