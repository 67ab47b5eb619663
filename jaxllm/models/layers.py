"""The pieces every model family is built from, in Flax NNX.

Parameter paths mirror the HF checkpoint names (`model.layers.3.self_attn.o_proj.weight`), and
linear weights keep HF's layout (`[out, in]` for `nn.Linear`, `[in, out]` for GPT-2's Conv1D), so
loading is a name lookup. A parameter that is several HF tensors (q/k/v, gate/up, the experts of
an MoE layer), or one HF tensor reshaped, names its parts (`FusedFrom`) and the loader assembles
each shard from them.
Every parameter carries logical sharding axes (`vocab`, `embed`, `q_heads`, `kv_heads`, `mlp`);
`jaxllm/models/sharding.py` maps them to the mesh.

Models are built once under `nnx.eval_shape`, split by the runner and run as pure functions of
(weights, kv_pages, batch) -> (kv_pages, logits) under `jax.jit`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.model_arch import ModelArch, yarn_mscale
from jaxllm.models.batch import ForwardBatch
from jaxllm.models.kv_scales import ScaledKvPages, calibrated
from pallas_kernels.ragged_paged_attention import AttentionParams, write_kv_pages

# (q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, params) -> out; see pallas_kernels.
AttentionFn = Callable[..., jax.Array]


class Kernels(NamedTuple):
    """The step's compute kernels, picked by the runner for the platform and the model: attention
    over the page pool, and for MoE families the experts (`models.moe.ExpertsFn`)."""

    attention: AttentionFn
    experts: Callable[..., jax.Array] | None = None


@dataclass(frozen=True)
class Part:
    """One HF tensor of a parameter (its name beside the parameter's module): reshaped to `shape`,
    axes permuted by `perm` (HF's [out, in] to [in, out], say), placed at `offset` in the parameter."""

    name: str
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    offset: tuple[int, ...]
    perm: tuple[int, ...] | None = None


@dataclass(frozen=True)
class FusedFrom:
    """A parameter assembled from HF tensors (`Part`s that tile it), or one HF tensor reshaped."""

    parts: tuple[Part, ...]

    @classmethod
    def concat(cls, parts: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]], axis: int) -> FusedFrom:
        """Parts (name, HF shape, shape here) reshaped and concatenated along `axis`."""
        placed, start = [], 0
        for name, hf_shape, shape in parts:
            placed.append(Part(name, hf_shape, shape, tuple(start if a == axis else 0 for a in range(len(shape)))))
            start += shape[axis]
        return cls(tuple(placed))


def param(shape: tuple[int, ...], axes: tuple[str | None, ...], dtype, init: str = "zeros",
          fused_from: FusedFrom | None = None) -> nnx.Param:
    # NOTE: real values are loaded later (or drawn for dummy weights); the module is only ever
    # built under nnx.eval_shape, so this allocates nothing.
    # `init` also tells dummy loading what to draw: "ones" (norm scales) stay ones.
    value = jnp.ones(shape, dtype) if init == "ones" else jnp.zeros(shape, dtype)
    if fused_from is None:
        return nnx.Param(value, logical_axes=axes, init=init)
    return nnx.Param(value, logical_axes=axes, init=init, fused_from=fused_from)


