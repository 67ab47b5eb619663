"""The Llama family in Flax NNX: Llama 2/3/3.x, Mistral, Qwen2/2.5 (q/k/v bias), Qwen3 (q/k norm).

Parameter paths mirror the HF checkpoint names (`model.layers.3.self_attn.o_proj.weight`), and
linear weights keep HF's [out, in] layout (`x @ W.T`; XLA folds the transpose into the dot), so
loading is a name lookup with no reshuffling, except for the two fused projections: `qkv_proj`
(q, k and v in one matmul) and `gate_up_proj` (gate and up), whose Params name the HF tensors
they are cut from (`FusedFrom`; the loader assembles each shard from them). Every parameter
carries logical sharding axes (`vocab`, `embed`, `q_heads`, `kv_heads`, `mlp`);
`jaxllm/models/sharding.py` maps them to the mesh.

The module is defined in NNX, split once by the runner and run as a pure function
(`forward`) of (weights, kv_pages, batch) -> (kv_pages, logits) under `jax.jit`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.model_arch import ModelArch
from jaxllm.models.batch import ForwardBatch
from pallas_kernels.ragged_paged_attention import AttentionParams, write_kv_pages

# (q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, params) -> out; see pallas_kernels.
AttentionFn = Callable[..., jax.Array]


@dataclass(frozen=True)
class FusedFrom:
    """A parameter made of several HF tensors of the same module: each part (its name beside this
    parameter's, its HF shape, the shape it takes here) reshaped and concatenated along `axis`."""

    parts: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]
    axis: int


def _param(shape: tuple[int, ...], axes: tuple[str | None, ...], dtype, init: str = "zeros",
           fused_from: FusedFrom | None = None) -> nnx.Param:
    # NOTE: real values are loaded later (or drawn for dummy weights); the module is only ever
    # built under nnx.eval_shape, so this allocates nothing.
    value = jnp.ones(shape, dtype) if init == "ones" else jnp.zeros(shape, dtype)
    if fused_from is None:
        return nnx.Param(value, logical_axes=axes)
    return nnx.Param(value, logical_axes=axes, fused_from=fused_from)


