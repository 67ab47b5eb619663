"""The Llama family: Llama 2/3/3.x, Mistral, Qwen2/2.5 (q/k/v bias), Qwen3 (q/k norm).

HF tensors map onto the parameters by name (`model.layers.3.self_attn.o_proj.weight`), except the
two fused projections, assembled at load from their HF parts: `self_attn.qkv_proj` from
q_proj/k_proj/v_proj and `mlp.gate_up_proj` from gate_proj/up_proj (`layers.FusedFrom`).
"""

from __future__ import annotations

from flax import nnx

from jaxllm.model_arch import ModelArch
from jaxllm.models.layers import CausalLM, DecoderLayer, GatedMLP


def abstract_model(arch: ModelArch, dtype, fuse_qkv: bool = True) -> CausalLM:
    """The model with ShapeDtypeStruct leaves: structure, shapes and sharding axes, no memory.
    fuse_qkv=False keeps q/k/v apart (for KV heads replicated over tp, where q alone is sharded)."""
    return nnx.eval_shape(lambda: CausalLM(arch, dtype, lambda i: DecoderLayer(
        arch, i, dtype, fuse_qkv, GatedMLP(arch, dtype))))
