"""Mixtral (`MixtralForCausalLM`): Mistral whose every MLP is a sparse MoE (`block_sparse_moe`:
router `gate`, experts `experts.{e}.w1` (gate), `w3` (up), `w2` (down), top-2 of 8 in 8x7B)."""

from __future__ import annotations

import jax
from flax import nnx

from jaxllm.model_arch import ModelArch
from jaxllm.models.batch import ForwardBatch
from jaxllm.models.layers import CausalLM, Kernels, PagedAttention, RMSNorm
from jaxllm.models.moe import SparseMoE


class MixtralDecoderLayer(nnx.Module):
    def __init__(self, arch: ModelArch, layer: int, dtype, fuse_qkv: bool):
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.norm_eps, dtype)
        self.self_attn = PagedAttention(arch, layer, dtype, fuse_qkv)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.norm_eps, dtype)
        self.block_sparse_moe = SparseMoE(arch, dtype, ("w1", "w3", "w2"))

    def __call__(self, x: jax.Array, kv_pages: jax.Array, batch: ForwardBatch, kernels: Kernels):
        attn_out, kv_pages = self.self_attn(self.input_layernorm(x), kv_pages, batch, kernels)
        x = x + attn_out
        return x + self.block_sparse_moe(self.post_attention_layernorm(x), batch, kernels), kv_pages


def abstract_model(arch: ModelArch, dtype, fuse_qkv: bool = True) -> CausalLM:
    """The model with ShapeDtypeStruct leaves (see llama.abstract_model)."""
    return nnx.eval_shape(lambda: CausalLM(arch, dtype, lambda i: MixtralDecoderLayer(arch, i, dtype, fuse_qkv)))