class Linear(nnx.Module):
    """y = x W (+ b). `transposed`: W is stored [in, out] (GPT-2's Conv1D), else [out, in] (nn.Linear);
    `axes` name (out, in) either way. XLA folds either layout into the dot."""

    def __init__(self, in_features: int, out_features: int, axes: tuple[str | None, str | None], dtype,
                 bias: bool = False, transposed: bool = False):
        self.transposed = transposed
        shape, weight_axes = ((in_features, out_features), axes[::-1]) if transposed else (
            (out_features, in_features), axes)
        self.weight = param(shape, weight_axes, dtype)
        self.bias = param((out_features,), axes[:1], dtype) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("ti,io->to" if self.transposed else "ti,oi->to", x, self.weight[...])
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
        parts = lambda suffix, per_head: FusedFrom.concat((  # noqa: E731
            (f"q_proj.{suffix}", (arch.q_size, *per_head), (kv, g, d, *per_head)),
            (f"k_proj.{suffix}", (arch.kv_size, *per_head), (kv, 1, d, *per_head)),
            (f"v_proj.{suffix}", (arch.kv_size, *per_head), (kv, 1, d, *per_head)),
        ), axis=1)
        self.weight = param((kv, g + 2, d, h), ("kv_heads", None, None, "embed"), dtype,
                            fused_from=parts("weight", (h,)))
        self.bias = (param((kv, g + 2, d), ("kv_heads", None, None), dtype, fused_from=parts("bias", ()))
                     if arch.qkv_bias else None)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [T, H] -> q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]."""
        y = jnp.einsum("th,kgdh->tkgd", x, self.weight[...])  # [T, Hkv, G + 2, D]
        if self.bias is not None:
            y = y + self.bias[...]
        num_tokens, g = x.shape[0], self.group
        q = y[:, :, :g].reshape(num_tokens, self.num_heads, y.shape[-1])
        return q, y[:, :, g], y[:, :, g + 1]


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def gelu_exact(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


# HF `hidden_act` / `activation_function` names.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": gelu_exact,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class GateUpProjection(nnx.Module):
    """gate and up in one matmul: weight [2, I, H] (gate, then up), sharded along I. From HF's
    separate `gate_proj`/`up_proj`, or from one fused `gate_up_proj` [2I, H] (GLM)."""

    def __init__(self, arch: ModelArch, dtype, hf_fused: bool = False, intermediate_size: int | None = None):
        h, i = arch.hidden_size, intermediate_size or arch.intermediate_size
        parts = ((("gate_up_proj.weight", (2 * i, h), (2, i, h)),) if hf_fused else
                 (("gate_proj.weight", (i, h), (1, i, h)), ("up_proj.weight", (i, h), (1, i, h))))
        self.weight = param((2, i, h), (None, "mlp", "embed"), dtype, fused_from=FusedFrom.concat(parts, axis=0))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [T, H] -> (gate [T, I], up [T, I])."""
        y = jnp.einsum("th,gih->tgi", x, self.weight[...])  # [T, 2, I]
        return y[:, 0], y[:, 1]


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)) (Llama, GLM); `intermediate_size` if not the arch's (DeepSeek's shared experts)."""

    def __init__(self, arch: ModelArch, dtype, hf_fused: bool = False, intermediate_size: int | None = None):
        self.gate_up_proj = GateUpProjection(arch, dtype, hf_fused, intermediate_size)
        self.down_proj = Linear(intermediate_size or arch.intermediate_size, arch.hidden_size, ("embed", "mlp"), dtype)
        self.act = arch.hidden_act

    def __call__(self, x: jax.Array, batch: ForwardBatch | None = None, kernels: Kernels | None = None) -> jax.Array:
        """x [T, H] -> [T, H]. (batch, kernels): the MLP call every layer makes; an MoE needs them."""
        gate, up = self.gate_up_proj(x)  # [T, I] each
        return self.down_proj(activation(self.act)(gate) * up)


class PlainMLP(nnx.Module):
    """c_proj(act(c_fc(x))) with biases, in GPT-2's Conv1D layout and names."""

    def __init__(self, arch: ModelArch, dtype):
        h, i = arch.hidden_size, arch.intermediate_size
        self.c_fc = Linear(h, i, ("mlp", "embed"), dtype, bias=True, transposed=True)
        self.c_proj = Linear(i, h, ("embed", "mlp"), dtype, bias=True, transposed=True)
        self.act = arch.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(activation(self.act)(self.c_fc(x)))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = param((dim,), (None,), dtype, init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = param((dim,), (None,), dtype, init="ones")
        self.bias = param((dim,), (None,), dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        xf = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (xf * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(arch: ModelArch) -> tuple[np.ndarray, float]:
    """([rotary_dim / 2] inverse frequencies, attention factor on cos/sin), with llama3, linear or
    YaRN scaling applied as transformers does."""
    dim = arch.rotary_dim
    inv_freq = 1.0 / (arch.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = arch.rope_scaling
    if scaling is None:
        return inv_freq.astype(np.float32), 1.0
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        return (inv_freq / float(scaling["factor"])).astype(np.float32), 1.0
    if rope_type == "yarn":
        return _yarn(inv_freq, dim, arch)
    # llama3: keep high frequencies, divide low ones by `factor`, blend in between.
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32), 1.0


def _yarn(inv_freq: np.ndarray, dim: int, arch: ModelArch) -> tuple[np.ndarray, float]:
    """YaRN: interpolate low frequencies by `factor`, keep high ones, ramp between the dims that
    turn beta_fast and beta_slow times over the original context; scale cos/sin by mscale."""
    s = arch.rope_scaling
    old_len = float(s.get("original_max_position_embeddings") or arch.max_position_embeddings)
    factor = float(s.get("factor") or arch.max_position_embeddings / old_len)
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else yarn_mscale(factor))
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)
    base = arch.rope_theta

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / ((high + 0.001 if low == high else high) - low),
                   0, 1)
    extrapolate = 1 - ramp
    blended = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
    return blended.astype(np.float32), float(attention_factor)


