"""GPT-2 (`GPT2LMHeadModel`): learned absolute positions, LayerNorm with bias, GELU (tanh) MLP.

HF stores GPT-2's projections as Conv1D, weight [in, out]; they are kept so (`Linear(transposed=True)`).
The fused `c_attn` [H, 3H] loads reshaped to [H, 3, heads, D] (q, k, v), so tensor parallelism
shards it by head. The LM head is the token embedding unless the config unties it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.model_arch import ModelArch
from jaxllm.models.batch import ForwardBatch
from jaxllm.models.layers import (
    Embedding,
    FusedFrom,
    Kernels,
    LayerNorm,
    Linear,
    PlainMLP,
    attend,
    lm_logits,
    param,
    run_layers,
)
from pallas_kernels.ragged_paged_attention import AttentionParams


class FusedQKV(nnx.Module):
    """`c_attn`: HF's Conv1D [H, 3H] held as [H, 3, heads, D]."""

    def __init__(self, arch: ModelArch, dtype):
        h, heads, d = arch.hidden_size, arch.num_heads, arch.head_dim
        self.weight = param((h, 3, heads, d), ("embed", None, "kv_heads", None), dtype,
                            fused_from=FusedFrom.concat([("c_attn.weight", (h, 3 * h), (h, 3, heads, d))], axis=1))
        self.bias = param((3, heads, d), (None, "kv_heads", None), dtype,
                          fused_from=FusedFrom.concat([("c_attn.bias", (3 * h,), (3, heads, d))], axis=0))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [T, H] -> [T, 3, heads, D] (q, k, v)."""
        return jnp.einsum("th,hcnd->tcnd", x, self.weight[...]) + self.bias[...]


class GPT2Attention(nnx.Module):
    def __init__(self, arch: ModelArch, dtype):
        self.c_attn = FusedQKV(arch, dtype)
        self.c_proj = Linear(arch.hidden_size, arch.hidden_size, ("embed", "q_heads"), dtype, bias=True,
                             transposed=True)
        self.params = AttentionParams(sm_scale=arch.head_dim**-0.5)

    def __call__(self, x: jax.Array, kv_pages: jax.Array, batch: ForwardBatch,
                 kernels: Kernels) -> tuple[jax.Array, jax.Array]:
        qkv = self.c_attn(x)  # [T, 3, Hq, D]
        out, kv_pages = attend(qkv[:, 0], qkv[:, 1], qkv[:, 2], kv_pages, batch, kernels, self.params)
        return self.c_proj(out), kv_pages


class GPT2Block(nnx.Module):
    def __init__(self, arch: ModelArch, dtype):
        self.ln_1 = LayerNorm(arch.hidden_size, arch.norm_eps, dtype)
        self.attn = GPT2Attention(arch, dtype)
        self.ln_2 = LayerNorm(arch.hidden_size, arch.norm_eps, dtype)
        self.mlp = PlainMLP(arch, dtype)

    def __call__(self, x: jax.Array, kv_pages: jax.Array, batch: ForwardBatch, kernels: Kernels):
        attn_out, kv_pages = self.attn(self.ln_1(x), kv_pages, batch, kernels)
        x = x + attn_out
        return x + self.mlp(self.ln_2(x)), kv_pages


class GPT2Model(nnx.Module):
    def __init__(self, arch: ModelArch, dtype):
        self.wte = Embedding(arch.vocab_size, arch.hidden_size, dtype)
        self.wpe = Embedding(arch.max_position_embeddings, arch.hidden_size, dtype, axes=(None, "embed"))
        self.h = nnx.List([GPT2Block(arch, dtype) for _ in range(arch.num_layers)])
        self.ln_f = LayerNorm(arch.hidden_size, arch.norm_eps, dtype)


class GPT2LMHeadModel(nnx.Module):
    def __init__(self, arch: ModelArch, dtype):
        self.transformer = GPT2Model(arch, dtype)
        self.lm_head = (
            None if arch.tie_word_embeddings else Linear(arch.hidden_size, arch.vocab_size, ("vocab", "embed"), dtype)
        )

    def __call__(self, kv_pages: list[jax.Array], batch: ForwardBatch, kernels: Kernels):
        """Returns (kv_pages, logits [R, V] float32 at batch.logits_indices)."""
        t = self.transformer
        positions = jnp.minimum(batch.positions, t.wpe.weight.shape[0] - 1)  # padding may sit past the table
        x = t.wte(batch.input_ids) + t.wpe(positions)  # [T, H]
        x, kv_pages = run_layers(t.h, x, kv_pages, batch, kernels)
        x = t.ln_f(x[batch.logits_indices])  # [R, H]
        head = t.wte.weight if self.lm_head is None else self.lm_head.weight
        return kv_pages, lm_logits(x, head)


def abstract_model(arch: ModelArch, dtype, fuse_qkv: bool = True) -> GPT2LMHeadModel:
    """The model with ShapeDtypeStruct leaves. GPT-2 has as many KV heads as query heads, so tp
    always shards them together and `fuse_qkv` changes nothing."""
    del fuse_qkv
    return nnx.eval_shape(lambda: GPT2LMHeadModel(arch, dtype))
