"""Qwen3-MoE (`Qwen3MoeForCausalLM`, e.g. Qwen3-30B-A3B): Qwen3's attention (q/k norm) with a
sparse MoE MLP (`mlp`: router `gate`, experts `experts.{e}.gate_proj/up_proj/down_proj` of
`moe_intermediate_size`) every `decoder_sparse_step` layers, dense MLPs in `mlp_only_layers`."""

from __future__ import annotations

from flax import nnx

from jaxllm.model_arch import ModelArch
from jaxllm.models.layers import CausalLM, DecoderLayer, GatedMLP
from jaxllm.models.moe import SparseMoE


def _mlp(arch: ModelArch, layer: int, dtype) -> nnx.Module:
    if arch.moe.sparse_layers[layer]:
        return SparseMoE(arch, dtype, ("gate_proj", "up_proj", "down_proj"))
    return GatedMLP(arch, dtype)


def abstract_model(arch: ModelArch, dtype, fuse_qkv: bool = True) -> CausalLM:
    """The model with ShapeDtypeStruct leaves (see llama.abstract_model)."""
    return nnx.eval_shape(lambda: CausalLM(arch, dtype, lambda i: DecoderLayer(
        arch, i, dtype, fuse_qkv, _mlp(arch, i, dtype))))