class Linear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, axes: tuple[str | None, str | None], dtype, bias=False):
        self.weight = _param((out_features, in_features), axes, dtype)  # [out, in], as HF
        self.bias = _param((out_features,), axes[:1], dtype) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("ti,oi->to", x, self.weight[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class QKVProjection(nnx.Module):
    """q, k and v in one matmul: weight [Hkv, G + 2, D, H], for each KV head its G query heads
    (query head h belongs to KV head h // G, as in HF's GQA), then its k row and its v row.

    NOTE: with separate q/k/v weights a GPU trace showed a `wrapped_concatenate` in every step (a
    sizeable share of a single request's step; bench/RESULTS.md), most likely XLA's dot merger joining
    the three dots that share x by concatenating their weights on every step. Fused at load time
    nothing is copied. Sharded by KV head, so each shard holds whole groups."""

    def __init__(self, arch: ModelArch, dtype):
        h, d, kv = arch.hidden_size, arch.head_dim, arch.num_kv_heads
        self.group = g = arch.num_heads // kv
        self.num_heads = arch.num_heads
        parts = lambda suffix, per_head: FusedFrom((  # noqa: E731
            (f"q_proj.{suffix}", (arch.q_size, *per_head), (kv, g, d, *per_head)),
            (f"k_proj.{suffix}", (arch.kv_size, *per_head), (kv, 1, d, *per_head)),
            (f"v_proj.{suffix}", (arch.kv_size, *per_head), (kv, 1, d, *per_head)),
        ), axis=1)
        self.weight = _param((kv, g + 2, d, h), ("kv_heads", None, None, "embed"), dtype,
                             fused_from=parts("weight", (h,)))
        self.bias = (_param((kv, g + 2, d), ("kv_heads", None, None), dtype, fused_from=parts("bias", ()))
                     if arch.qkv_bias else None)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [T, H] -> q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]."""
        y = jnp.einsum("th,kgdh->tkgd", x, self.weight[...])  # [T, Hkv, G + 2, D]
        if self.bias is not None:
            y = y + self.bias[...]
        num_tokens, g = x.shape[0], self.group
        q = y[:, :, :g].reshape(num_tokens, self.num_heads, y.shape[-1])
        return q, y[:, :, g], y[:, :, g + 1]


class GateUpProjection(nnx.Module):
    """gate and up in one matmul: weight [2, I, H] (gate, then up), sharded along I."""

    def __init__(self, arch: ModelArch, dtype):
        h, i = arch.hidden_size, arch.intermediate_size
        self.weight = _param((2, i, h), (None, "mlp", "embed"), dtype, fused_from=FusedFrom((
            ("gate_proj.weight", (i, h), (1, i, h)), ("up_proj.weight", (i, h), (1, i, h))), axis=0))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [T, H] -> silu(gate) * up [T, I]."""
        y = jnp.einsum("th,gih->tgi", x, self.weight[...])  # [T, 2, I]
        return jax.nn.silu(y[:, 0]) * y[:, 1]


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = _param((dim,), (None,), dtype, init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(arch: ModelArch) -> np.ndarray:
    """[D/2] inverse frequencies, with llama3 / linear scaling applied (as transformers)."""
    dim = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = arch.rope_scaling
    if scaling is None:
        return inv_freq.astype(np.float32)
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type == "linear":
        return (inv_freq / float(scaling["factor"])).astype(np.float32)
    # llama3: keep high frequencies, divide low ones by `factor`, blend in between.
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """rotate_half RoPE. x [T, H, D]; positions [T]; inv_freq [D/2]."""
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    cos = jnp.cos(freqs)[:, None, :]
    sin = jnp.sin(freqs)[:, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, arch: ModelArch, layer: int, dtype, fuse_qkv: bool):
        h, bias = arch.hidden_size, arch.qkv_bias
        if fuse_qkv:
            self.qkv_proj = QKVProjection(arch, dtype)
            self.q_proj = self.k_proj = self.v_proj = None
        else:  # KV heads replicated over tp: q is sharded by its own heads, k/v not at all
            self.qkv_proj = None
            self.q_proj = Linear(h, arch.q_size, ("q_heads", "embed"), dtype, bias)
            self.k_proj = Linear(h, arch.kv_size, ("kv_heads", "embed"), dtype, bias)
            self.v_proj = Linear(h, arch.kv_size, ("kv_heads", "embed"), dtype, bias)
        self.o_proj = Linear(arch.q_size, h, ("embed", "q_heads"), dtype)
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.params = AttentionParams(sm_scale=arch.head_dim**-0.5, sliding_window=arch.sliding_windows[layer])

    def __call__(self, x, kv_pages, batch: ForwardBatch, inv_freq, attention: AttentionFn):
        num_tokens = x.shape[0]
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x)  # [T, Hq, D], [T, Hkv, D], [T, Hkv, D]
        else:
            q = self.q_proj(x).reshape(num_tokens, self.num_heads, self.head_dim)
            k = self.k_proj(x).reshape(num_tokens, self.num_kv_heads, self.head_dim)
            v = self.v_proj(x).reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, batch.positions, inv_freq)
        k = apply_rope(k, batch.positions, inv_freq)
        kv_pages = write_kv_pages(kv_pages, k, v, batch.slot_mapping)
        out = attention(
            q, kv_pages, batch.kv_lens, batch.page_indices, batch.cu_q_lens, batch.num_seqs, self.params
        )  # [T, Hq, D]
        return self.o_proj(out.reshape(num_tokens, -1)), kv_pages


