"""DeepSeek-V2 and V3 (`DeepseekV2ForCausalLM`, `DeepseekV3ForCausalLM`): multi-head latent
attention over a latent page pool, and MoE layers with shared experts and grouped routing.

Attention (MLA): each token caches one row, its compressed latent c_kv (kv_a_proj_with_mqa, then
kv_a_layernorm; kv_lora_rank wide) and its rotary key k_pe (qk_rope_head_dim, shared by all
heads). Queries come from q_proj, or from the low-rank q_a_proj / q_a_layernorm / q_b_proj. The
attention runs in the absorbed form for every token: q_nope is folded through each head's slice
of kv_b_proj into the latent space, the kernel attends over the latents, and the other slice of
kv_b_proj brings the result back to v_head_dim per head (pallas_kernels/mla_attention).

MLP: dense in the first `first_k_dense_replace` layers, then routed experts plus shared experts
(`shared_experts`, n_shared_experts times an expert's width, on every token). The router (`gate`)
scores by softmax (V2) or sigmoid (V3, plus `e_score_correction_bias` for the choice only), picks
within the best groups of experts, and scales the weights by routed_scaling_factor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.model_arch import ModelArch, MoE
from jaxllm.models.batch import ForwardBatch
from jaxllm.models.layers import CausalLM, DecoderLayer, GatedMLP, Kernels, Linear, RMSNorm, Rotary, param
from jaxllm.models.moe import ExpertWeights
from pallas_kernels.mla_attention import write_latent_pages


class MLAttention(nnx.Module):
    def __init__(self, arch: ModelArch, dtype):
        mla, h, heads, eps = arch.mla, arch.hidden_size, arch.num_heads, arch.norm_eps
        qk_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        if mla.q_lora_rank is None:
            self.q_proj = Linear(h, heads * qk_dim, ("q_heads", "embed"), dtype)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = Linear(h, mla.q_lora_rank, (None, "embed"), dtype)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, eps, dtype)
            self.q_b_proj = Linear(mla.q_lora_rank, heads * qk_dim, ("q_heads", None), dtype)
        self.kv_a_proj_with_mqa = Linear(h, mla.latent_width, (None, "embed"), dtype)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, eps, dtype)
        # [H * (nope + v), R]: per head, the key's no-rope part and the value from the latent.
        self.kv_b_proj = Linear(mla.kv_lora_rank, heads * (mla.qk_nope_head_dim + mla.v_head_dim), ("q_heads", None),
                                dtype)
        self.o_proj = Linear(heads * mla.v_head_dim, h, ("embed", "q_heads"), dtype)
        self.rotary = Rotary.of(arch)
        self.num_heads, self.mla = heads, mla

    def __call__(self, x: jax.Array, latent_pages: jax.Array, batch: ForwardBatch,
                 kernels: Kernels) -> tuple[jax.Array, jax.Array]:
        mla, t, heads = self.mla, x.shape[0], self.num_heads
        nope, rank = mla.qk_nope_head_dim, mla.kv_lora_rank
        q = self.q_proj(x) if self.q_proj is not None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(t, heads, nope + mla.qk_rope_head_dim)  # [T, H, nope + rope]
        q_pe = self.rotary(q[..., nope:], batch.positions)  # [T, H, rope]
        latent = self.kv_a_proj_with_mqa(x)  # [T, R + rope]
        k_pe = self.rotary(latent[:, None, rank:], batch.positions)[:, 0]  # [T, rope]
        row = jnp.concatenate([self.kv_a_layernorm(latent[:, :rank]), k_pe], axis=-1)  # [T, R + rope]
        latent_pages = write_latent_pages(latent_pages, row, batch.slot_mapping)
        up = self.kv_b_proj.weight[...].reshape(heads, nope + mla.v_head_dim, rank)  # [H, nope + v, R]
        q_latent = jnp.einsum("thn,hnr->thr", q[..., :nope], up[:, :nope])  # [T, H, R]
        out = kernels.attention(q_latent, q_pe, latent_pages, batch.kv_lens, batch.page_indices, batch.cu_q_lens,
                                batch.num_seqs, mla.softmax_scale)  # [T, H, R]
        out = jnp.einsum("thr,hvr->thv", out, up[:, nope:])  # [T, H, v]
        return self.o_proj(out.reshape(t, heads * mla.v_head_dim)), latent_pages


def route(logits: jax.Array, moe: MoE, correction: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Router logits [T, E] f32 -> (weights [T, k] f32, expert ids [T, k] i32), as DeepSeek's gate."""
    scores = jax.nn.softmax(logits, axis=-1) if moe.scoring == "softmax" else jax.nn.sigmoid(logits)
    choice = scores if correction is None else scores + correction  # [T, E]
    if moe.topk_method != "greedy":  # only experts of the topk_groups best of num_groups groups
        t, e = choice.shape
        grouped = choice.reshape(t, moe.num_groups, e // moe.num_groups)
        group_score = (jnp.max(grouped, axis=-1) if moe.topk_method == "group_limited_greedy"
                       else jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1))  # [T, G]
        _, best = jax.lax.top_k(group_score, moe.topk_groups)  # [T, topk_groups]
        keep = jnp.zeros(group_score.shape, bool).at[jnp.arange(t)[:, None], best].set(True)  # [T, G]
        keep = jnp.repeat(keep, e // moe.num_groups, axis=1)  # [T, E]
        # NOTE: V2 zeroes the other groups' scores, V3 sets them to -inf, as transformers does.
        choice = jnp.where(keep, choice, 0.0 if moe.topk_method == "group_limited_greedy" else -jnp.inf)
    _, ids = jax.lax.top_k(choice, moe.top_k)
    weights = jnp.take_along_axis(scores, ids, axis=-1)  # [T, k]
    if moe.renormalize:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights * moe.routed_scaling_factor, ids.astype(jnp.int32)


class Router(nnx.Module):
    def __init__(self, arch: ModelArch):
        moe = arch.moe
        # float32 as transformers keeps them: the choice compares close scores.
        self.weight = param((moe.num_experts, arch.hidden_size), (None, "embed"), jnp.float32)
        self.e_score_correction_bias = (param((moe.num_experts,), (None,), jnp.float32) if moe.correction_bias
                                        else None)


class DeepseekMoE(nnx.Module):
    def __init__(self, arch: ModelArch, dtype):
        moe = arch.moe
        self.gate = Router(arch)
        self.experts = ExpertWeights(arch, dtype, ("gate_proj", "up_proj", "down_proj"))
        self.shared_experts = (GatedMLP(arch, dtype, intermediate_size=moe.intermediate_size * moe.num_shared_experts)
                               if moe.num_shared_experts else None)
        self.moe = moe

    def __call__(self, x: jax.Array, batch: ForwardBatch, kernels: Kernels) -> jax.Array:
        logits = jnp.einsum("th,eh->te", x.astype(jnp.float32), self.gate.weight[...])  # [T, E]
        bias = self.gate.e_score_correction_bias
        weights, ids = route(logits, self.moe, None if bias is None else bias[...])
        y = kernels.experts(x, ids, weights, batch.num_real_tokens(), self.experts.gate_up_proj[...],
                            self.experts.down_proj[...])  # [T, H]
        return y if self.shared_experts is None else y + self.shared_experts(x)


def _layer(arch: ModelArch, layer: int, dtype) -> DecoderLayer:
    mlp = DeepseekMoE(arch, dtype) if arch.moe.sparse_layers[layer] else GatedMLP(arch, dtype)
    return DecoderLayer(arch, layer, dtype, True, mlp, attention=MLAttention(arch, dtype))


def abstract_model(arch: ModelArch, dtype, fuse_qkv: bool = True) -> CausalLM:
    """The model with ShapeDtypeStruct leaves (see llama.abstract_model). MLA has no separate k/v
    projections, so `fuse_qkv` changes nothing."""
    del fuse_qkv
    return nnx.eval_shape(lambda: CausalLM(arch, dtype, lambda i: _layer(arch, i, dtype)))