@dataclass(frozen=True)
class Rotary:
    """RoPE as the family applies it: over the first `2 * len(inv_freq)` dims of each head (partial
    rotary passes the rest through), pairs (i, i + half) (rotate_half) or (2i, 2i + 1) (interleaved),
    cos/sin scaled by `attention_factor` (YaRN). Static: part of the model's graph, never loaded."""

    inv_freq: tuple[float, ...]
    interleaved: bool = False
    attention_factor: float = 1.0

    @classmethod
    def of(cls, arch: ModelArch) -> Rotary:
        inv_freq, attention_factor = rope_inv_freq(arch)
        return cls(tuple(float(f) for f in inv_freq), arch.rope_interleaved, attention_factor)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x [T, H, D]; positions [T] -> x with its first rotary dims rotated."""
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)  # [R/2]
        freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, R/2]
        cos = (jnp.cos(freqs) * self.attention_factor)[:, None, :]  # [T, 1, R/2]
        sin = (jnp.sin(freqs) * self.attention_factor)[:, None, :]
        rotary_dim = 2 * len(self.inv_freq)
        xf = x[..., :rotary_dim].astype(jnp.float32)
        if self.interleaved:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            rotated = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xf.shape)
        else:
            x1, x2 = jnp.split(xf, 2, axis=-1)
            rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        if rotary_dim == x.shape[-1]:
            return rotated.astype(x.dtype)
        return jnp.concatenate([rotated.astype(x.dtype), x[..., rotary_dim:]], axis=-1)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, kv_pages: jax.Array | ScaledKvPages, batch: ForwardBatch,
           kernels: Kernels, params: AttentionParams,
           sinks: jax.Array | None = None) -> tuple[jax.Array, jax.Array | ScaledKvPages]:
    """Write this step's k/v [T, Hkv, D] into the page pool and attend q [T, Hq, D] over it (with
    sinks [Hq] f32 where the model has them). Returns (out [T, Hq * D], kv_pages). FP8 pages with their
    scales beside them (`ScaledKvPages`) are calibrated by their first write and read through
    q * k_scale and out * v_scale (models/kv_scales.py)."""
    if isinstance(kv_pages, ScaledKvPages):
        return _attend_scaled(q, k, v, kv_pages, batch, kernels, params, sinks)
    kv_pages = write_kv_pages(kv_pages, k, v, batch.slot_mapping, params.k_scale, params.v_scale)
    return _attention(q, kv_pages, batch, kernels, params, sinks), kv_pages


def _attend_scaled(q: jax.Array, k: jax.Array, v: jax.Array, kv: ScaledKvPages, batch: ForwardBatch,
                   kernels: Kernels, params: AttentionParams,
                   sinks: jax.Array | None) -> tuple[jax.Array, ScaledKvPages]:
    _, _, num_pages, page_size, _ = kv.pages.shape
    real = batch.slot_mapping < num_pages * page_size  # [T]: padded tokens carry a slot past the pool
    scales = calibrated(kv.scales, k, v, real)  # [2] f32: (k_scale, v_scale)
    pages = write_kv_pages(kv.pages, k, v, batch.slot_mapping, scales[0], scales[1])
    scaled_q = (q.astype(jnp.float32) * scales[0]).astype(q.dtype)
    out = _attention(scaled_q, pages, batch, kernels, params, sinks)  # [T, Hq * D]
    return (out.astype(jnp.float32) * scales[1]).astype(out.dtype), ScaledKvPages(pages, scales)


def _attention(q: jax.Array, kv_pages: jax.Array, batch: ForwardBatch, kernels: Kernels, params: AttentionParams,
               sinks: jax.Array | None) -> jax.Array:
    """The step's attention over the pool: out [T, Hq * D]."""
    extra = {} if sinks is None else {"sinks": sinks}
    out = kernels.attention(q, kv_pages, batch.kv_lens, batch.page_indices, batch.cu_q_lens, batch.num_seqs, params,
                            **extra)
    return out.reshape(q.shape[0], -1)


