"""Qwen3-MoE (`Qwen3MoeForCausalLM`, e.g. Qwen3-30B-A3B): Qwen3's attention (q/k norm) with a
sparse MoE MLP (`mlp`: router `gate`, experts `experts.{e}.gate_proj/up_proj/down_proj` of
`moe_intermediate_size`) every `decoder_sparse_step` layers, dense MLPs in `mlp_only_layers`."""

from __future__ import annotations

import jax
from flax import nnx

from jaxllm.model_arch import ModelArch
from jaxllm.models.batch import ForwardBatch
from jaxllm.models.layers import CausalLM, GatedMLP, Kernels, PagedAttention, RMSNorm
from jaxllm.models.moe import SparseMoE


class Qwen3MoeDecoderLayer(nnx.Module):
    def __init__(self, arch: ModelArch, layer: int, dtype, fuse_qkv: bool):
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.norm_eps, dtype)
        self.self_attn = PagedAttention(arch, layer, dtype, fuse_qkv)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.norm_eps, dtype)
        self.sparse = arch.moe.sparse_layers[layer]
        self.mlp = (SparseMoE(arch, dtype, ("gate_proj", "up_proj", "down_proj")) if self.sparse
                    else GatedMLP(arch, dtype))

    def __call__(self, x: jax.Array, kv_pages: jax.Array, batch: ForwardBatch, kernels: Kernels):
        attn_out, kv_pages = self.self_attn(self.input_layernorm(x), kv_pages, batch, kernels)
        x = x + attn_out
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, batch, kernels) if self.sparse else self.mlp(h)), kv_pages


def abstract_model(arch: ModelArch, dtype, fuse_qkv: bool = True) -> CausalLM:
    """The model with ShapeDtypeStruct leaves (see llama.abstract_model)."""
    return nnx.eval_shape(lambda: CausalLM(arch, dtype, lambda i: Qwen3MoeDecoderLayer(arch, i, dtype, fuse_qkv)))