class MLP(nnx.Module):
    def __init__(self, arch: ModelArch, dtype):
        self.gate_up_proj = GateUpProjection(arch, dtype)
        self.down_proj = Linear(arch.intermediate_size, arch.hidden_size, ("embed", "mlp"), dtype)

    def __call__(self, x):
        return self.down_proj(self.gate_up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, arch: ModelArch, layer: int, dtype, fuse_qkv: bool):
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.self_attn = Attention(arch, layer, dtype, fuse_qkv)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.mlp = MLP(arch, dtype)

    def __call__(self, x, kv_pages, batch, inv_freq, attention):
        attn_out, kv_pages = self.self_attn(self.input_layernorm(x), kv_pages, batch, inv_freq, attention)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv_pages


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, dtype):
        self.weight = _param((vocab, dim), ("vocab", "embed"), dtype)

    def __call__(self, ids):
        return jnp.take(self.weight[...], ids, axis=0)


class LlamaModel(nnx.Module):
    def __init__(self, arch: ModelArch, dtype, fuse_qkv: bool):
        self.embed_tokens = Embedding(arch.vocab_size, arch.hidden_size, dtype)
        self.layers = nnx.List([DecoderLayer(arch, i, dtype, fuse_qkv) for i in range(arch.num_layers)])
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)


class LlamaForCausalLM(nnx.Module):
    def __init__(self, arch: ModelArch, dtype, fuse_qkv: bool = True):
        self.model = LlamaModel(arch, dtype, fuse_qkv)
        self.lm_head = (
            None if arch.tie_word_embeddings else Linear(arch.hidden_size, arch.vocab_size, ("vocab", "embed"), dtype)
        )
        # A static tuple, not a Variable: it is a constant of the config, never loaded.
        self.inv_freq = tuple(float(f) for f in rope_inv_freq(arch))

    def __call__(self, kv_pages: list[jax.Array], batch: ForwardBatch, attention: AttentionFn):
        """Returns (kv_pages, logits [R, V] float32 at batch.logits_indices)."""
        x = self.model.embed_tokens(batch.input_ids)  # [T, H]
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)  # [D/2]
        new_pages = []
        for layer, pages in zip(self.model.layers, kv_pages, strict=True):
            graphdef, state = nnx.split(layer)
            x, pages = _decoder_layer(graphdef, state, x, pages, batch, inv_freq, attention)
            new_pages.append(pages)
        x = self.model.norm(x[batch.logits_indices])  # [R, H]
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = jnp.einsum("rh,vh->rv", x, head[...], preferred_element_type=jnp.float32)
        return new_pages, logits


def _run_decoder_layer(graphdef, state, x, kv_pages, batch: ForwardBatch, inv_freq, attention: AttentionFn):
    return nnx.merge(graphdef, state)(x, kv_pages, batch, inv_freq, attention)


# NOTE: one jit shared by every layer: the layers have equal graphdefs (a sliding window differs
# only where the model's windows do) and equal shapes, so a bucket traces and lowers one layer and
# calls it num_layers times; XLA inlines the calls, so the compiled step is the same as unrolled,
# and tracing and lowering a bucket, which hold the GIL and bound how fast buckets load (also from
# the cache), shrink by about the number of layers.
_decoder_layer = jax.jit(_run_decoder_layer, static_argnums=(0, 6))


def kv_pages_shape(arch: ModelArch, num_pages: int, page_size: int) -> tuple[int, ...]:
    """One layer's KV pool (layout documented in pallas_kernels/ragged_paged_attention/common.py)."""
    return (2, arch.num_kv_heads, num_pages, page_size, arch.head_dim)


def abstract_model(arch: ModelArch, dtype, fuse_qkv: bool = True) -> LlamaForCausalLM:
    """The model with ShapeDtypeStruct leaves: structure, shapes and sharding axes, no memory.
    fuse_qkv=False keeps q/k/v apart (for KV heads replicated over tp, where q alone is sharded)."""
    return nnx.eval_shape(lambda: LlamaForCausalLM(arch, dtype, fuse_qkv))