class PagedAttention(nnx.Module):
    """Rotary self-attention over the page pool with HF's q/k/v/o_proj names: q/k/v fused
    (`fuse_qkv`) or, where KV heads are replicated over tp, apart (q sharded by its own heads);
    optional q/k/v and o biases, per-head q/k RMSNorm (Qwen3) and sinks (gpt-oss)."""

    def __init__(self, arch: ModelArch, layer: int, dtype, fuse_qkv: bool):
        h, bias = arch.hidden_size, arch.qkv_bias
        if fuse_qkv:
            self.qkv_proj = QKVProjection(arch, dtype)
            self.q_proj = self.k_proj = self.v_proj = None
        else:
            self.qkv_proj = None
            self.q_proj = Linear(h, arch.q_size, ("q_heads", "embed"), dtype, bias)
            self.k_proj = Linear(h, arch.kv_size, ("kv_heads", "embed"), dtype, bias)
            self.v_proj = Linear(h, arch.kv_size, ("kv_heads", "embed"), dtype, bias)
        self.o_proj = Linear(arch.q_size, h, ("embed", "q_heads"), dtype, arch.o_bias)
        # A learned logit per query head in each softmax's denominator (gpt-oss), as float32.
        self.sinks = param((arch.num_heads,), ("q_heads",), jnp.float32) if arch.attention_sinks else None
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.norm_eps, dtype)
            self.k_norm = RMSNorm(arch.head_dim, arch.norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.rotary = Rotary.of(arch)
        self.params = AttentionParams(sm_scale=arch.head_dim**-0.5, sliding_window=arch.sliding_windows[layer])

    def __call__(self, x: jax.Array, kv_pages: jax.Array, batch: ForwardBatch,
                 kernels: Kernels) -> tuple[jax.Array, jax.Array]:
        num_tokens = x.shape[0]
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x)  # [T, Hq, D], [T, Hkv, D], [T, Hkv, D]
        else:
            q = self.q_proj(x).reshape(num_tokens, self.num_heads, self.head_dim)
            k = self.k_proj(x).reshape(num_tokens, self.num_kv_heads, self.head_dim)
            v = self.v_proj(x).reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(q, batch.positions), self.rotary(k, batch.positions)
        sinks = None if self.sinks is None else self.sinks[...]
        out, kv_pages = attend(q, k, v, kv_pages, batch, kernels, self.params, sinks)
        return self.o_proj(out), kv_pages


class DecoderLayer(nnx.Module):
    """The pre-norm layer of Llama and its descendants, in HF's names: x + self_attn(input_layernorm(x)),
    then + mlp(post_attention_layernorm(x)); the family gives the MLP (dense or MoE), called as
    `mlp(x, batch, kernels)`, and may give the attention (DeepSeek's MLA) in place of `PagedAttention`."""

    def __init__(self, arch: ModelArch, layer: int, dtype, fuse_qkv: bool, mlp: nnx.Module,
                 attention: nnx.Module | None = None):
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.norm_eps, dtype)
        self.self_attn = attention or PagedAttention(arch, layer, dtype, fuse_qkv)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.norm_eps, dtype)
        self.mlp = mlp

    def __call__(self, x: jax.Array, kv_pages: jax.Array, batch: ForwardBatch,
                 kernels: Kernels) -> tuple[jax.Array, jax.Array]:
        attn_out, kv_pages = self.self_attn(self.input_layernorm(x), kv_pages, batch, kernels)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x), batch, kernels), kv_pages


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, dtype, axes: tuple[str | None, str | None] = ("vocab", "embed")):
        self.weight = param((vocab, dim), axes, dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0)


