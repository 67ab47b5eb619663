"""Mixtral (`MixtralForCausalLM`): Mistral whose every MLP is a sparse MoE (HF's `block_sparse_moe`,
here `mlp`: router `gate`, experts `experts.{e}.w1` (gate), `w3` (up), `w2` (down); top-2 of 8 in
8x7B). `model_arch.ARCHITECTURES` renames `.mlp.` to `.block_sparse_moe.` for the checkpoint."""

from __future__ import annotations

from flax import nnx

from jaxllm.model_arch import ModelArch
from jaxllm.models.layers import CausalLM, DecoderLayer
from jaxllm.models.moe import SparseMoE


def abstract_model(arch: ModelArch, dtype, fuse_qkv: bool = True) -> CausalLM:
    """The model with ShapeDtypeStruct leaves (see llama.abstract_model)."""
    return nnx.eval_shape(lambda: CausalLM(arch, dtype, lambda i: DecoderLayer(
        arch, i, dtype, fuse_qkv, SparseMoE(arch, dtype, ("w1", "w3", "w2")))))