def run_layers(layers: Sequence[nnx.Module], x: jax.Array, kv_pages: list[jax.Array], batch: ForwardBatch,
               kernels: Kernels) -> tuple[jax.Array, list[jax.Array]]:
    """x [T, H] through every decoder layer, each `layer(x, pages, batch, kernels) -> (x, pages)`."""
    new_pages = []
    for layer, pages in zip(layers, kv_pages, strict=True):
        graphdef, state = nnx.split(layer)
        x, pages = _decoder_layer(graphdef, state, x, pages, batch, kernels)
        new_pages.append(pages)
    return x, new_pages


def _run_decoder_layer(graphdef, state, x, kv_pages, batch: ForwardBatch, kernels: Kernels):
    return nnx.merge(graphdef, state)(x, kv_pages, batch, kernels)


# NOTE: one jit shared by every layer: the layers have equal graphdefs (a sliding window differs
# only where the model's windows do) and equal shapes, so a bucket traces and lowers one layer and
# calls it num_layers times; XLA inlines the calls, so the compiled step is the same as unrolled,
# and tracing and lowering a bucket, which hold the GIL and bound how fast buckets load (also from
# the cache), shrink by about the number of layers.
_decoder_layer = jax.jit(_run_decoder_layer, static_argnums=(0, 5))


def lm_logits(x: jax.Array, head: nnx.Param) -> jax.Array:
    """x [R, H] @ head [V, H].T -> logits [R, V] float32."""
    return jnp.einsum("rh,vh->rv", x, head[...], preferred_element_type=jnp.float32)


class DecoderModel(nnx.Module):
    """HF's `model`: embed_tokens, the decoder layers, the final RMSNorm (Llama and its descendants)."""

    def __init__(self, arch: ModelArch, dtype, make_layer: Callable[[int], nnx.Module]):
        self.embed_tokens = Embedding(arch.vocab_size, arch.hidden_size, dtype)
        self.layers = nnx.List([make_layer(i) for i in range(arch.num_layers)])
        self.norm = RMSNorm(arch.hidden_size, arch.norm_eps, dtype)


class CausalLM(nnx.Module):
    """`model` plus `lm_head` (or the embedding, tied); `make_layer(i)` builds decoder layer i."""

    def __init__(self, arch: ModelArch, dtype, make_layer: Callable[[int], nnx.Module]):
        self.model = DecoderModel(arch, dtype, make_layer)
        self.lm_head = (
            None if arch.tie_word_embeddings else Linear(arch.hidden_size, arch.vocab_size, ("vocab", "embed"), dtype)
        )

    def __call__(self, kv_pages: list[jax.Array], batch: ForwardBatch, kernels: Kernels):
        """Returns (kv_pages, logits [R, V] float32 at batch.logits_indices)."""
        x = self.model.embed_tokens(batch.input_ids)  # [T, H]
        x, kv_pages = run_layers(self.model.layers, x, kv_pages, batch, kernels)
        x = self.model.norm(x[batch.logits_indices])  # [R, H]
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return kv_pages, lm_logits(x, head)


def kv_pages_shape(arch: ModelArch, num_pages: int, page_size: int) -> tuple[int, ...]:
    """One layer's KV pool: K/V pages (pallas_kernels/ragged_paged_attention/common.py), or for MLA
    latent pages (pallas_kernels/mla_attention/common.py)."""
    if arch.mla is not None:
        return (num_pages, page_size, arch.mla.latent_width)
    return (2, arch.num_kv_heads, num_pages, page_size, arch.head_dim)
